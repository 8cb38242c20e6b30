// Fused SoftTriple loss, CPU kernels (docs/semantics.md §3, fused form §3.4).
//
// x (N, D) are the raw embeddings (any strides): with normalize, the op normalises them itself
// (row_norms.h: scale-safe norms, the non-finite check naming "embeddings", docs/semantics.md §1.4)
// into the contiguous z it returns for the backward, which applies the normalisation's Jacobian to
// dL/dz in its epilogue. The centers w (D, C*K) (column c*K + k = center k of class c) are the raw
// parameter: the kernel scales each center column by 1/|w_ck| (scale-safe, 0 for a zero column) on
// the fly and returns the gradient of the raw parameter, so no normalised copy of W (which, at
// D x C*K, is larger than N x C*K in the target case) is ever made. Labels outside [0, C) and
// non-finite centers raise ValueError here (docs/semantics.md §6), in eager and compiled code.
//
// The classes are streamed in tiles of TC classes (TC*K columns). Per class tile and query tile of
// BQ rows, one GEMM gives the transposed logits tile s^T = W_tile^T X_I^T (TC*K x BQ), so that for
// a fixed center the BQ rows lie contiguous and every per-(i, c) step vectorises across rows: the
// K-softmax S_ic = sum_k softmax_k(s_ick / gamma) s_ick, z_ic = la (S_ic - margin [c = y_i]) and
// an online log-sum-exp over the classes. Forward keeps only LSE_i (and returns
// l_i = LSE_i - z_iy).
//
// Backward (docs/semantics.md §3.3) recomputes each tile, overwrites it with G'_ick = r_ck dL/ds_ick
// (r = 1/|w|) and does two GEMMs: dW[:, tile] = X^T G' into a cache-resident tile buffer, written
// once to dW with the normalisation's projection dW_ck -= r_ck^2 (sum_i G_ick s_ick) w_ck (each
// class tile is owned by one thread: no atomics, no per-thread copies of dW); and dX += G' W_tile^T
// (a per-thread partial dX, summed at the end). Memory: O((N + C K) D) plus per-thread tiles; no
// N x C*K tensor.
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
namespace softtriple {
namespace {

struct Params {
  int64_t K;
  double la, gamma, margin;
};

// 1 / |w_col| per center column (0 for a zero column): the squared norms summed over the rows of
// w, and the columns where that overflows, underflows or is not finite recomputed with the
// scale-safe row_norm of row_norms.h on a gathered copy. A non-finite column raises.
template <class S>
void column_scales(const at::Tensor& w, std::vector<S>& rn) {
  using V = Vectorized<S>;
  const int64_t D = w.size(0), CK = w.size(1);
  const S* WP = w.const_data_ptr<S>();
  rn.assign(CK, S(0));
  at::parallel_for(0, ceil_div(CK, 256), 1, [&](int64_t b0, int64_t b1) {
    std::vector<S> col(D);
    for (int64_t j0 = b0 * 256; j0 < std::min(CK, b1 * 256); j0 += 256) {
      const int64_t nj = std::min<int64_t>(256, CK - j0);
      S* sq = rn.data() + j0;  // squared norms first, in place
      for (int64_t d = 0; d < D; ++d)
        at::vec::map2([](V a, V x) { return a + x * x; }, sq, sq, WP + d * CK + j0, nj);
      for (int64_t j = j0; j < j0 + nj; ++j) {
        S n = std::sqrt(rn[j]);
        if (!(std::isfinite(rn[j]) && rn[j] >= safe_sq_min<S>())) {
          for (int64_t d = 0; d < D; ++d) col[d] = WP[d * CK + j];
          const RowNorm<S> r = row_norm(col.data(), D);
          TORCH_CHECK_VALUE(r.finite, "centers contains NaN or Inf (column ", j, ")");
          n = r.norm;
        }
        rn[j] = n > S(0) ? S(1) / n : S(0);
      }
    }
  });
}

// What both kernels of one call share. Tiling: a class tile has about 256 center columns (W tile
// 256 x D stays in L2), a query tile at most 256 rows; smaller class tiles when there are few
// classes, so that every thread gets work.
template <class S>
struct Problem {
  const at::Tensor& x;
  const at::Tensor& w;
  const int64_t* Y;
  int64_t N, D, CK, K, C;
  int64_t TC, BQ, ntiles;
  int64_t BQP, NP;        // BQ and N padded to whole vectors
  std::vector<S> y;   // NP: labels as S, -1 in the padding
  std::vector<S> rn;  // CK: column scales 1/|w_ck|
  S inv_gamma, la, la_margin;
  Problem(const at::Tensor& x_, const at::Tensor& labels, const at::Tensor& w_, const Params& p)
      : x(x_),
        w(w_),
        Y(labels.data_ptr<int64_t>()),
        N(x_.size(0)),
        D(x_.size(1)),
        CK(w_.size(1)),
        K(p.K),
        C(CK / K),
        TC(tile_size_for_threads(std::max<int64_t>(1, 256 / K), 1, C, 4)),
        BQ(std::min<int64_t>(N, 256)),
        ntiles(ceil_div(C, TC)),
        BQP(vec_pad<S>(BQ)),
        NP(vec_pad<S>(N)),
        y(NP),
        inv_gamma(S(1.0 / p.gamma)),
        la(S(p.la)),
        la_margin(S(p.la * p.margin)) {
    for (int64_t i = 0; i < N; ++i)
      TORCH_CHECK_VALUE(Y[i] >= 0 && Y[i] < C, "labels must lie in [0, num_classes=", C, "), got ", Y[i]);
    copy_padded(Y, N, y.data(), NP, S(-1));
    column_scales<S>(w, rn);
  }
};

// Per (row lane, class): the K-softmax of a class segment of the s^T tile. sc points at the first
// center row of the class, rows are bqp apart. Returns S and the softmax denominator; e_k =
// exp((s_k - max)/gamma) is written to ebuf when it is non-null.
template <class S>
inline void segment(const S* sc, int64_t bqp, int64_t K, const Vectorized<S>& inv_gamma, Vectorized<S>& Sv,
                    Vectorized<S>& den, S* ebuf) {
  using V = Vectorized<S>;
  V mx = V::loadu(sc);
  for (int64_t k = 1; k < K; ++k) mx = at::vec::maximum(mx, V::loadu(sc + k * bqp));
  V d(S(0)), num(S(0));
  for (int64_t k = 0; k < K; ++k) {
    const V s = V::loadu(sc + k * bqp);
    const V e = ((s - mx) * inv_gamma).exp();
    d = d + e;
    num = num + e * s;
    if (ebuf) e.store(ebuf + k * V::size());
  }
  Sv = num / d;
  den = d;
}

// The logits tile s^T (tck centers x bq rows at i0, row stride BQP) of the normalised centers of
// one class tile (columns wT = W_tile^T) into sbuf; returns it as a tensor.
template <class S>
at::Tensor logits_tile(const Problem<S>& pb, S* sbuf, const at::Tensor& wT, const S* rn, int64_t i0, int64_t bq) {
  using V = Vectorized<S>;
  const int64_t tck = wT.size(0);
  at::Tensor s_t = at::from_blob(sbuf, {tck, bq}, {pb.BQP, 1}, pb.x.options());
  at::mm_out(s_t, wT, pb.x.narrow(0, i0, bq).t());
  for (int64_t j = 0; j < tck; ++j) {  // rows (centers) times 1/|w|
    const V r(rn[j]);
    S* row = sbuf + j * pb.BQP;
    for (int64_t v = 0; v < pb.BQP; v += V::size()) (V::loadu(row + v) * r).store(row + v);
  }
  return s_t;
}

// ================================================================ forward
// Folds classes c0..c0+tc (logits in sbuf) into the online log-sum-exp (m, l) of rows i0..i0+bq
// of this thread, and records the logit z_iy of the rows whose class is in the tile.
template <class S>
void fold_class_tile_into_lse(const Problem<S>& pb, const S* sbuf, S* zbuf, S* m, S* l, S* z_target, int64_t i0,
                              int64_t bq, int64_t c0, int64_t tc) {
  using V = Vectorized<S>;
  const int64_t W = V::size(), K = pb.K, BQP = pb.BQP;
  const V inv_gamma(pb.inv_gamma), la(pb.la), la_margin(pb.la_margin);
  for (int64_t v = 0; v < bq; v += W) {
    const V y = V::loadu(pb.y.data() + i0 + v);
    V tile_max(neg_inf<S>());
    for (int64_t c = 0; c < tc; ++c) {
      V Sv, den;
      segment<S>(sbuf + c * K * BQP + v, BQP, K, inv_gamma, Sv, den, nullptr);
      const V is_y = V::blendv(V(S(0)), V(S(1)), y == V(S(c0 + c)));
      const V z = la * Sv - la_margin * is_y;
      z.store(zbuf + c * BQP + v);
      tile_max = at::vec::maximum(tile_max, z);
    }
    // online LSE: rescale the running sum once per tile, one exp per (i, c)
    const V m_old = V::loadu(m + i0 + v);
    const V m_new = at::vec::maximum(m_old, tile_max);
    V lv = V::loadu(l + i0 + v) * (m_old - m_new).exp();
    // lanes with m_old = m_new = -inf cannot occur: tile_max is finite
    for (int64_t c = 0; c < tc; ++c) lv = lv + (V::loadu(zbuf + c * BQP + v) - m_new).exp();
    m_new.store(m + i0 + v);
    lv.store(l + i0 + v);
  }
  // the logit of the true class, written by the one thread owning that class
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t cy = pb.Y[i0 + r] - c0;
    if (cy >= 0 && cy < tc) z_target[i0 + r] = zbuf[cy * BQP + r];
  }
}

// LSE_i from the per-thread online states (m, l) (threads x NP each), and l_i = LSE_i - z_iy.
template <class S>
void merge_thread_lse(const Problem<S>& pb, const std::vector<S>& m, const std::vector<S>& l,
                      const std::vector<S>& z_target, int64_t nthreads, S* loss, S* lse) {
  for (int64_t i = 0; i < pb.N; ++i) {
    S mi = neg_inf<S>();
    for (int64_t th = 0; th < nthreads; ++th) mi = std::max(mi, m[th * pb.NP + i]);
    S li = 0;
    for (int64_t th = 0; th < nthreads; ++th) {
      const S mt = m[th * pb.NP + i];
      if (mt != neg_inf<S>()) li += l[th * pb.NP + i] * std::exp(mt - mi);
    }
    lse[i] = mi + std::log(li);
    loss[i] = lse[i] - z_target[i];
  }
}

template <class S>
void forward_kernel(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w, const Params& p,
                    at::Tensor& loss, at::Tensor& lse) {
  const Problem<S> pb(x, labels, w, p);
  const int64_t nthreads = at::get_num_threads();
  // per-thread online LSE state per row: running max and sum of exp
  std::vector<S> m(nthreads * pb.NP, neg_inf<S>()), l(nthreads * pb.NP, S(0));
  std::vector<S> z_target(pb.N, S(0));
  at::parallel_for(0, pb.ntiles, 1, [&](int64_t t0, int64_t t1) {
    const int64_t tid = at::get_thread_num();
    std::vector<S> sbuf(pb.TC * pb.K * pb.BQP, S(0)), zbuf(pb.TC * pb.BQP, S(0));
    for (int64_t c_tile = t0; c_tile < t1; ++c_tile) {
      const int64_t c0 = c_tile * pb.TC, tc = std::min(pb.TC, pb.C - c0), tck = tc * pb.K;
      const at::Tensor wT = w.narrow(1, c0 * pb.K, tck).t();  // (tck, D)
      for (int64_t i0 = 0; i0 < pb.N; i0 += pb.BQ) {
        const int64_t bq = std::min(pb.BQ, pb.N - i0);
        logits_tile(pb, sbuf.data(), wT, pb.rn.data() + c0 * pb.K, i0, bq);
        fold_class_tile_into_lse(pb, sbuf.data(), zbuf.data(), m.data() + tid * pb.NP, l.data() + tid * pb.NP,
                                 z_target.data(), i0, bq, c0, tc);
      }
    }
  });
  merge_thread_lse(pb, m, l, z_target, nthreads, loss.data_ptr<S>(), lse.data_ptr<S>());
}

// ================================================================ backward
// Per-thread buffers of the backward.
template <class S>
struct BackwardTile {
  std::vector<S> sbuf, ebuf, cs, coef, iota;
  std::vector<S> wbuf;  // this tile's dW (D x tck), accumulated over the query tiles in cache, then written once
  BackwardTile(const Problem<S>& pb, bool need_gw)
      : sbuf(pb.TC * pb.K * pb.BQP, S(0)),
        ebuf(pb.K * Vectorized<S>::size()),
        cs(pb.TC * pb.K * Vectorized<S>::size()),
        coef(pb.TC * pb.K),
        iota(Vectorized<S>::size()),
        wbuf(need_gw ? pb.D * pb.TC * pb.K : 0) {
    for (int64_t l = 0; l < static_cast<int64_t>(iota.size()); ++l) iota[l] = S(l);
  }
};

// Overwrites the logits tile of classes c0..c0+tc and rows i0..i0+bq with G'_ick = r_ck dL/ds_ick
// and adds G_ick s_ick to the per-lane column sums T.cs (for the projection).
template <class S>
void logit_grads_of_tile(const Problem<S>& pb, BackwardTile<S>& tile, const S* lse, const S* g_la, const S* rt,
                         int64_t i0, int64_t bq, int64_t c0, int64_t tc) {
  using V = Vectorized<S>;
  const int64_t W = V::size(), K = pb.K, BQP = pb.BQP;
  const V inv_gamma(pb.inv_gamma), la(pb.la), la_margin(pb.la_margin), one(S(1));
  for (int64_t v = 0; v < bq; v += W) {
    const V y = V::loadu(pb.y.data() + i0 + v);
    const V lv = V::loadu(lse + i0 + v);
    const V gl = V::loadu(g_la + i0 + v);
    // lanes past the tile's rows hold stale values: their coefficient is forced to 0 (a blend,
    // so even an overflowed exp there cannot leak a NaN into the column sums)
    const V valid = V::loadu(tile.iota.data()) < V(S(bq - v));
    for (int64_t c = 0; c < tc; ++c) {
      S* sc = tile.sbuf.data() + c * K * BQP + v;
      V Sv, den;
      segment<S>(sc, BQP, K, inv_gamma, Sv, den, tile.ebuf.data());
      const V is_y = V::blendv(V(S(0)), one, y == V(S(c0 + c)));
      const V z = la * Sv - la_margin * is_y;
      // dl/dS_ic = g_i la (P_ic - [c = y_i]); dS/ds_k = q_k (1 + (s_k - S)/gamma)
      const V a = V::blendv(V(S(0)), gl * ((z - lv).exp() - is_y) / den, valid);
      for (int64_t k = 0; k < K; ++k) {
        const V s = V::loadu(sc + k * BQP);
        const V e = V::loadu(tile.ebuf.data() + k * W);
        const V g = a * e * (one + (s - Sv) * inv_gamma);  // dL/ds_ick
        S* cs = tile.cs.data() + (c * K + k) * W;
        (V::loadu(cs) + g * s).store(cs);
        (g * V(rt[c * K + k])).store(sc + k * BQP);
      }
    }
  }
}

// dW[:, col0 + j] = wbuf[:, j] - (r sum_i G_ij s_ij) (r w[:, col0 + j]), the projection of the center
// normalisation (docs/semantics.md §3.3), as two factors of r: r^2 alone underflows for large columns.
template <class S>
void write_center_grads(const Problem<S>& pb, BackwardTile<S>& tile, S* GW, int64_t col0, int64_t tck) {
  using V = Vectorized<S>;
  const int64_t W = V::size(), CK = pb.CK;
  const S* WP = pb.w.template data_ptr<S>();
  const S* rt = pb.rn.data() + col0;
  for (int64_t j = 0; j < tck; ++j) {
    S cs = 0;
    for (int64_t l = 0; l < W; ++l) cs += tile.cs[j * W + l];
    tile.coef[j] = rt[j] * cs;
  }
  const S* cf = tile.coef.data();
  for (int64_t d = 0; d < pb.D; ++d) {
    S* g = GW + d * CK + col0;
    const S* b = tile.wbuf.data() + d * tck;
    const S* wr = WP + d * CK + col0;
    int64_t j = 0;
    for (; j + W <= tck; j += W)
      (V::loadu(b + j) - V::loadu(cf + j) * (V::loadu(rt + j) * V::loadu(wr + j))).store(g + j);
    for (; j < tck; ++j) g[j] = b[j] - cf[j] * (rt[j] * wr[j]);
  }
}

// One class tile against every query tile: dW of its columns (written once), dX into gx_part.
template <class S>
void backward_class_tile(const Problem<S>& pb, BackwardTile<S>& tile, const S* lse, const S* g_la, int64_t c_tile,
                         bool need_gx, bool need_gw, at::Tensor& gx_part, S* GW) {
  const int64_t c0 = c_tile * pb.TC, tc = std::min(pb.TC, pb.C - c0), tck = tc * pb.K, col0 = c0 * pb.K;
  const at::Tensor wT = pb.w.narrow(1, col0, tck).t();  // (tck, D)
  const S* rt = pb.rn.data() + col0;
  std::fill(tile.cs.begin(), tile.cs.end(), S(0));
  for (int64_t i0 = 0; i0 < pb.N; i0 += pb.BQ) {
    const int64_t bq = std::min(pb.BQ, pb.N - i0);
    const at::Tensor xI = pb.x.narrow(0, i0, bq);
    const at::Tensor s_t = logits_tile(pb, tile.sbuf.data(), wT, rt, i0, bq);
    logit_grads_of_tile(pb, tile, lse, g_la, rt, i0, bq, c0, tc);
    // s_t now holds G'^T (tck x bq)
    if (need_gw) {
      at::Tensor wb = at::from_blob(tile.wbuf.data(), {pb.D, tck}, pb.x.options());
      if (i0 == 0) {
        at::mm_out(wb, xI.t(), s_t.t());
      } else {
        wb.addmm_(xI.t(), s_t.t());
      }
    }
    if (need_gx) gx_part.narrow(0, i0, bq).addmm_(s_t.t(), wT);
  }
  if (need_gw) write_center_grads(pb, tile, GW, col0, tck);
}

template <class S>
void backward_kernel(const at::Tensor& g_rows, const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w,
                     const at::Tensor& lse, const Params& p, bool need_gx, bool need_gw, at::Tensor& gx,
                     at::Tensor& gw) {
  const Problem<S> pb(x, labels, w, p);
  std::vector<S> lse_p(pb.NP, S(0)), g_la(pb.NP, S(0));  // padded: LSE_i and g_i la
  const S* G = g_rows.data_ptr<S>();
  copy_padded(lse.data_ptr<S>(), pb.N, lse_p.data(), pb.NP, S(0));
  for (int64_t i = 0; i < pb.N; ++i) g_la[i] = G[i] * S(p.la);
  at::Tensor gx_parts = need_gx ? zeros_per_thread({pb.N, pb.D}, x.options()) : at::Tensor();
  S* GW = need_gw ? gw.data_ptr<S>() : nullptr;
  at::parallel_for(0, pb.ntiles, 1, [&](int64_t t0, int64_t t1) {
    const int64_t tid = at::get_thread_num();
    BackwardTile<S> tile(pb, need_gw);
    at::Tensor gx_part = need_gx ? gx_parts[tid] : at::Tensor();
    for (int64_t c_tile = t0; c_tile < t1; ++c_tile)
      backward_class_tile(pb, tile, lse_p.data(), g_la.data(), c_tile, need_gx, need_gw, gx_part, GW);
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
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "softtriple: x and w must have the same dtype, got ", x.scalar_type(),
              " and ", w.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "softtriple (cpu): x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) && labels.scalar_type() == at::kLong,
              "softtriple: labels must be int64 of shape (", x.size(0), ",), got ", labels.sizes(), " ",
              labels.scalar_type());
  for (const at::Tensor* t : {&x, &labels, &w})
    TORCH_CHECK(t->device().is_cpu(), "softtriple (cpu): all tensors must be on the CPU, got ", t->device());
}

Params make_params(int64_t K, double la, double gamma, double margin) {
  TORCH_CHECK(gamma > 0.0, "softtriple: gamma must be > 0, got ", gamma);
  return Params{K, la, gamma, margin};
}

// The rows the kernels read, contiguous: z = x/|x| into z_out with |x| into norms_out (normalize),
// or x itself; either way a non-finite row raises, naming "embeddings" (docs/semantics.md §6).
at::Tensor embedding_rows(const at::Tensor& x, bool normalize, at::Tensor& z_out, at::Tensor& norms_out) {
  const int64_t N = x.size(0), D = x.size(1);
  if (!normalize) {
    const at::Tensor xc = x.contiguous();
    at::Tensor sq = at::empty({N}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softtriple_rows", [&] {
      check_finite_rows(sq_norms_checked<scalar_t>(xc, sq.data_ptr<scalar_t>()), "embeddings");
    });
    return xc;
  }
  z_out = at::empty({N, D}, x.options());
  norms_out = at::empty({N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softtriple_rows", [&] {
    std::vector<scalar_t> z_sq(N);
    scalar_t* Z = z_out.data_ptr<scalar_t>();
    check_finite_rows(normalize_rows<scalar_t>(x, Z, norms_out.data_ptr<scalar_t>(), z_sq.data()), "embeddings");
  });
  return z_out;
}

// Returns (l_i (N,), LSE_i (N,), z (N, D) and |x_i| (N,) with normalize, else (0,) each).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softtriple_fwd_cpu(const at::Tensor& x,
                                                                              const at::Tensor& labels,
                                                                              const at::Tensor& w, int64_t K, double la,
                                                                              double gamma, double margin,
                                                                              bool normalize) {
  check_inputs(x, labels, w, K);
  const Params p = make_params(K, la, gamma, margin);
  const int64_t N = x.size(0);
  at::Tensor loss = at::empty({N}, x.options());
  at::Tensor lse = at::empty({N}, x.options());
  at::Tensor z = at::empty({0}, x.options()), norms = at::empty({0}, x.options());
  // the inner GEMMs must not see autograd (autograd of this op is registered in Python)
  const at::Tensor rows = embedding_rows(x.detach(), normalize, z, norms);
  const at::Tensor wd = w.detach().contiguous();
  if (N == 0) return {loss, lse, z, norms};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softtriple_fwd_cpu",
                             [&] { forward_kernel<scalar_t>(rows, labels.contiguous(), wd, p, loss, lse); });
  return {loss, lse, z, norms};
}

std::tuple<at::Tensor, at::Tensor> softtriple_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& x,
                                                      const at::Tensor& labels, const at::Tensor& w,
                                                      const at::Tensor& lse, const at::Tensor& z,
                                                      const at::Tensor& norms, int64_t K, double la, double gamma,
                                                      double margin, bool normalize, bool need_gx, bool need_gw) {
  check_inputs(x, labels, w, K);
  const Params p = make_params(K, la, gamma, margin);
  const int64_t N = x.size(0), D = x.size(1);
  for (const at::Tensor* t : {&grad_rows, &lse}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == x.scalar_type(),
                "softtriple_bwd: grad_rows and lse must be (", N, ",) of dtype ", x.scalar_type(), ", got ", t->sizes(),
                " ", t->scalar_type());
  }
  if (normalize)
    TORCH_CHECK(z.sizes() == x.sizes() && norms.dim() == 1 && norms.size(0) == N && z.is_contiguous() &&
                    z.scalar_type() == x.scalar_type() && norms.scalar_type() == x.scalar_type(),
                "softtriple_bwd: z and norms must be the forward's (", N, ", ", D, ") and (", N, ",)");
  at::Tensor gx = need_gx ? at::zeros({N, D}, x.options()) : at::empty({0}, x.options());
  // every column of gw is written exactly once by the thread owning its class tile
  at::Tensor gw = need_gw ? at::empty({w.size(0), w.size(1)}, w.options()) : at::empty({0}, w.options());
  if (N == 0 || (!need_gx && !need_gw)) {
    if (need_gw) gw.zero_();
    return {gx, gw};
  }
  const at::Tensor rows = normalize ? z.detach() : x.detach().contiguous(), wd = w.detach().contiguous();
  const at::Tensor gd = grad_rows.detach().contiguous(), ld = lse.detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softtriple_bwd_cpu", [&] {
    backward_kernel<scalar_t>(gd, rows, labels.contiguous(), wd, ld, p, need_gx, need_gw, gx, gw);
    if (need_gx && normalize)  // dL/dx from dL/dz: the normalisation's Jacobian, row by row
      normalize_backward_rows(gx.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(), norms.data_ptr<scalar_t>(), N, D);
  });
  return {gx, gw};
}

}  // namespace
}  // namespace softtriple

// This build's SoftTriple kernels (csrc/cpu_capability.h); cpu_dispatch.cpp registers those of the build it picks.
void register_softtriple_cpu_kernels(torch::Library& m) {
  m.impl("softtriple_fwd", &softtriple::softtriple_fwd_cpu);
  m.impl("softtriple_bwd", &softtriple::softtriple_bwd_cpu);
}

RLL_CPU_CAPABILITY_END
}  // namespace rll
