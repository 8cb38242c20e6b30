// Fused OSM + CAA weighted contrastive loss, CPU kernel (docs/semantics.md §4, fused form §4.4).
//
// The loss is a sum over the unordered pairs i < j of the batch with constant (stop-gradient)
// weights and two global normalisers S+ = sum_pos w+, S- = sum_neg w-:
//   L = (1 - lam) (1/2) T+ / S+ + lam (1/2) T- / S-,  T+ = sum_pos w+ d^2,  T- = sum_neg w- h^2,
//   w+ = exp(-d^2 / (2 sigma^2)) a_ij,  w- = h a_ij,  h = [alpha - d]+,  a_ij = min(a_i, a_j).
// Gradient (weights constant, docs/semantics.md §4.3): dL/dd = (1 - lam)/S+ w+ d (pos),
// -lam/S- w- h (neg), and dd_ij/dz_i = (z_i - z_j)/d = -dd_ij/dz_j. So with C+_ij = w+ and
// C-_ij = w- h / d,
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
//
// The op takes the raw embeddings x (any strides): with normalize it normalises them itself
// (row_norms.h: scale-safe norms, docs/semantics.md §1.4) into the contiguous z the tiles read, and
// the normalisation's Jacobian takes dL/dz back to dL/dx at the end. A non-finite row of x and an
// attention value outside (0, 1] raise ValueError here (docs/semantics.md §6), eager and compiled.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_tiles.h"
#include "row_norms.h"

namespace rll {
RLL_CPU_CAPABILITY_BEGIN
namespace osm {
namespace {

template <class S>
inline double hsum_d(const Vectorized<S>& v) {
  return static_cast<double>(hsum(v));
}

// Below this density (non-zeros per tile entry) a tile's gradient is applied with a sparse loop
// instead of two GEMMs: a GEMM runs at ~190 GFLOP/s per core, the sparse update at ~1/10 of it.
constexpr int64_t kSparseRatio = 12;

template <class S>
struct Hyper {
  S alpha;
  S neg_inv_2s2;  // -1 / (2 sigma^2)
};

// What every thread of one call reads. Square tiles of B x B pairs: the distance tile and the two
// coefficient tiles stay in L2.
template <class S>
struct OsmProblem {
  const at::Tensor& z;
  const S* NZ;   // squared norms
  const S* LAB;  // labels as S
  const S* ATT;  // attention a_i, or nullptr (all 1)
  Hyper<S> hp;
  bool need_grad;
  int64_t N, D, B, BP;
};

// What one thread accumulates: [S+, T+, S-, T-] and, for the gradient, acc (N, D) and rs (N,) per set.
template <class S>
struct ThreadSums {
  double* sums;
  S *acc_p, *acc_n;
  double *rs_p, *rs_n;
};

// Per-thread buffers of one tile pair (I, J): rows i0..i0+bq against columns j0..j0+bk.
template <class S>
struct OsmTile {
  using V = Vectorized<S>;
  std::vector<S> dots, cp, cn;                                // B x B: Gram tile, C+ and C- of the pairs
  std::vector<S> col_idx, kl, att, nk, cp_colsum, cn_colsum;  // BP: per column of tile J
  std::vector<char> row_has_p, row_has_n;                     // B: rows with a non-zero C (C >= 0)
  V nnz_p, nnz_n;                                             // non-zero C per lane
  OsmTile(int64_t B, int64_t BP)
      : dots(B * B),
        cp(B * B),
        cn(B * B),
        col_idx(BP),
        kl(BP),
        att(BP),
        nk(BP),
        cp_colsum(BP),
        cn_colsum(BP),
        row_has_p(B),
        row_has_n(B) {
    for (int64_t c = 0; c < BP; ++c) col_idx[c] = S(c);
  }
};

// acc[rows] -= C (rows x cols) z[cols], and acc[cols] -= C^T z[rows], sparse form; rows
// without a non-zero weight (row_any[r] == 0) are skipped.
template <class S>
void sparse_update(const S* C, const char* row_any, int64_t bq, int64_t bk, int64_t D, const S* zI, const S* zJ,
                   S* accI, S* accJ, bool diag) {
  for (int64_t r = 0; r < bq; ++r) {
    if (!row_any[r]) continue;
    const S* c_row = C + r * bk;
    S* ai = accI + r * D;
    const S* zi = zI + r * D;
    for (int64_t c = diag ? r + 1 : 0; c < bk; ++c) {
      const S w = c_row[c];
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

// Row r (i = i0 + r) of tile I against the columns of tile J (in a diagonal tile only c > r): the
// pair weights into the sums, and for the gradient C+ and C- into the tile rows, row and column sums.
template <class S>
void fold_row_pairs(const OsmProblem<S>& pb, OsmTile<S>& tile, ThreadSums<S>& th, int64_t r, int64_t i, int64_t bk,
                    bool diag) {
  using V = Vectorized<S>;
  const int64_t W = V::size();
  const Hyper<S> hp = pb.hp;
  const bool need_grad = pb.need_grad, has_att = pb.ATT != nullptr;
  const S rel = dup_rel<S>();
  const S* dot_row = tile.dots.data() + r * bk;
  S* cp_row = tile.cp.data() + r * bk;
  S* cn_row = tile.cn.data() + r * bk;
  const V nq(pb.NZ[i]), li(pb.LAB[i]), att_i(has_att ? pb.ATT[i] : S(1));
  const V lo(diag ? static_cast<S>(r) : S(-1)), n_cols(static_cast<S>(bk));
  V wp_sum(S(0)), wpd2_sum(S(0)), wn_sum(S(0)), wnh2_sum(S(0)), cp_rowsum(S(0)), cn_rowsum(S(0));
  for (int64_t c = diag ? (r + 1) / W * W : 0; c < bk; c += W) {
    const int64_t cnt = std::min(W, bk - c);
    const PairDistances<S> pd = pair_distances(dot_row, tile.nk.data(), c, cnt, nq, rel);
    const V ci = V::loadu(tile.col_idx.data() + c);
    const V valid = (ci > lo) & (ci < n_cols);
    V same, diff;
    label_masks(V::loadu(tile.kl.data() + c), li, same, diff);
    same = same & valid;
    diff = diff & valid;
    const V aij = has_att ? at::vec::minimum(att_i, V::loadu(tile.att.data() + c)) : V(S(1));
    const V dd = pd.d * pd.d;  // d^2 from d (0 for a duplicate)
    const V wp = rll_select(same, (dd * V(hp.neg_inv_2s2)).exp() * aij, V(S(0)));
    const V h = at::vec::maximum(V(hp.alpha) - pd.d, V(S(0)));
    const V wn = rll_select(diff, h * aij, V(S(0)));
    wp_sum = wp_sum + wp;
    wpd2_sum = wpd2_sum + wp * dd;
    wn_sum = wn_sum + wn;
    wnh2_sum = wnh2_sum + wn * h * h;
    if (!need_grad) continue;
    // C+ = w+ d / d (0 for a duplicate, whose direction is 0); C- = w- h / d
    const V cp = rll_select(pd.dup, V(S(0)), wp);
    const V cn = wn * h * pair_inv_dist(pd.d, pd.dup);
    cp_rowsum = cp_rowsum + cp;
    cn_rowsum = cn_rowsum + cn;
    (V::loadu(tile.cp_colsum.data() + c) + cp).store(tile.cp_colsum.data() + c);
    (V::loadu(tile.cn_colsum.data() + c) + cn).store(tile.cn_colsum.data() + c);
    tile.nnz_p = tile.nnz_p + cp.ne(V(S(0)));
    tile.nnz_n = tile.nnz_n + cn.ne(V(S(0)));
    cp.store(cp_row + c, cnt);
    cn.store(cn_row + c, cnt);
  }
  th.sums[0] += hsum_d(wp_sum);
  th.sums[1] += hsum_d(wpd2_sum);
  th.sums[2] += hsum_d(wn_sum);
  th.sums[3] += hsum_d(wnh2_sum);
  if (!need_grad) return;
  const double cp_r = hsum_d(cp_rowsum), cn_r = hsum_d(cn_rowsum);
  th.rs_p[i] += cp_r;
  th.rs_n[i] += cn_r;
  tile.row_has_p[r] = cp_r != 0.0;
  tile.row_has_n[r] = cn_r != 0.0;
  // a diagonal tile stores only c >= the vector start; clear the rest (c <= r) for the GEMM
  if (diag) {
    const int64_t c_end = std::min(bk, (r + 1) / W * W);
    std::fill(cp_row, cp_row + c_end, S(0));
    std::fill(cn_row, cn_row + c_end, S(0));
  }
}

// acc_I -= C z_J and acc_J -= C^T z_I for one set's C tile (nnz non-zeros): GEMMs, or the sparse
// loop when the tile is sparse.
template <class S>
void apply_tile_grad(const OsmProblem<S>& pb, S* C, const char* row_any, double nnz, S* acc, const at::Tensor& zI,
                     const at::Tensor& zJ, int64_t i0, int64_t j0, bool diag) {
  const int64_t bq = zI.size(0), bk = zJ.size(0), D = pb.D;
  if (nnz == 0.0) return;
  if (nnz * kSparseRatio < static_cast<double>(bq * bk)) {
    const S* Z = pb.z.template data_ptr<S>();
    sparse_update<S>(C, row_any, bq, bk, D, Z + i0 * D, Z + j0 * D, acc + i0 * D, acc + j0 * D, diag);
    return;
  }
  const auto opts = pb.z.options();
  const at::Tensor c_t = at::from_blob(C, {bq, bk}, opts);
  at::Tensor acc_I = at::from_blob(acc + i0 * D, {bq, D}, opts);
  at::Tensor acc_J = at::from_blob(acc + j0 * D, {bk, D}, opts);
  acc_I.addmm_(c_t, zJ, S(1), S(-1));
  acc_J.addmm_(c_t.t(), zI, S(1), S(-1));
}

// The gradient part of tile pair (I, J), after its rows: column sums into rs, C tiles into acc.
template <class S>
void add_tile_grads(const OsmProblem<S>& pb, OsmTile<S>& tile, ThreadSums<S>& th, const at::Tensor& zI,
                    const at::Tensor& zJ, int64_t i0, int64_t j0, bool diag) {
  const int64_t bq = zI.size(0), bk = zJ.size(0);
  if (diag) {  // rows skipped by the early break hold no pair
    for (int64_t r = std::max<int64_t>(0, bk - 1); r < bq; ++r) {
      std::fill(tile.cp.begin() + r * bk, tile.cp.begin() + (r + 1) * bk, S(0));
      std::fill(tile.cn.begin() + r * bk, tile.cn.begin() + (r + 1) * bk, S(0));
    }
  }
  for (int64_t c = 0; c < bk; ++c) {
    th.rs_p[j0 + c] += static_cast<double>(tile.cp_colsum[c]);
    th.rs_n[j0 + c] += static_cast<double>(tile.cn_colsum[c]);
  }
  apply_tile_grad(pb, tile.cp.data(), tile.row_has_p.data(), hsum_d(tile.nnz_p), th.acc_p, zI, zJ, i0, j0, diag);
  apply_tile_grad(pb, tile.cn.data(), tile.row_has_n.data(), hsum_d(tile.nnz_n), th.acc_n, zI, zJ, i0, j0, diag);
}

// Tile pair (I, J), I <= J.
template <class S>
void osm_tile_pair(const OsmProblem<S>& pb, OsmTile<S>& tile, ThreadSums<S>& th, int64_t I, int64_t J) {
  const bool diag = I == J;
  const int64_t i0 = I * pb.B, j0 = J * pb.B;
  const int64_t bq = std::min(pb.B, pb.N - i0), bk = std::min(pb.B, pb.N - j0);
  const at::Tensor zI = pb.z.narrow(0, i0, bq), zJ = pb.z.narrow(0, j0, bk);
  if (diag)
    gram_tile_upper(tile.dots.data(), zI);  // the diagonal tile reads its pairs c > r only
  else
    gram_tile(tile.dots.data(), zI, zJ);
  load_tile(pb.NZ, pb.LAB, j0, bk, pb.BP, tile.nk.data(), tile.kl.data());
  if (pb.ATT != nullptr) copy_padded(pb.ATT + j0, bk, tile.att.data(), pb.BP, S(0));
  if (pb.need_grad) {
    std::fill(tile.cp_colsum.begin(), tile.cp_colsum.end(), S(0));
    std::fill(tile.cn_colsum.begin(), tile.cn_colsum.end(), S(0));
  }
  tile.nnz_p = tile.nnz_n = Vectorized<S>(S(0));
  std::fill(tile.row_has_p.begin(), tile.row_has_p.end(), 0);
  std::fill(tile.row_has_n.begin(), tile.row_has_n.end(), 0);
  for (int64_t r = 0; r < bq; ++r) {
    if (diag && r + 1 >= bk) break;  // no column c > r left
    fold_row_pairs(pb, tile, th, r, i0 + r, bk, diag);
  }
  if (pb.need_grad) add_tile_grads(pb, tile, th, zI, zJ, i0, j0, diag);
}

template <class S>
void osm_kernel(const at::Tensor& z, const S* nz, const at::Tensor& labels, const c10::optional<at::Tensor>& att,
                const Hyper<S> hp, bool need_grad, std::vector<double>& sums, at::Tensor& acc_parts,
                at::Tensor& rs_parts) {
  const int64_t N = z.size(0), B = tile_size_for_threads(128, 16, N, 2);
  const std::vector<S> lab = labels_as<S>({&labels});
  const OsmProblem<S> pb{z,
                         nz,
                         lab.data(),
                         att.has_value() ? att->data_ptr<S>() : nullptr,
                         hp,
                         need_grad,
                         N,
                         z.size(1),
                         B,
                         vec_pad<S>(B)};
  const auto pairs = upper_tile_pairs(ceil_div(N, B));
  const int64_t nthreads = at::get_num_threads();
  constexpr int64_t kPad = 8;  // per thread: [S+, T+, S-, T-], one 64-byte line each (no false sharing)
  std::vector<double> thread_sums(nthreads * kPad, 0.0);
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t p0, int64_t p1) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < nthreads, "osm: thread id ", tid, " out of range ", nthreads);
    OsmTile<S> tile(pb.B, pb.BP);
    // this thread's accumulators: acc (2, N, D) [pos, neg] and rs (2, N) in double
    ThreadSums<S> th{thread_sums.data() + tid * kPad, need_grad ? acc_parts[tid][0].data_ptr<S>() : nullptr,
                     need_grad ? acc_parts[tid][1].data_ptr<S>() : nullptr,
                     need_grad ? rs_parts[tid][0].data_ptr<double>() : nullptr,
                     need_grad ? rs_parts[tid][1].data_ptr<double>() : nullptr};
    for (int64_t p = p0; p < p1; ++p) osm_tile_pair(pb, tile, th, pairs[p].first, pairs[p].second);
  });
  for (int64_t t = 0; t < nthreads; ++t)
    for (int s = 0; s < 4; ++s) sums[s] += thread_sums[t * kPad + s];
}

void check_inputs(const at::Tensor& z, const at::Tensor& labels, const c10::optional<at::Tensor>& attention) {
  TORCH_CHECK(z.dim() == 2, "osm: x must be 2-D (N, D), got ", z.dim(), "-D");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "osm (cpu): x must be float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0), "osm: labels must have shape (", z.size(0), ",), got ",
              labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "osm: labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(z.device().is_cpu() && labels.device().is_cpu(), "osm (cpu): tensors must be on the CPU");
  if (attention.has_value()) {
    TORCH_CHECK(attention->dim() == 1 && attention->size(0) == z.size(0), "osm: attention must have shape (", z.size(0),
                ",), got ", attention->sizes());
    TORCH_CHECK(attention->scalar_type() == z.scalar_type(), "osm: attention must have z's dtype ", z.scalar_type(),
                ", got ", attention->scalar_type());
    TORCH_CHECK(attention->device().is_cpu(), "osm (cpu): attention must be on the CPU");
  }
}

// Every attention value in (0, 1] (a NaN fails both comparisons), else a ValueError naming the
// first bad entry (docs/semantics.md §4.5, §6).
template <class S>
void check_attention_range(const at::Tensor& att) {
  const S* A = att.data_ptr<S>();
  for (int64_t i = 0; i < att.size(0); ++i)
    TORCH_CHECK_VALUE(A[i] > S(0) && A[i] <= S(1), "attention values must lie in (0, 1]; attention[", i,
                      "] = ", A[i]);
}

// The rows the kernel reads (contiguous) and their squared norms: z = x/|x| with |x| into norms
// (normalize), or x itself; a non-finite row raises, naming "embeddings" (docs/semantics.md §6).
template <class S>
at::Tensor embedding_rows(const at::Tensor& x, bool normalize, at::Tensor& sq, at::Tensor& norms) {
  const int64_t N = x.size(0), D = x.size(1);
  sq = at::empty({N}, x.options());
  if (!normalize) {
    const at::Tensor xc = x.contiguous();
    check_finite_rows(sq_norms_checked<S>(xc, sq.data_ptr<S>()), "embeddings");
    return xc;
  }
  at::Tensor z = at::empty({N, D}, x.options());
  norms = at::empty({N}, x.options());
  check_finite_rows(normalize_rows<S>(x, z.data_ptr<S>(), norms.data_ptr<S>(), sq.data_ptr<S>()), "embeddings");
  return z;
}

// dL/dz_i = fp (rs+_i z_i + acc+_i) + fn (rs-_i z_i + acc-_i), with the normalisers
// fp = (1 - lam) / S+ and fn = -lam / S- (0 for an empty set), from the per-thread parts.
at::Tensor gradient_from_parts(const at::Tensor& z, const std::vector<double>& sums, double imbalance,
                               const at::Tensor& acc_parts, const at::Tensor& rs_parts) {
  const double Sp = sums[0], Sn = sums[2];
  const double fp = Sp > 0.0 ? (1.0 - imbalance) / Sp : 0.0;
  const double fn = Sn > 0.0 ? -imbalance / Sn : 0.0;
  const at::Tensor acc = acc_parts.sum(0);  // (2, N, D)
  const at::Tensor rs = rs_parts.sum(0);    // (2, N) double
  const at::Tensor cz = (rs[0] * fp + rs[1] * fn).to(z.scalar_type()).unsqueeze(1);
  at::Tensor grad = z * cz;
  grad.add_(acc[0], fp).add_(acc[1], fn);
  return grad;
}

// Returns (loss (), dL/dx (N, D) when need_grad else (0,), sums (4,) float64 = [S+, T+, S-, T-]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> osm_fwd_cpu(const at::Tensor& x, const at::Tensor& labels,
                                                           const c10::optional<at::Tensor>& attention, double alpha,
                                                           double sigma, double imbalance, bool normalize,
                                                           bool need_grad) {
  check_inputs(x, labels, attention);
  TORCH_CHECK(sigma > 0.0, "osm: sigma must be > 0, got ", sigma);
  TORCH_CHECK(imbalance >= 0.0 && imbalance <= 1.0, "osm: imbalance must lie in [0, 1], got ", imbalance);
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor grad = need_grad ? at::zeros({N, D}, x.options()) : at::empty({0}, x.options());
  std::vector<double> sums(4, 0.0);
  c10::optional<at::Tensor> att;
  if (attention.has_value()) att = attention->detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "osm_fwd_cpu", [&] {
    if (att.has_value()) check_attention_range<scalar_t>(*att);
    // the kernel's inner GEMMs must not see autograd (this op's autograd is registered in Python)
    at::Tensor sq, norms;
    const at::Tensor z = embedding_rows<scalar_t>(x.detach(), normalize, sq, norms);
    if (N < 2) return;
    at::Tensor acc_parts = need_grad ? zeros_per_thread({2, N, D}, x.options()) : at::Tensor();
    at::Tensor rs_parts = need_grad ? zeros_per_thread({2, N}, x.options().dtype(at::kDouble)) : at::Tensor();
    const Hyper<scalar_t> hp{static_cast<scalar_t>(alpha), static_cast<scalar_t>(-0.5 / (sigma * sigma))};
    osm_kernel<scalar_t>(z, sq.data_ptr<scalar_t>(), labels.contiguous(), att, hp, need_grad, sums, acc_parts,
                         rs_parts);
    if (!need_grad) return;
    grad = gradient_from_parts(z, sums, imbalance, acc_parts, rs_parts);
    if (normalize)  // dL/dx from dL/dz: the normalisation's Jacobian, row by row
      normalize_backward_rows(grad.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), norms.data_ptr<scalar_t>(), N, D);
  });
  const double Lp = sums[0] > 0.0 ? 0.5 * sums[1] / sums[0] : 0.0;
  const double Ln = sums[2] > 0.0 ? 0.5 * sums[3] / sums[2] : 0.0;
  const double loss = (1.0 - imbalance) * Lp + imbalance * Ln;
  at::Tensor loss_t = at::scalar_tensor(loss, x.options());
  at::Tensor sums_t = at::tensor(sums, x.options().dtype(at::kDouble));
  return {loss_t, grad, sums_t};
}

}  // namespace
}  // namespace osm

// This build's OSM kernel (csrc/cpu_capability.h); cpu_dispatch.cpp registers those of the build it picks.
void register_osm_cpu_kernels(torch::Library& m) { m.impl("osm_fwd", &osm::osm_fwd_cpu); }

RLL_CPU_CAPABILITY_END
}  // namespace rll
