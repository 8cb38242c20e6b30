// Fused Ranked List Loss, CPU kernels (SPEC section 1).
//
// Per block of BQ queries, the gallery is streamed in tiles of BK rows: the distance tile comes
// from one GEMM (Q_I K_J^T), masks and weights are computed with SIMD vectors, and per query row
// the two sets keep an online (max, sum exp, sum exp * value) state. "paper" semantics also
// accumulates the query gradient in the same pass: sum_j c_ij (z_i - z_j) =
// (sum_j c_ij) z_i - (C K_J)_i, one more GEMM per tile, rescaled when the running max moves.
// No N x M matrix is ever held: memory is O((N + M) D) plus per-thread tiles.
// The backward kernel (rll_bwd_cpu) serves "pml" semantics: it recomputes each tile with the
// saved row statistics and writes both the query and the gallery gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace rll {
using at::vec::Vectorized;
// Vector overloads of the primitives rll_pair.h is written against.
template <class S>
inline Vectorized<S> rll_select(const Vectorized<S>& m, const Vectorized<S>& a, const Vectorized<S>& b) {
  return Vectorized<S>::blendv(b, a, m);
}
template <class S>
inline Vectorized<S> rll_max(const Vectorized<S>& a, const Vectorized<S>& b) { return at::vec::maximum(a, b); }
template <class S>
inline Vectorized<S> rll_sqrt(const Vectorized<S>& x) { return x.sqrt(); }
template <class S>
inline Vectorized<S> rll_exp(const Vectorized<S>& x) { return x.exp(); }
}  // namespace rll

#include "rll_pair.h"

namespace rll {
namespace {

template <class S>
inline S hsum(const Vectorized<S>& v) {
  return at::vec::vec_reduce_all<S>([](Vectorized<S>& a, Vectorized<S>& b) { return a + b; }, v);
}
template <class S>
inline S hmax(const Vectorized<S>& v) {
  return at::vec::vec_reduce_all<S>([](Vectorized<S>& a, Vectorized<S>& b) { return at::vec::maximum(a, b); },
                                    v);
}

// Tile sizes: a K tile of BK x D stays in L2 (2 MiB here); BQ x BK tiles stay in L1/L2.
struct Tiling {
  int64_t bq, bk;
};
inline Tiling choose_tiling(int64_t N, int64_t D) {
  const int64_t bk = D <= 256 ? 512 : 256;
  int64_t bq = 64;
  // keep both threads busy on small query sets (bank case: N = 256 queries)
  const int64_t threads = at::get_num_threads();
  while (bq > 16 && (N + bq - 1) / bq < 2 * threads) bq /= 2;
  return {bq, bk};
}

// Per-row, per-tile label/exclusion masks (1 or 0 in the value type, so they load as vectors).
// Pads columns [bk, bk_pad) with 0 so vector tails are inert. Branch-free so it vectorises.
template <class S>
inline void row_masks(int64_t i, int64_t j0, int64_t bk, int64_t bk_pad, const int64_t* ql, const int64_t* qid,
                      const int64_t* kl, const int64_t* kid, S* same, S* diff) {
  const int64_t li = ql[i];
  const int64_t* klj = kl + j0;
  if (qid == nullptr) {
    for (int64_t c = 0; c < bk; ++c) {
      const S s = klj[c] == li ? S(1) : S(0);
      same[c] = s;
      diff[c] = S(1) - s;
    }
  } else {
    const int64_t idi = qid[i];
    const int64_t* kidj = kid + j0;
    for (int64_t c = 0; c < bk; ++c) {
      const S valid = kidj[c] != idi ? S(1) : S(0);
      const S s = klj[c] == li ? S(1) : S(0);
      same[c] = valid * s;
      diff[c] = valid * (S(1) - s);
    }
  }
  for (int64_t c = bk; c < bk_pad; ++c) same[c] = diff[c] = S(0);
}

template <class S>
void rll_forward_kernel(const at::Tensor& q, const at::Tensor& ql, const c10::optional<at::Tensor>& qid_t,
                        const at::Tensor& k, const at::Tensor& kl, const c10::optional<at::Tensor>& kid_t,
                        const Params<S> prm, bool paper_grad, at::Tensor& loss, at::Tensor& gradq,
                        at::Tensor& stats) {
  using V = Vectorized<S>;
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  const S* Q = q.data_ptr<S>();
  const int64_t* QL = ql.data_ptr<int64_t>();
  const int64_t* KL = kl.data_ptr<int64_t>();
  const int64_t* QID = qid_t.has_value() ? qid_t->data_ptr<int64_t>() : nullptr;
  const int64_t* KID = kid_t.has_value() ? kid_t->data_ptr<int64_t>() : nullptr;
  S* LOSS = loss.data_ptr<S>();
  S* STATS = stats.data_ptr<S>();
  S* GQ = paper_grad ? gradq.data_ptr<S>() : nullptr;
  const at::Tensor nq_t = (q * q).sum(1);
  const at::Tensor nk_t = (k * k).sum(1);
  const S* NQ = nq_t.data_ptr<S>();
  const S* NK = nk_t.data_ptr<S>();
  const S rel = dup_rel<S>();

  const Tiling tl = choose_tiling(N, D);
  const int64_t BQ = tl.bq, BK = tl.bk;
  const int64_t W = V::size();
  const int64_t BKP = (BK + W - 1) / W * W;
  const int64_t nblocks = (N + BQ - 1) / BQ;
  const auto opts = q.options();

  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<S> sbuf(BQ * BK), cp(BQ * BK), cn(BQ * BK);
    std::vector<S> same(BKP), diff(BKP), sp(BKP), sn(BKP), vp(BKP), vn(BKP), inv(BKP), nkp(BKP);
    std::vector<char> has_pos(BQ);
    std::vector<OnlineRow<S>> rp(BQ), rn(BQ);
    std::vector<S> csp(BQ), csn(BQ);
    at::Tensor accp, accn;
    if (paper_grad) {
      accp = at::empty({BQ, D}, opts);
      accn = at::empty({BQ, D}, opts);
    }
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * BQ, bq = std::min(BQ, N - i0);
      const at::Tensor qI = q.narrow(0, i0, bq);
      std::fill(rp.begin(), rp.end(), OnlineRow<S>{});
      std::fill(rn.begin(), rn.end(), OnlineRow<S>{});
      std::fill(csp.begin(), csp.end(), S(0));
      std::fill(csn.begin(), csn.end(), S(0));
      if (paper_grad) {
        accp.zero_();
        accn.zero_();
      }
      for (int64_t j0 = 0; j0 < M; j0 += BK) {
        const int64_t bk = std::min(BK, M - j0);
        const at::Tensor kJ = k.narrow(0, j0, bk);
        at::Tensor s_t = at::from_blob(sbuf.data(), {bq, bk}, opts);
        at::mm_out(s_t, qI, kJ.t());
        std::copy(NK + j0, NK + j0 + bk, nkp.begin());
        std::fill(nkp.begin() + bk, nkp.end(), S(0));
        int64_t tile_pos = 0;
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t i = i0 + r;
          row_masks<S>(i, j0, bk, BKP, QL, QID, KL, KID, same.data(), diff.data());
          const S* srow = sbuf.data() + r * bk;
          const V nqi(NQ[i]);
          V mxp(neg_inf<S>()), mxn(neg_inf<S>());
          for (int64_t c = 0; c < BKP; c += W) {
            const int64_t cnt = std::min(W, bk - c);
            const V dot = cnt > 0 ? V::loadu(srow + c, cnt) : V(S(0));
            const V nk = V::loadu(nkp.data() + c);
            const V d2 = gram_d2(dot, nqi, nk);
            const auto dup = is_dup(d2, nqi, nk, rel);
            const V d = pair_dist(d2, dup);
            const V sm = V::loadu(same.data() + c) != V(S(0));
            const V df = V::loadu(diff.data() + c) != V(S(0));
            const V pos = in_pos(sm, d, prm), neg = in_neg(df, d, prm);
            const V vpv = pos_value(d, prm), vnv = neg_value(d, prm);
            const V spv = masked_logit(pos, vpv, prm.Tp), snv = masked_logit(neg, vnv, prm.Tn);
            spv.store(sp.data() + c);
            snv.store(sn.data() + c);
            vpv.store(vp.data() + c);
            vnv.store(vn.data() + c);
            pair_inv_dist(d, dup).store(inv.data() + c);
            mxp = at::vec::maximum(mxp, spv);
            mxn = at::vec::maximum(mxn, snv);
          }
          S* cprow = cp.data() + r * bk;
          S* cnrow = cn.data() + r * bk;
          // one set at a time: (online state, its logits, values, coefficient row, coef sum, accumulator)
          auto run_set = [&](OnlineRow<S>& st, const S* lg, const S* val, S* crow, S& csum, at::Tensor* acc,
                             S tile_max) -> bool {
            if (tile_max == neg_inf<S>()) {
              if (paper_grad) std::fill(crow, crow + bk, S(0));
              return false;
            }
            const S f = online_begin_tile(st, tile_max);
            if (paper_grad && f != S(1)) {
              csum *= f;
              S* a = acc->data_ptr<S>() + r * D;
              for (int64_t e = 0; e < D; ++e) a[e] *= f;
            }
            V lsum(S(0)), asum(S(0)), csv(S(0));
            for (int64_t c = 0; c < BKP; c += W) {
              const V w = online_weight(V::loadu(lg + c), st);
              lsum = lsum + w;
              asum = asum + w * V::loadu(val + c);
              if (paper_grad) {
                const V cc = w * V::loadu(inv.data() + c);
                csv = csv + cc;
                const int64_t cnt = std::min(W, bk - c);
                if (cnt > 0) cc.store(crow + c, cnt);
              }
            }
            st.l += hsum(lsum);
            st.a += hsum(asum);
            csum += hsum(csv);
            return true;
          };
          const bool hp = run_set(rp[r], sp.data(), vp.data(), cprow, csp[r], &accp, hmax(mxp));
          run_set(rn[r], sn.data(), vn.data(), cnrow, csn[r], &accn, hmax(mxn));
          has_pos[r] = hp;
          if (hp && paper_grad) {
            for (int64_t c = 0; c < bk; ++c) tile_pos += cprow[c] != S(0);
          }
        }
        if (paper_grad) {
          const at::Tensor cn_t = at::from_blob(cn.data(), {bq, bk}, opts);
          accn.narrow(0, 0, bq).addmm_(cn_t, kJ);
          // positives are few in typical P x K batches: sparse row updates unless the tile is dense
          if (tile_pos * 8 > bq * bk) {
            const at::Tensor cp_t = at::from_blob(cp.data(), {bq, bk}, opts);
            accp.narrow(0, 0, bq).addmm_(cp_t, kJ);
          } else if (tile_pos > 0) {
            S* AP = accp.data_ptr<S>();
            const S* KJ = kJ.data_ptr<S>();
            for (int64_t r = 0; r < bq; ++r) {
              if (!has_pos[r]) continue;
              const S* cprow = cp.data() + r * bk;
              for (int64_t c = 0; c < bk; ++c) {
                const S w = cprow[c];
                if (w == S(0)) continue;
                S* a = AP + r * D;
                const S* kr = KJ + c * D;
                for (int64_t e = 0; e < D; ++e) a[e] += w * kr[e];
              }
            }
          }
        }
      }
      // finish the rows of this block
      const S* AP = paper_grad ? accp.data_ptr<S>() : nullptr;
      const S* AN = paper_grad ? accn.data_ptr<S>() : nullptr;
      for (int64_t r = 0; r < bq; ++r) {
        const int64_t i = i0 + r;
        const SetStats<S> stp = online_finish(rp[r], prm.den_bias);
        const SetStats<S> stn = online_finish(rn[r], prm.den_bias);
        LOSS[i] = row_loss(stp.L, stn.L, prm);
        S* st = STATS + i * 4;
        st[0] = stp.logden;
        st[1] = stp.L;
        st[2] = stn.logden;
        st[3] = stn.L;
        if (!paper_grad) continue;
        // dL/dz_i = sum_set sign * lam_set / den_set * (csum z_i - acc_i); weights in units of e^m
        const S fp = stp.logden == neg_inf<S>() ? S(0) : (S(1) - prm.lam) * rll_exp(rp[r].m - stp.logden);
        const S fn = stn.logden == neg_inf<S>() ? S(0) : -prm.lam * rll_exp(rn[r].m - stn.logden);
        const S* zi = Q + i * D;
        const S* ap = AP + r * D;
        const S* an = AN + r * D;
        S* g = GQ + i * D;
        const S cz = fp * csp[r] + fn * csn[r];
        for (int64_t e = 0; e < D; ++e) g[e] = cz * zi[e] - fp * ap[e] - fn * an[e];
      }
    }
  });
}

template <class S>
void rll_backward_kernel(const at::Tensor& grad_rows, const at::Tensor& q, const at::Tensor& ql,
                         const c10::optional<at::Tensor>& qid_t, const at::Tensor& k, const at::Tensor& kl,
                         const c10::optional<at::Tensor>& kid_t, const at::Tensor& stats, const Params<S> prm,
                         bool attached, bool need_gq, bool need_gk, at::Tensor& gq, at::Tensor& gk) {
  using V = Vectorized<S>;
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  const int64_t* QL = ql.data_ptr<int64_t>();
  const int64_t* KL = kl.data_ptr<int64_t>();
  const int64_t* QID = qid_t.has_value() ? qid_t->data_ptr<int64_t>() : nullptr;
  const int64_t* KID = kid_t.has_value() ? kid_t->data_ptr<int64_t>() : nullptr;
  const S* G = grad_rows.data_ptr<S>();
  const S* STATS = stats.data_ptr<S>();
  const at::Tensor nq_t = (q * q).sum(1);
  const at::Tensor nk_t = (k * k).sum(1);
  const S* NQ = nq_t.data_ptr<S>();
  const S* NK = nk_t.data_ptr<S>();
  const S rel = dup_rel<S>();

  const Tiling tl = choose_tiling(N, D);
  const int64_t BQ = tl.bq, BK = tl.bk;
  const int64_t W = V::size();
  const int64_t BKP = (BK + W - 1) / W * W;
  const int64_t nblocks = (N + BQ - 1) / BQ;
  const auto opts = q.options();
  const int64_t nthreads = at::get_num_threads();
  // Gallery gradients of different query blocks hit the same rows: one buffer per thread, summed.
  at::Tensor gk_parts = need_gk ? at::zeros({nthreads, M, D}, opts) : at::Tensor();
  at::Tensor colsum_parts = need_gk ? at::zeros({nthreads, M}, opts) : at::Tensor();

  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t tid = at::get_thread_num();
    std::vector<S> sbuf(BQ * BK), gbuf(BQ * BK);
    std::vector<S> same(BKP), diff(BKP), nkp(BKP), rowsum(BQ);
    S* CS = need_gk ? colsum_parts[tid].data_ptr<S>() : nullptr;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * BQ, bq = std::min(BQ, N - i0);
      const at::Tensor qI = q.narrow(0, i0, bq);
      std::fill(rowsum.begin(), rowsum.end(), S(0));
      for (int64_t j0 = 0; j0 < M; j0 += BK) {
        const int64_t bk = std::min(BK, M - j0);
        const at::Tensor kJ = k.narrow(0, j0, bk);
        at::Tensor s_t = at::from_blob(sbuf.data(), {bq, bk}, opts);
        at::mm_out(s_t, qI, kJ.t());
        std::copy(NK + j0, NK + j0 + bk, nkp.begin());
        std::fill(nkp.begin() + bk, nkp.end(), S(0));
        bool any = false;
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t i = i0 + r;
          const S* st = STATS + i * 4;
          const S lgp = st[0], Lp = st[1], lgn = st[2], Ln = st[3];
          const bool hasp = lgp != neg_inf<S>(), hasn = lgn != neg_inf<S>();
          S* grow = gbuf.data() + r * bk;
          if ((!hasp && !hasn) || G[i] == S(0)) {
            std::fill(grow, grow + bk, S(0));
            continue;
          }
          row_masks<S>(i, j0, bk, BKP, QL, QID, KL, KID, same.data(), diff.data());
          const S* srow = sbuf.data() + r * bk;
          const V nqi(NQ[i]);
          const S wp = (S(1) - prm.lam) * G[i], wn = prm.lam * G[i];
          V rs(S(0));
          for (int64_t c = 0; c < BKP; c += W) {
            const int64_t cnt = std::min(W, bk - c);
            if (cnt <= 0) break;
            const V dot = V::loadu(srow + c, cnt);
            const V nk = V::loadu(nkp.data() + c);
            const V d2 = gram_d2(dot, nqi, nk);
            const auto dup = is_dup(d2, nqi, nk, rel);
            const V d = pair_dist(d2, dup);
            V coef(S(0));
            if (hasp) {
              const V pos = in_pos(V::loadu(same.data() + c) != V(S(0)), d, prm);
              const V v = pos_value(d, prm);
              const V p = final_weight(masked_logit(pos, v, prm.Tp), lgp);
              coef = coef + V(wp) * pos_coef(p, v, Lp, prm.Tp, attached);
            }
            if (hasn) {
              const V neg = in_neg(V::loadu(diff.data() + c) != V(S(0)), d, prm);
              const V v = neg_value(d, prm);
              const V p = final_weight(masked_logit(neg, v, prm.Tn), lgn);
              coef = coef + V(wn) * neg_coef(p, v, Ln, prm.Tn, attached);
            }
            const V gv = coef * pair_inv_dist(d, dup);
            rs = rs + gv;
            gv.store(grow + c, cnt);
          }
          rowsum[r] += hsum(rs);
          any = true;
        }
        if (!any) continue;
        const at::Tensor g_t = at::from_blob(gbuf.data(), {bq, bk}, opts);
        // dL/dq_i = sum_j G_ij (q_i - k_j); dL/dk_j = sum_i G_ij (k_j - q_i)
        if (need_gq) gq.narrow(0, i0, bq).addmm_(g_t, kJ, S(1), S(-1));
        if (need_gk) {
          gk_parts[tid].narrow(0, j0, bk).addmm_(g_t.t(), qI, S(1), S(-1));
          for (int64_t r = 0; r < bq; ++r) {
            const S* grow = gbuf.data() + r * bk;
            for (int64_t c = 0; c < bk; ++c) CS[j0 + c] += grow[c];
          }
        }
      }
      if (need_gq) gq.narrow(0, i0, bq).addcmul_(qI, at::from_blob(rowsum.data(), {bq, 1}, opts));
    }
  });
  if (need_gk) {
    gk.copy_(gk_parts.sum(0));
    gk.addcmul_(k, colsum_parts.sum(0).unsqueeze(1));
  }
}

// ---------------------------------------------------------------- argument checks
void check_inputs(const at::Tensor& q, const at::Tensor& ql, const c10::optional<at::Tensor>& qid,
                  const at::Tensor& k, const at::Tensor& kl, const c10::optional<at::Tensor>& kid) {
  TORCH_CHECK(q.dim() == 2, "rll: q must be 2-D (N, D), got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 2, "rll: k must be 2-D (M, D), got ", k.dim(), "-D");
  TORCH_CHECK(q.size(1) == k.size(1), "rll: q and k must have the same embedding size, got ", q.size(1),
              " and ", k.size(1));
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "rll: q and k must have the same dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "rll (cpu): q must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(ql.dim() == 1 && ql.size(0) == q.size(0), "rll: q_labels must have shape (", q.size(0),
              ",), got ", ql.sizes());
  TORCH_CHECK(kl.dim() == 1 && kl.size(0) == k.size(0), "rll: k_labels must have shape (", k.size(0),
              ",), got ", kl.sizes());
  TORCH_CHECK(ql.scalar_type() == at::kLong && kl.scalar_type() == at::kLong,
              "rll: labels must be int64, got ", ql.scalar_type(), " and ", kl.scalar_type());
  TORCH_CHECK(qid.has_value() == kid.has_value(), "rll: q_ids and k_ids must be given together");
  if (qid.has_value()) {
    TORCH_CHECK(qid->dim() == 1 && qid->size(0) == q.size(0) && qid->scalar_type() == at::kLong,
                "rll: q_ids must be int64 of shape (", q.size(0), ",), got ", qid->sizes(), " ",
                qid->scalar_type());
    TORCH_CHECK(kid->dim() == 1 && kid->size(0) == k.size(0) && kid->scalar_type() == at::kLong,
                "rll: k_ids must be int64 of shape (", k.size(0), ",), got ", kid->sizes(), " ",
                kid->scalar_type());
  }
  for (const at::Tensor* t : {&q, &ql, &k, &kl}) {
    TORCH_CHECK(t->device().is_cpu(), "rll (cpu): all tensors must be on the CPU, got ", t->device());
    TORCH_CHECK(t->is_contiguous(), "rll: inputs must be contiguous");
  }
}

template <class S>
Params<S> make_params(double alpha, double beta, double Tn, double Tp, double lam, double den_bias) {
  TORCH_CHECK(alpha > beta, "rll: alpha must exceed beta = alpha - margin (margin > 0), got alpha=", alpha,
              " beta=", beta);
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, "rll: imbalance must lie in [0, 1], got ", lam);
  TORCH_CHECK(den_bias >= 0.0, "rll: den_bias must be >= 0, got ", den_bias);
  return Params<S>{S(alpha), S(beta), S(Tn), S(Tp), S(lam), S(den_bias)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rll_fwd_cpu(const at::Tensor& q, const at::Tensor& q_labels,
                                                           const c10::optional<at::Tensor>& q_ids,
                                                           const at::Tensor& k, const at::Tensor& k_labels,
                                                           const c10::optional<at::Tensor>& k_ids, double alpha,
                                                           double beta, double Tn, double Tp, double imbalance,
                                                           double den_bias, bool attached, bool need_grad) {
  const bool paper_grad = need_grad && !attached;
  check_inputs(q, q_labels, q_ids, k, k_labels, k_ids);
  const int64_t N = q.size(0), D = q.size(1);
  at::Tensor loss = at::empty({N}, q.options());
  at::Tensor stats = at::empty({N, 4}, q.options());
  at::Tensor gradq = paper_grad ? at::empty({N, D}, q.options()) : at::empty({0}, q.options());
  if (N == 0) return {loss, gradq, stats};
  // the kernel's inner GEMMs must not see autograd (this op's autograd is registered in Python)
  const at::Tensor qd = q.detach(), kd = k.detach();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rll_fwd_cpu", [&] {
    const auto prm = make_params<scalar_t>(alpha, beta, Tn, Tp, imbalance, den_bias);
    rll_forward_kernel<scalar_t>(qd, q_labels, q_ids, kd, k_labels, k_ids, prm, paper_grad, loss, gradq, stats);
  });
  return {loss, gradq, stats};
}

std::tuple<at::Tensor, at::Tensor> rll_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& q,
                                               const at::Tensor& q_labels, const c10::optional<at::Tensor>& q_ids,
                                               const at::Tensor& k, const at::Tensor& k_labels,
                                               const c10::optional<at::Tensor>& k_ids, const at::Tensor& stats,
                                               double alpha, double beta, double Tn, double Tp, double imbalance,
                                               double den_bias, bool attached, bool need_gq, bool need_gk) {
  check_inputs(q, q_labels, q_ids, k, k_labels, k_ids);
  const int64_t N = q.size(0);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == N && grad_rows.scalar_type() == q.scalar_type(),
              "rll_bwd: grad_rows must be (", N, ",) of dtype ", q.scalar_type(), ", got ", grad_rows.sizes(),
              " ", grad_rows.scalar_type());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == 4 &&
                  stats.scalar_type() == q.scalar_type(),
              "rll_bwd: stats must be (", N, ", 4), got ", stats.sizes());
  const at::Tensor g = grad_rows.contiguous();
  const at::Tensor st = stats.contiguous();
  at::Tensor gq = need_gq ? at::zeros_like(q) : at::empty({0}, q.options());
  at::Tensor gk = need_gk ? at::zeros_like(k) : at::empty({0}, k.options());
  if (N == 0 || (!need_gq && !need_gk)) return {gq, gk};
  const at::Tensor qd = q.detach(), kd = k.detach(), gd = g.detach(), sd = st.detach();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rll_bwd_cpu", [&] {
    const auto prm = make_params<scalar_t>(alpha, beta, Tn, Tp, imbalance, den_bias);
    rll_backward_kernel<scalar_t>(gd, qd, q_labels, q_ids, kd, k_labels, k_ids, sd, prm, attached, need_gq,
                                  need_gk, gq, gk);
  });
  return {gq, gk};
}

}  // namespace

TORCH_LIBRARY_IMPL(rll_kernels, CPU, m) {
  m.impl("rll_fwd", &rll_fwd_cpu);
  m.impl("rll_bwd", &rll_bwd_cpu);
}

}  // namespace rll
