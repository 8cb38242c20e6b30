// Fused SoftTriple loss, CPU kernels (SPEC section 2).
//
// x (N, D) is already normalised; the centers w (D, C*K) (column c*K + k = center k of class c)
// are the raw parameter: the kernel scales each center column by 1/max(|w_ck|, 1e-12) on the fly
// (as F.normalize) and returns the gradient of the raw parameter, so no normalised copy of W
// (which, at D x C*K, is larger than N x C*K in the target case) is ever made.
//
// The classes are streamed in tiles of TC classes (TC*K columns). Per tile and block of BR rows,
// one GEMM gives the transposed logits tile s^T = W_tile^T X_blk^T (TC*K x BR), so that for a
// fixed center the BR rows lie contiguous and every per-(i, c) step vectorises across rows: the
// K-softmax S_ic = sum_k softmax_k(s_ick / gamma) s_ick, z_ic = la (S_ic - margin [c = y_i]) and
// an online log-sum-exp over the classes. Forward keeps only LSE_i (and returns
// l_i = LSE_i - z_iy).
//
// Backward recomputes each tile, overwrites it with G'_ick = r_ck dL/ds_ick (r = 1/|w|) and does
// two GEMMs: dW[:, tile] = X^T G' into a cache-resident tile buffer, written once to dW with the
// normalisation's projection dW_ck -= r_ck^2 (sum_i G_ick s_ick) w_ck (each class tile is owned
// by one thread: no atomics, no per-thread copies of dW); and dX += G' W_tile^T (a per-thread
// partial dX, summed at the end). Memory: O((N + C K) D) plus per-thread tiles; no N x C*K tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace softtriple {
namespace {
using at::vec::Vectorized;

template <class S>
constexpr S neg_inf() {
  return -std::numeric_limits<S>::infinity();
}

struct Params {
  int64_t K;
  double la, gamma, margin;
};

// Tiling: a class tile has about 256 center columns (W tile 256 x D stays in L2), a row block at
// most 256 rows. Smaller class tiles when there are few classes, so that every thread gets work.
struct Tiling {
  int64_t tc, br, ntiles;
};
inline Tiling choose_tiling(int64_t N, int64_t C, int64_t K) {
  int64_t tc = std::max<int64_t>(1, 256 / K);
  const int64_t threads = at::get_num_threads();
  while (tc > 1 && (C + tc - 1) / tc < 4 * threads) tc = (tc + 1) / 2;
  const int64_t br = std::min<int64_t>(N, 256);
  return {tc, br, (C + tc - 1) / tc};
}

// Per (row lane, class): the K-softmax of a class segment of the s^T tile. sc points at the first
// center row of the class, rows are brp apart. Returns S and the softmax denominator; e_k =
// exp((s_k - max)/gamma) is written to ebuf when it is non-null.
template <class S>
inline void segment(const S* sc, int64_t brp, int64_t K, const Vectorized<S>& inv_gamma, Vectorized<S>& Sv,
                    Vectorized<S>& den, S* ebuf) {
  using V = Vectorized<S>;
  V mx = V::loadu(sc);
  for (int64_t k = 1; k < K; ++k) mx = at::vec::maximum(mx, V::loadu(sc + k * brp));
  V d(S(0)), num(S(0));
  for (int64_t k = 0; k < K; ++k) {
    const V s = V::loadu(sc + k * brp);
    const V e = ((s - mx) * inv_gamma).exp();
    d = d + e;
    num = num + e * s;
    if (ebuf) e.store(ebuf + k * V::size());
  }
  Sv = num / d;
  den = d;
}

// 1 / max(|w_col|, eps) per center column, and the projection coefficient of F.normalize's
// gradient (r^2, or 0 where the norm is clamped).
constexpr double kNormEps = 1e-12;
template <class S>
void column_scales(const at::Tensor& w, std::vector<S>& rn, std::vector<S>* q) {
  const at::Tensor nrm = at::linalg_vector_norm(w, 2, {0}, false, c10::nullopt).contiguous();
  const S* NR = nrm.data_ptr<S>();
  const int64_t CK = w.size(1);
  rn.resize(CK);
  if (q) q->resize(CK);
  for (int64_t j = 0; j < CK; ++j) {
    const S n = NR[j];
    rn[j] = S(1) / std::max(n, S(kNormEps));
    if (q) (*q)[j] = n > S(kNormEps) ? rn[j] * rn[j] : S(0);
  }
}

// s^T tile rows (centers) times 1/|w|: the logits of the normalised centers.
template <class S>
inline void scale_rows(S* sbuf, int64_t tck, int64_t brp, const S* rn) {
  using V = Vectorized<S>;
  for (int64_t j = 0; j < tck; ++j) {
    const V r(rn[j]);
    S* row = sbuf + j * brp;
    for (int64_t v = 0; v < brp; v += V::size()) (V::loadu(row + v) * r).store(row + v);
  }
}

template <class S>
void forward_kernel(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w, const Params& p,
                    at::Tensor& loss, at::Tensor& lse_out) {
  using V = Vectorized<S>;
  const int64_t N = x.size(0), D = x.size(1), CK = w.size(1), K = p.K, C = CK / K;
  const int64_t* Y = labels.data_ptr<int64_t>();
  const Tiling t = choose_tiling(N, C, K);
  const int64_t W = V::size();
  const int64_t BRP = (t.br + W - 1) / W * W;
  const int64_t nthreads = at::get_num_threads();
  const auto opts = x.options();
  // labels as S (exact: C < 2^24 checked), padded to whole vectors
  const int64_t NP = (N + W - 1) / W * W;
  std::vector<S> yf(NP, S(-1));
  for (int64_t i = 0; i < N; ++i) yf[i] = S(Y[i]);
  // per-thread online LSE state per row: running max and sum of exp
  std::vector<S> mstate(nthreads * NP, neg_inf<S>()), lstate(nthreads * NP, S(0));
  std::vector<S> ztarget(N, S(0));
  std::vector<S> rn;
  column_scales<S>(w, rn, nullptr);
  const V inv_gamma(S(1.0 / p.gamma)), la(S(p.la)), lam(S(p.la * p.margin));

  at::parallel_for(0, t.ntiles, 1, [&](int64_t t0, int64_t t1) {
    const int64_t tid = at::get_thread_num();
    S* M = mstate.data() + tid * NP;
    S* L = lstate.data() + tid * NP;
    std::vector<S> sbuf(t.tc * K * BRP, S(0)), zbuf(t.tc * BRP, S(0));
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t c0 = tile * t.tc, tc = std::min(t.tc, C - c0), tck = tc * K;
      const at::Tensor wT = w.narrow(1, c0 * K, tck).t();  // (tck, D)
      for (int64_t i0 = 0; i0 < N; i0 += t.br) {
        const int64_t br = std::min(t.br, N - i0);
        at::Tensor s_t = at::from_blob(sbuf.data(), {tck, br}, {BRP, 1}, opts);
        at::mm_out(s_t, wT, x.narrow(0, i0, br).t());
        scale_rows<S>(sbuf.data(), tck, BRP, rn.data() + c0 * K);
        for (int64_t v = 0; v < br; v += W) {
          const V y = V::loadu(yf.data() + i0 + v);
          V tmax(neg_inf<S>());
          for (int64_t c = 0; c < tc; ++c) {
            V Sv, den;
            segment<S>(sbuf.data() + c * K * BRP + v, BRP, K, inv_gamma, Sv, den, nullptr);
            const V is_y = V::blendv(V(S(0)), V(S(1)), y == V(S(c0 + c)));
            const V z = la * Sv - lam * is_y;
            z.store(zbuf.data() + c * BRP + v);
            tmax = at::vec::maximum(tmax, z);
          }
          // online LSE: rescale the running sum once per tile, one exp per (i, c)
          const V m_old = V::loadu(M + i0 + v);
          const V m_new = at::vec::maximum(m_old, tmax);
          V l = V::loadu(L + i0 + v) * (m_old - m_new).exp();
          // lanes with m_old = m_new = -inf cannot occur: tmax is finite
          for (int64_t c = 0; c < tc; ++c) l = l + (V::loadu(zbuf.data() + c * BRP + v) - m_new).exp();
          m_new.store(M + i0 + v);
          l.store(L + i0 + v);
        }
        // the logit of the true class, written by the one thread owning that class
        for (int64_t r = 0; r < br; ++r) {
          const int64_t cy = Y[i0 + r] - c0;
          if (cy >= 0 && cy < tc) ztarget[i0 + r] = zbuf[cy * BRP + r];
        }
      }
    }
  });
  S* LOSS = loss.data_ptr<S>();
  S* LSE = lse_out.data_ptr<S>();
  for (int64_t i = 0; i < N; ++i) {
    S m = neg_inf<S>();
    for (int64_t th = 0; th < nthreads; ++th) m = std::max(m, mstate[th * NP + i]);
    S l = 0;
    for (int64_t th = 0; th < nthreads; ++th) {
      const S mt = mstate[th * NP + i];
      if (mt != neg_inf<S>()) l += lstate[th * NP + i] * std::exp(mt - m);
    }
    LSE[i] = m + std::log(l);
    LOSS[i] = LSE[i] - ztarget[i];
  }
}

template <class S>
void backward_kernel(const at::Tensor& g_rows, const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w,
                     const at::Tensor& lse, const Params& p, bool need_gx, bool need_gw, at::Tensor& gx,
                     at::Tensor& gw) {
  using V = Vectorized<S>;
  const int64_t N = x.size(0), D = x.size(1), CK = w.size(1), K = p.K, C = CK / K;
  const int64_t* Y = labels.data_ptr<int64_t>();
  const Tiling t = choose_tiling(N, C, K);
  const int64_t W = V::size();
  const int64_t BRP = (t.br + W - 1) / W * W;
  const int64_t NP = (N + W - 1) / W * W;
  const int64_t nthreads = at::get_num_threads();
  const auto opts = x.options();
  std::vector<S> yf(NP, S(-1)), lsef(NP, S(0)), gla(NP, S(0));
  const S* G = g_rows.data_ptr<S>();
  const S* LSE = lse.data_ptr<S>();
  for (int64_t i = 0; i < N; ++i) {
    yf[i] = S(Y[i]);
    lsef[i] = LSE[i];
    gla[i] = G[i] * S(p.la);
  }
  at::Tensor gx_parts = need_gx ? at::zeros({nthreads, N, D}, opts) : at::Tensor();
  std::vector<S> rn, qn;
  column_scales<S>(w, rn, &qn);
  const S* WP = w.data_ptr<S>();
  S* GW = need_gw ? gw.data_ptr<S>() : nullptr;
  const V inv_gamma(S(1.0 / p.gamma)), la(S(p.la)), lam(S(p.la * p.margin)), one(S(1));

  at::parallel_for(0, t.ntiles, 1, [&](int64_t t0, int64_t t1) {
    const int64_t tid = at::get_thread_num();
    std::vector<S> sbuf(t.tc * K * BRP, S(0)), ebuf(K * W), csv(t.tc * K * W), coef(t.tc * K), iota(W);
    // this tile's dW (D x tck), accumulated over the row blocks in cache, then written once to gw
    std::vector<S> wbuf(need_gw ? D * t.tc * K : 0);
    for (int64_t l = 0; l < W; ++l) iota[l] = S(l);
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t c0 = tile * t.tc, tc = std::min(t.tc, C - c0), tck = tc * K, col0 = c0 * K;
      const at::Tensor wT = w.narrow(1, col0, tck).t();  // (tck, D)
      const S* rt = rn.data() + col0;
      std::fill(csv.begin(), csv.end(), S(0));
      for (int64_t i0 = 0; i0 < N; i0 += t.br) {
        const int64_t br = std::min(t.br, N - i0);
        const at::Tensor xI = x.narrow(0, i0, br);
        at::Tensor s_t = at::from_blob(sbuf.data(), {tck, br}, {BRP, 1}, opts);
        at::mm_out(s_t, wT, xI.t());
        scale_rows<S>(sbuf.data(), tck, BRP, rt);
        for (int64_t v = 0; v < br; v += W) {
          const V y = V::loadu(yf.data() + i0 + v);
          const V l = V::loadu(lsef.data() + i0 + v);
          const V gl = V::loadu(gla.data() + i0 + v);
          // lanes past the block's rows hold stale values: their coefficient is forced to 0 (a blend,
          // so even an overflowed exp there cannot leak a NaN into the column sums)
          const V valid = V::loadu(iota.data()) < V(S(br - v));
          for (int64_t c = 0; c < tc; ++c) {
            S* sc = sbuf.data() + c * K * BRP + v;
            V Sv, den;
            segment<S>(sc, BRP, K, inv_gamma, Sv, den, ebuf.data());
            const V is_y = V::blendv(V(S(0)), one, y == V(S(c0 + c)));
            const V z = la * Sv - lam * is_y;
            // dl/dS_ic = g_i la (P_ic - [c = y_i]); dS/ds_k = q_k (1 + (s_k - S)/gamma)
            const V a = V::blendv(V(S(0)), gl * ((z - l).exp() - is_y) / den, valid);
            for (int64_t k = 0; k < K; ++k) {
              const V s = V::loadu(sc + k * BRP);
              const V e = V::loadu(ebuf.data() + k * W);
              const V g = a * e * (one + (s - Sv) * inv_gamma);  // dL/ds_ick
              S* cs = csv.data() + (c * K + k) * W;
              (V::loadu(cs) + g * s).store(cs);
              (g * V(rt[c * K + k])).store(sc + k * BRP);
            }
          }
        }
        // s_t now holds G'^T (tck x br)
        if (need_gw) {
          at::Tensor wb = at::from_blob(wbuf.data(), {D, tck}, opts);
          if (i0 == 0) {
            at::mm_out(wb, xI.t(), s_t.t());
          } else {
            wb.addmm_(xI.t(), s_t.t());
          }
        }
        if (need_gx) gx_parts[tid].narrow(0, i0, br).addmm_(s_t.t(), wT);
      }
      if (!need_gw) continue;
      // F.normalize's projection: dW_ck -= r_ck^2 (sum_i G_ick s_ick) w_ck
      for (int64_t j = 0; j < tck; ++j) {
        S cs = 0;
        for (int64_t l = 0; l < W; ++l) cs += csv[j * W + l];
        coef[j] = qn[col0 + j] * cs;
      }
      for (int64_t d = 0; d < D; ++d) {
        S* g = GW + d * CK + col0;
        const S* b = wbuf.data() + d * tck;
        const S* wr = WP + d * CK + col0;
        int64_t j = 0;
        for (; j + W <= tck; j += W) (V::loadu(b + j) - V::loadu(coef.data() + j) * V::loadu(wr + j)).store(g + j);
        for (; j < tck; ++j) g[j] = b[j] - coef[j] * wr[j];
      }
    }
  });
  if (need_gx) at::sum_out(gx, gx_parts, {0});
}

void check_inputs(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2, "softtriple: x must be 2-D (N, D), got ", x.dim(), "-D");
  TORCH_CHECK(w.dim() == 2, "softtriple: w must be 2-D (D, C*K), got ", w.dim(), "-D");
  TORCH_CHECK(x.size(1) == w.size(0), "softtriple: x is (N, ", x.size(1), ") but w has ", w.size(0), " rows");
  TORCH_CHECK(K >= 1 && w.size(1) % K == 0 && w.size(1) > 0, "softtriple: w has ", w.size(1),
              " columns, not a positive multiple of centers_per_class = ", K);
  TORCH_CHECK(w.size(1) / K < (int64_t(1) << 24), "softtriple (cpu): at most 2^24 classes, got ", w.size(1) / K);
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "softtriple: x and w must have the same dtype, got ",
              x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "softtriple (cpu): x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) && labels.scalar_type() == at::kLong,
              "softtriple: labels must be int64 of shape (", x.size(0), ",), got ", labels.sizes(), " ",
              labels.scalar_type());
  for (const at::Tensor* t : {&x, &labels, &w}) {
    TORCH_CHECK(t->device().is_cpu(), "softtriple (cpu): all tensors must be on the CPU, got ", t->device());
    TORCH_CHECK(t->is_contiguous(), "softtriple: inputs must be contiguous");
  }
}

Params make_params(int64_t K, double la, double gamma, double margin) {
  TORCH_CHECK(gamma > 0.0, "softtriple: gamma must be > 0, got ", gamma);
  return Params{K, la, gamma, margin};
}

std::tuple<at::Tensor, at::Tensor> softtriple_fwd_cpu(const at::Tensor& x, const at::Tensor& labels,
                                                      const at::Tensor& w, int64_t K, double la, double gamma,
                                                      double margin) {
  check_inputs(x, labels, w, K);
  const Params p = make_params(K, la, gamma, margin);
  const int64_t N = x.size(0);
  at::Tensor loss = at::empty({N}, x.options());
  at::Tensor lse = at::empty({N}, x.options());
  if (N == 0) return {loss, lse};
  // the inner GEMMs must not see autograd (autograd of this op is registered in Python)
  const at::Tensor xd = x.detach(), wd = w.detach();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softtriple_fwd_cpu",
                             [&] { forward_kernel<scalar_t>(xd, labels, wd, p, loss, lse); });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> softtriple_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& x,
                                                      const at::Tensor& labels, const at::Tensor& w,
                                                      const at::Tensor& lse, int64_t K, double la, double gamma,
                                                      double margin, bool need_gx, bool need_gw) {
  check_inputs(x, labels, w, K);
  const Params p = make_params(K, la, gamma, margin);
  const int64_t N = x.size(0);
  for (const at::Tensor* t : {&grad_rows, &lse}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == x.scalar_type(),
                "softtriple_bwd: grad_rows and lse must be (", N, ",) of dtype ", x.scalar_type(), ", got ",
                t->sizes(), " ", t->scalar_type());
  }
  at::Tensor gx = need_gx ? at::zeros_like(x) : at::empty({0}, x.options());
  // every column of gw is written exactly once by the thread owning its class tile
  at::Tensor gw = need_gw ? at::empty_like(w) : at::empty({0}, w.options());
  if (N == 0 || (!need_gx && !need_gw)) {
    if (need_gw) gw.zero_();
    return {gx, gw};
  }
  const at::Tensor xd = x.detach(), wd = w.detach();
  const at::Tensor gd = grad_rows.detach().contiguous(), ld = lse.detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softtriple_bwd_cpu", [&] {
    backward_kernel<scalar_t>(gd, xd, labels, wd, ld, p, need_gx, need_gw, gx, gw);
  });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(rll_kernels, CPU, m) {
  m.impl("softtriple_fwd", &softtriple_fwd_cpu);
  m.impl("softtriple_bwd", &softtriple_bwd_cpu);
}

}  // namespace softtriple
