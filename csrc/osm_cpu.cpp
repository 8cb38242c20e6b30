// Fused OSM + CAA weighted contrastive loss, CPU kernel (SPEC section 3).
//
// The loss is a sum over the unordered pairs i < j of the batch with constant (stop-gradient)
// weights and two global normalisers S+ = sum_pos w+, S- = sum_neg w-:
//   L = (1 - lam) (1/2) T+ / S+ + lam (1/2) T- / S-,  T+ = sum_pos w+ d^2,  T- = sum_neg w- h^2,
//   w+ = exp(-d^2 / (2 sigma^2)) a_ij,  w- = h a_ij,  h = [alpha - d]+,  a_ij = min(a_i, a_j).
// Gradient (weights constant): dL/dd = (1 - lam)/S+ w+ d (pos), -lam/S- w- h (neg), and
// dd_ij/dz_i = (z_i - z_j)/d = -dd_ij/dz_j. So with C+_ij = w+ and C-_ij = w- h / d,
//   dL/dz_i = (1 - lam)/S+ sum_j C+_ij (z_i - z_j) - lam/S- sum_j C-_ij (z_i - z_j).
// S+ and S- are known only at the end, so one pass over the pair tiles accumulates the
// unnormalised sums T+, S+, T-, S- (in double) and, per row, rs_i = sum_j C_ij and
// acc_i = -sum_j C_ij z_j for each set; the two sets are rescaled by the normalisers at the end.
//
// The pair matrix is symmetric: only tiles (I, J) with I <= J are visited (in a diagonal tile
// only the columns c > r), and each tile updates both ends: rows with C Z_J, columns with
// C^T Z_I (GEMMs on from_blob tiles, or a sparse loop when a tile has few non-zero weights).
// Each thread owns its own (N, D) accumulators: no atomics; they are summed at the end.
// Memory: O(threads N D) plus per-thread tiles; no N x N matrix.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "rll_cpu_vec.h"

namespace rll {
namespace osm {
namespace {

template <class S>
inline double hsum_d(const Vectorized<S>& v) {
  return static_cast<double>(
      at::vec::vec_reduce_all<S>([](Vectorized<S>& a, Vectorized<S>& b) { return a + b; }, v));
}

// Square tiles of B x B pairs: the distance tile and the two coefficient tiles stay in L2.
inline int64_t choose_block(int64_t N) {
  int64_t b = 128;
  // small batches: enough tiles for every thread
  const int64_t threads = at::get_num_threads();
  while (b > 16 && (N + b - 1) / b < 2 * threads) b /= 2;
  return b;
}

// Below this density (non-zeros per tile entry) a tile's gradient is applied with a sparse loop
// instead of two GEMMs: a GEMM runs at ~190 GFLOP/s per core, the sparse update at ~1/10 of it.
constexpr int64_t kSparseRatio = 12;

template <class S>
struct Hyper {
  S alpha;
  S neg_inv_2s2;  // -1 / (2 sigma^2)
};

// acc[rows] -= C (rows x cols) other[cols], and acc[cols] -= C^T other[rows], sparse form; rows
// without a non-zero weight (row_any[r] == 0) are skipped.
template <class S>
void sparse_update(const S* C, const char* row_any, int64_t bi, int64_t bj, int64_t D, const S* zI, const S* zJ,
                   S* accI, S* accJ, bool diag) {
  for (int64_t r = 0; r < bi; ++r) {
    if (!row_any[r]) continue;
    const S* crow = C + r * bj;
    S* ai = accI + r * D;
    const S* zi = zI + r * D;
    for (int64_t c = diag ? r + 1 : 0; c < bj; ++c) {
      const S w = crow[c];
      if (w == S(0)) continue;
      const S* zj = zJ + c * D;
      S* aj = accJ + c * D;
      for (int64_t e = 0; e < D; ++e) {
        ai[e] -= w * zj[e];
        aj[e] -= w * zi[e];
      }
    }
  }
}

template <class S>
void osm_kernel(const at::Tensor& z, const at::Tensor& lab, const c10::optional<at::Tensor>& att_t,
                const Hyper<S> hp, bool need_grad, std::vector<double>& sums, at::Tensor& acc_parts,
                at::Tensor& rs_parts) {
  using V = Vectorized<S>;
  const int64_t N = z.size(0), D = z.size(1);
  const S* Z = z.data_ptr<S>();
  const S* LAB = lab.data_ptr<S>();
  const S* ATT = att_t.has_value() ? att_t->data_ptr<S>() : nullptr;
  const at::Tensor nz_t = (z * z).sum(1);
  const S* NZ = nz_t.data_ptr<S>();
  const S rel = dup_rel<S>();

  const int64_t B = choose_block(N);
  const int64_t W = V::size();
  const int64_t BP = (B + W - 1) / W * W;
  const int64_t nb = (N + B - 1) / B;
  std::vector<std::pair<int64_t, int64_t>> tiles;
  tiles.reserve(nb * (nb + 1) / 2);
  for (int64_t I = 0; I < nb; ++I)
    for (int64_t J = I; J < nb; ++J) tiles.emplace_back(I, J);
  const auto opts = z.options();
  const int64_t nthreads = at::get_num_threads();
  // per thread: [S+, T+, S-, T-], one 64-byte line each (no false sharing)
  constexpr int64_t kPad = 8;
  std::vector<double> tsums(nthreads * kPad, 0.0);

  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t t0, int64_t t1) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < nthreads, "osm: thread id ", tid, " out of range ", nthreads);
    std::vector<S> sbuf(B * B), cpb(B * B), cnb(B * B);
    std::vector<S> cidx(BP), labj(BP), attj(BP), nkj(BP), colp(BP), coln(BP);
    std::vector<char> anyp(B), anyn(B);  // rows of the tile with a non-zero weight (C >= 0)
    for (int64_t c = 0; c < BP; ++c) cidx[c] = S(c);
    double* ts = tsums.data() + tid * kPad;
    // accumulators of this thread: acc (2, N, D) [pos, neg] and rs (2, N) in double
    S* ACCP = need_grad ? acc_parts[tid][0].data_ptr<S>() : nullptr;
    S* ACCN = need_grad ? acc_parts[tid][1].data_ptr<S>() : nullptr;
    double* RSP = need_grad ? rs_parts[tid][0].data_ptr<double>() : nullptr;
    double* RSN = need_grad ? rs_parts[tid][1].data_ptr<double>() : nullptr;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t I = tiles[t].first, J = tiles[t].second;
      const bool diag = I == J;
      const int64_t i0 = I * B, j0 = J * B;
      const int64_t bi = std::min(B, N - i0), bj = std::min(B, N - j0);
      const at::Tensor zI = z.narrow(0, i0, bi), zJ = z.narrow(0, j0, bj);
      at::Tensor s_t = at::from_blob(sbuf.data(), {bi, bj}, opts);
      at::mm_out(s_t, zI, zJ.t());
      std::copy(NZ + j0, NZ + j0 + bj, nkj.begin());
      std::copy(LAB + j0, LAB + j0 + bj, labj.begin());
      std::fill(nkj.begin() + bj, nkj.end(), S(0));
      std::fill(labj.begin() + bj, labj.end(), S(-1));
      if (ATT != nullptr) {
        std::copy(ATT + j0, ATT + j0 + bj, attj.begin());
        std::fill(attj.begin() + bj, attj.end(), S(0));
      }
      if (need_grad) {
        std::fill(colp.begin(), colp.end(), S(0));
        std::fill(coln.begin(), coln.end(), S(0));
      }
      V nnzp(S(0)), nnzn(S(0));
      std::fill(anyp.begin(), anyp.end(), 0);
      std::fill(anyn.begin(), anyn.end(), 0);
      const V vbj(static_cast<S>(bj));
      for (int64_t r = 0; r < bi; ++r) {
        const int64_t i = i0 + r;
        if (diag && r + 1 >= bj) break;  // no column c > r left
        const S* srow = sbuf.data() + r * bj;
        S* cprow = cpb.data() + r * bj;
        S* cnrow = cnb.data() + r * bj;
        const V nqi(NZ[i]), li(LAB[i]), ai(ATT != nullptr ? ATT[i] : S(1));
        const V lo(diag ? static_cast<S>(r) : S(-1));
        V sp(S(0)), tp(S(0)), sn(S(0)), tn(S(0)), rp(S(0)), rn(S(0));
        for (int64_t c = diag ? (r + 1) / W * W : 0; c < bj; c += W) {
          const int64_t cnt = std::min(W, bj - c);
          const V dot = V::loadu(srow + c, cnt);
          const V nk = V::loadu(nkj.data() + c);
          const V d2 = gram_d2(dot, nqi, nk);
          const auto dup = is_dup(d2, nqi, nk, rel);
          const V d = pair_dist(d2, dup);
          const V ci = V::loadu(cidx.data() + c);
          const V valid = (ci > lo) & (ci < vbj);
          const V lj = V::loadu(labj.data() + c);
          const V same = (lj == li) & valid;
          const V diff = (lj != li) & valid;
          const V aij = ATT != nullptr ? at::vec::minimum(ai, V::loadu(attj.data() + c)) : V(S(1));
          const V dd = d * d;
          const V wp = rll_select(same, (dd * V(hp.neg_inv_2s2)).exp() * aij, V(S(0)));
          const V h = at::vec::maximum(V(hp.alpha) - d, V(S(0)));
          const V wn = rll_select(diff, h * aij, V(S(0)));
          sp = sp + wp;
          tp = tp + wp * dd;
          sn = sn + wn;
          tn = tn + wn * h * h;
          if (need_grad) {
            // C+ = w+ d / d (0 for a duplicate, whose direction is 0); C- = w- h / d
            const V cp = rll_select(dup, V(S(0)), wp);
            const V cn = wn * h * pair_inv_dist(d, dup);
            rp = rp + cp;
            rn = rn + cn;
            (V::loadu(colp.data() + c) + cp).store(colp.data() + c);
            (V::loadu(coln.data() + c) + cn).store(coln.data() + c);
            nnzp = nnzp + cp.ne(V(S(0)));
            nnzn = nnzn + cn.ne(V(S(0)));
            cp.store(cprow + c, cnt);
            cn.store(cnrow + c, cnt);
          }
        }
        ts[0] += hsum_d(sp);
        ts[1] += hsum_d(tp);
        ts[2] += hsum_d(sn);
        ts[3] += hsum_d(tn);
        if (need_grad) {
          const double rpr = hsum_d(rp), rnr = hsum_d(rn);
          RSP[i] += rpr;
          RSN[i] += rnr;
          anyp[r] = rpr != 0.0;
          anyn[r] = rnr != 0.0;
          // a diagonal tile stores only c >= the vector start; clear the rest (c <= r) for the GEMM
          if (diag) {
            const int64_t cend = std::min(bj, (r + 1) / W * W);
            std::fill(cprow, cprow + cend, S(0));
            std::fill(cnrow, cnrow + cend, S(0));
          }
        }
      }
      if (!need_grad) continue;
      if (diag) {
        // rows skipped by the early break hold no pair
        const int64_t rstart = std::max<int64_t>(0, bj - 1);
        for (int64_t r = rstart; r < bi; ++r) {
          std::fill(cpb.begin() + r * bj, cpb.begin() + (r + 1) * bj, S(0));
          std::fill(cnb.begin() + r * bj, cnb.begin() + (r + 1) * bj, S(0));
        }
      }
      for (int64_t c = 0; c < bj; ++c) {
        RSP[j0 + c] += static_cast<double>(colp[c]);
        RSN[j0 + c] += static_cast<double>(coln[c]);
      }
      const double cntp = hsum_d(nnzp), cntn = hsum_d(nnzn);
      const int64_t area = bi * bj;
      auto apply = [&](S* cbuf, const char* row_any, double nnz, S* ACC) {
        if (nnz == 0.0) return;
        if (nnz * kSparseRatio < static_cast<double>(area)) {
          sparse_update<S>(cbuf, row_any, bi, bj, D, Z + i0 * D, Z + j0 * D, ACC + i0 * D, ACC + j0 * D, diag);
          return;
        }
        const at::Tensor c_t = at::from_blob(cbuf, {bi, bj}, opts);
        at::Tensor accI = at::from_blob(ACC + i0 * D, {bi, D}, opts);
        at::Tensor accJ = at::from_blob(ACC + j0 * D, {bj, D}, opts);
        accI.addmm_(c_t, zJ, S(1), S(-1));
        accJ.addmm_(c_t.t(), zI, S(1), S(-1));
      };
      apply(cpb.data(), anyp.data(), cntp, ACCP);
      apply(cnb.data(), anyn.data(), cntn, ACCN);
    }
  });
  for (int64_t t = 0; t < nthreads; ++t)
    for (int k = 0; k < 4; ++k) sums[k] += tsums[t * kPad + k];
}

void check_inputs(const at::Tensor& z, const at::Tensor& labels, const c10::optional<at::Tensor>& attention) {
  TORCH_CHECK(z.dim() == 2, "osm: z must be 2-D (N, D), got ", z.dim(), "-D");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "osm (cpu): z must be float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0), "osm: labels must have shape (", z.size(0),
              ",), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "osm: labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(z.device().is_cpu() && labels.device().is_cpu(), "osm (cpu): tensors must be on the CPU");
  TORCH_CHECK(z.is_contiguous(), "osm: z must be contiguous");
  if (attention.has_value()) {
    TORCH_CHECK(attention->dim() == 1 && attention->size(0) == z.size(0), "osm: attention must have shape (",
                z.size(0), ",), got ", attention->sizes());
    TORCH_CHECK(attention->scalar_type() == z.scalar_type(), "osm: attention must have z's dtype ",
                z.scalar_type(), ", got ", attention->scalar_type());
    TORCH_CHECK(attention->device().is_cpu(), "osm (cpu): attention must be on the CPU");
  }
}

// Returns (loss (), dL/dz (N, D) when need_grad else (0,), sums (4,) float64 = [S+, T+, S-, T-]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> osm_fwd_cpu(const at::Tensor& z, const at::Tensor& labels,
                                                           const c10::optional<at::Tensor>& attention,
                                                           double alpha, double sigma, double imbalance,
                                                           bool need_grad) {
  check_inputs(z, labels, attention);
  TORCH_CHECK(sigma > 0.0, "osm: sigma must be > 0, got ", sigma);
  TORCH_CHECK(imbalance >= 0.0 && imbalance <= 1.0, "osm: imbalance must lie in [0, 1], got ", imbalance);
  const int64_t N = z.size(0), D = z.size(1);
  at::Tensor grad = need_grad ? at::zeros_like(z) : at::empty({0}, z.options());
  std::vector<double> sums(4, 0.0);
  // the kernel's inner GEMMs must not see autograd (this op's autograd is registered in Python)
  const at::Tensor zd = z.detach();
  if (N >= 2) {
    // dense class ids 0..C-1, exactly representable in the value type, compared as vectors
    const at::Tensor ids = std::get<1>(at::_unique(labels, /*sorted=*/true, /*return_inverse=*/true));
    const at::Tensor lab = ids.to(z.scalar_type()).contiguous();
    c10::optional<at::Tensor> att;
    if (attention.has_value()) att = attention->detach().contiguous();
    const int64_t nthreads = at::get_num_threads();
    at::Tensor acc_parts = need_grad ? at::zeros({nthreads, 2, N, D}, z.options()) : at::Tensor();
    at::Tensor rs_parts = need_grad ? at::zeros({nthreads, 2, N}, z.options().dtype(at::kDouble)) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "osm_fwd_cpu", [&] {
      const Hyper<scalar_t> hp{static_cast<scalar_t>(alpha), static_cast<scalar_t>(-0.5 / (sigma * sigma))};
      osm_kernel<scalar_t>(zd, lab, att, hp, need_grad, sums, acc_parts, rs_parts);
    });
    if (need_grad) {
      const double Sp = sums[0], Sn = sums[2];
      const double fp = Sp > 0.0 ? (1.0 - imbalance) / Sp : 0.0;
      const double fn = Sn > 0.0 ? -imbalance / Sn : 0.0;
      const at::Tensor acc = acc_parts.sum(0);  // (2, N, D)
      const at::Tensor rs = rs_parts.sum(0);    // (2, N) double
      // dL/dz_i = fp (rs+_i z_i + acc+_i) + fn (rs-_i z_i + acc-_i)
      const at::Tensor cz = (rs[0] * fp + rs[1] * fn).to(z.scalar_type()).unsqueeze(1);
      grad = zd * cz;
      grad.add_(acc[0], fp).add_(acc[1], fn);
    }
  }
  const double Lp = sums[0] > 0.0 ? 0.5 * sums[1] / sums[0] : 0.0;
  const double Ln = sums[2] > 0.0 ? 0.5 * sums[3] / sums[2] : 0.0;
  const double loss = (1.0 - imbalance) * Lp + imbalance * Ln;
  at::Tensor loss_t = at::scalar_tensor(loss, z.options());
  at::Tensor sums_t = at::tensor(sums, z.options().dtype(at::kDouble));
  return {loss_t, grad, sums_t};
}

}  // namespace
}  // namespace osm
}  // namespace rll

TORCH_LIBRARY_IMPL(rll_kernels, CPU, m) { m.impl("osm_fwd", &rll::osm::osm_fwd_cpu); }
