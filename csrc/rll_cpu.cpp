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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "rll_cpu_vec.h"

namespace rll {
namespace {

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

// Labels as values of the kernel's type S, so a label comparison is one SIMD compare. Exact:
// labels are cast when they fit the mantissa, else replaced by their dense rank.
template <class S>
at::Tensor labels_as(const at::Tensor& ql, const at::Tensor& kl) {
  const int64_t lim = int64_t(1) << std::numeric_limits<S>::digits;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
  at::Tensor both = at::cat({ql, kl});
  if (both.numel() == 0 || (both.min().item<int64_t>() > -lim && both.max().item<int64_t>() < lim))
    return both.to(opts);
  at::Tensor inverse = std::get<1>(at::_unique(both, /*sorted=*/true, /*return_inverse=*/true));
  return inverse.to(opts);
}

// Excluded pairs (q_ids[i] == k_ids[j]) as per-row sorted column lists (CSR).
struct Exclusions {
  std::vector<int64_t> offsets, cols;
  bool empty() const { return cols.empty(); }
};
inline Exclusions build_exclusions(const int64_t* qid, const int64_t* kid, int64_t N, int64_t M) {
  Exclusions ex;
  if (qid == nullptr) return ex;
  std::vector<std::pair<int64_t, int64_t>> kv(M);
  for (int64_t j = 0; j < M; ++j) kv[j] = {kid[j], j};
  std::sort(kv.begin(), kv.end());
  ex.offsets.resize(N + 1, 0);
  for (int64_t i = 0; i < N; ++i) {
    auto lo = std::lower_bound(kv.begin(), kv.end(), std::make_pair(qid[i], std::numeric_limits<int64_t>::min()));
    for (auto it = lo; it != kv.end() && it->first == qid[i]; ++it) ex.cols.push_back(it->second);
    ex.offsets[i + 1] = static_cast<int64_t>(ex.cols.size());
  }
  return ex;
}

// Calls f(c) for every excluded column c of row i inside the tile [j0, j0 + bk).
template <class F>
inline void for_excluded(const Exclusions& ex, int64_t i, int64_t j0, int64_t bk, F&& f) {
  if (ex.empty()) return;
  const int64_t* b = ex.cols.data() + ex.offsets[i];
  const int64_t* e = ex.cols.data() + ex.offsets[i + 1];
  for (const int64_t* it = std::lower_bound(b, e, j0); it != e && *it < j0 + bk; ++it) f(*it - j0);
}

// Zeroes the excluded entries of row i's G tile (grow, bk entries from column j0) and returns the row
// sum. An excluded pair is in no set, but the vector loop computed its entry as if it were: its logit
// may exceed the set's log-denominator (e.g. the d = 0 diagonal when beta < 0), and exp() can
// overflow, so the row is summed again after zeroing instead of subtracting the entry from rsum.
template <class S>
inline S drop_excluded(const Exclusions& ex, int64_t i, int64_t j0, int64_t bk, S* grow, S rsum) {
  bool any = false;
  for_excluded(ex, i, j0, bk, [&](int64_t c) {
    grow[c] = S(0);
    any = true;
  });
  return any ? std::accumulate(grow, grow + bk, S(0)) : rsum;
}

// Per-tile gallery data, padded to whole vectors: squared norms and labels (NaN labels in the
// padding match nothing, so the tail lanes are in no set).
template <class S>
inline void load_tile(const S* NK, const S* KLF, int64_t j0, int64_t bk, int64_t bk_pad, S* nkp, S* klp) {
  std::copy(NK + j0, NK + j0 + bk, nkp);
  std::copy(KLF + j0, KLF + j0 + bk, klp);
  std::fill(nkp + bk, nkp + bk_pad, S(0));
  std::fill(klp + bk, klp + bk_pad, std::numeric_limits<S>::quiet_NaN());
}

// Same-label and other-label masks of one vector of gallery labels against the query's label.
template <class S>
inline void label_masks(const Vectorized<S>& kl, const Vectorized<S>& li, Vectorized<S>& same,
                        Vectorized<S>& diff) {
  same = kl == li;
  diff = (kl < li) | (kl > li);  // both false for the NaN padding
}

// Squared row norms without an N x D temporary (the gallery can be a 10^5-row bank).
template <class S>
at::Tensor row_sq_norms(const at::Tensor& x) {
  const int64_t R = x.size(0), D = x.size(1);
  at::Tensor out = at::empty({R}, x.options());
  const S* X = x.data_ptr<S>();
  S* O = out.data_ptr<S>();
  at::parallel_for(0, R, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      O[r] = at::vec::map_reduce_all<S>([](Vectorized<S> v) { return v * v; },
                                        [](Vectorized<S> a, Vectorized<S> b) { return a + b; }, X + r * D, D);
  });
  return out;
}

// Shared set-up of both kernels: norms, labels as S, exclusions, tiling.
template <class S>
struct Prep {
  at::Tensor nq_t, nk_t, lab_t;
  const S *NQ, *NK, *QLF, *KLF;
  Exclusions ex;
  int64_t N, M, D, BQ, BK, BKP, nblocks;
  Prep(const at::Tensor& q, const at::Tensor& ql, const c10::optional<at::Tensor>& qid_t, const at::Tensor& k,
       const at::Tensor& kl, const c10::optional<at::Tensor>& kid_t) {
    N = q.size(0), M = k.size(0), D = q.size(1);
    nq_t = row_sq_norms<S>(q);
    nk_t = row_sq_norms<S>(k);
    lab_t = labels_as<S>(ql, kl);
    NQ = nq_t.data_ptr<S>();
    NK = nk_t.data_ptr<S>();
    QLF = lab_t.data_ptr<S>();
    KLF = QLF + N;
    ex = build_exclusions(qid_t.has_value() ? qid_t->data_ptr<int64_t>() : nullptr,
                          kid_t.has_value() ? kid_t->data_ptr<int64_t>() : nullptr, N, M);
    const Tiling tl = choose_tiling(N, D);
    BQ = tl.bq, BK = tl.bk;
    const int64_t W = Vectorized<S>::size();
    BKP = (BK + W - 1) / W * W;
    nblocks = (N + BQ - 1) / BQ;
  }
};

template <class S>
void rll_forward_kernel(const at::Tensor& q, const at::Tensor& ql, const c10::optional<at::Tensor>& qid_t,
                        const at::Tensor& k, const at::Tensor& kl, const c10::optional<at::Tensor>& kid_t,
                        const Params<S> prm, bool paper_grad, at::Tensor& loss, at::Tensor& gradq,
                        at::Tensor& stats) {
  using V = Vectorized<S>;
  const Prep<S> P(q, ql, qid_t, k, kl, kid_t);
  const int64_t N = P.N, M = P.M, D = P.D, BQ = P.BQ, BK = P.BK, BKP = P.BKP;
  const int64_t W = V::size();
  const S* Q = q.data_ptr<S>();
  S* LOSS = loss.data_ptr<S>();
  S* STATS = stats.data_ptr<S>();
  S* GQ = paper_grad ? gradq.data_ptr<S>() : nullptr;
  const S rel = dup_rel<S>();
  const S ninf = neg_inf<S>();
  const auto opts = q.options();

  at::parallel_for(0, P.nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<S> sbuf(BQ * BK), cp(BQ * BK), cn(BQ * BK);
    std::vector<S> sp(BKP), sn(BKP), vp(BKP), vn(BKP), inv(BKP), nkp(BKP), klp(BKP);
    std::vector<char> has_pos(BQ);
    std::vector<OnlineRow<S>> rp(BQ), rn(BQ);
    std::vector<S> csp(BQ), csn(BQ);
    std::vector<S> accp(paper_grad ? BQ * D : 0), accn(paper_grad ? BQ * D : 0);
    at::Tensor accp_t = paper_grad ? at::from_blob(accp.data(), {BQ, D}, opts) : at::Tensor();
    at::Tensor accn_t = paper_grad ? at::from_blob(accn.data(), {BQ, D}, opts) : at::Tensor();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * BQ, bq = std::min(BQ, N - i0);
      const at::Tensor qI = q.narrow(0, i0, bq);
      std::fill(rp.begin(), rp.end(), OnlineRow<S>{});
      std::fill(rn.begin(), rn.end(), OnlineRow<S>{});
      std::fill(csp.begin(), csp.end(), S(0));
      std::fill(csn.begin(), csn.end(), S(0));
      std::fill(accp.begin(), accp.end(), S(0));
      std::fill(accn.begin(), accn.end(), S(0));
      for (int64_t j0 = 0; j0 < M; j0 += BK) {
        const int64_t bk = std::min(BK, M - j0);
        const at::Tensor kJ = k.narrow(0, j0, bk);
        at::Tensor s_t = at::from_blob(sbuf.data(), {bq, bk}, opts);
        at::mm_out(s_t, qI, kJ.t());
        load_tile(P.NK, P.KLF, j0, bk, BKP, nkp.data(), klp.data());
        int64_t tile_pos = 0;
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t i = i0 + r;
          const S* srow = sbuf.data() + r * bk;
          const V nqi(P.NQ[i]), li(P.QLF[i]);
          V mxp(ninf), mxn(ninf);
          for (int64_t c = 0; c < BKP; c += W) {
            const int64_t cnt = std::min(W, bk - c);
            const V dot = cnt >= W ? V::loadu(srow + c) : V::loadu(srow + c, std::max<int64_t>(cnt, 0));
            const V nk = V::loadu(nkp.data() + c);
            const V d2 = gram_d2(dot, nqi, nk);
            const auto dup = is_dup(d2, nqi, nk, rel);
            const V d = pair_dist(d2, dup);
            V sm, df;
            label_masks(V::loadu(klp.data() + c), li, sm, df);
            const V pos = in_pos(sm, d, prm), neg = in_neg(df, d, prm);
            const V vpv = pos_value(d, prm), vnv = neg_value(d, prm);
            const V spv = masked_logit(pos, vpv, prm.Tp), snv = masked_logit(neg, vnv, prm.Tn);
            spv.store(sp.data() + c);
            snv.store(sn.data() + c);
            vpv.store(vp.data() + c);
            vnv.store(vn.data() + c);
            if (paper_grad) pair_inv_dist(d, dup).store(inv.data() + c);
            mxp = at::vec::maximum(mxp, spv);
            mxn = at::vec::maximum(mxn, snv);
          }
          S tmp = hmax(mxp), tmn = hmax(mxn);
          // excluded pairs (the pair i = i in-batch) are in no set; re-take the max if one held it
          bool rescan = false;
          for_excluded(P.ex, i, j0, bk, [&](int64_t c) {
            rescan |= (sp[c] == tmp && tmp != ninf) || (sn[c] == tmn && tmn != ninf);
            sp[c] = sn[c] = ninf;
          });
          if (rescan) {
            tmp = *std::max_element(sp.begin(), sp.end());
            tmn = *std::max_element(sn.begin(), sn.end());
          }
          S* cprow = cp.data() + r * bk;
          S* cnrow = cn.data() + r * bk;
          // one set: fold the tile into the online state (and the gradient coefficients)
          auto run_set = [&](OnlineRow<S>& st, const S* lg, const S* val, S* crow, S& csum, S* acc,
                             S tile_max) -> bool {
            if (tile_max == ninf) {
              if (paper_grad) std::fill(crow, crow + bk, S(0));
              return false;
            }
            const S f = online_begin_tile(st, tile_max);
            if (paper_grad && f != S(1)) {
              csum *= f;
              S* a = acc + r * D;
              for (int64_t e = 0; e < D; ++e) a[e] *= f;
            }
            V lsum(S(0)), asum(S(0)), csv(S(0));
            for (int64_t c = 0; c < BKP; c += W) {
              const int64_t cnt = std::min(W, bk - c);
              const V lv = V::loadu(lg + c);
              if (none_set(lv != V(ninf))) {  // most vectors hold no member: skip the exp
                if (paper_grad && cnt > 0) V(S(0)).store(crow + c, cnt);
                continue;
              }
              const V w = online_weight(lv, st);
              lsum = lsum + w;
              asum = asum + w * V::loadu(val + c);
              if (paper_grad) {
                const V cc = w * V::loadu(inv.data() + c);
                csv = csv + cc;
                if (cnt > 0) cc.store(crow + c, cnt);
              }
            }
            st.l += hsum(lsum);
            st.a += hsum(asum);
            csum += hsum(csv);
            return true;
          };
          const bool hp = run_set(rp[r], sp.data(), vp.data(), cprow, csp[r], accp.data(), tmp);
          run_set(rn[r], sn.data(), vn.data(), cnrow, csn[r], accn.data(), tmn);
          has_pos[r] = hp;
          if (hp && paper_grad) {
            for (int64_t c = 0; c < bk; ++c) tile_pos += cprow[c] != S(0);
          }
        }
        if (paper_grad) {
          const at::Tensor cn_t = at::from_blob(cn.data(), {bq, bk}, opts);
          accn_t.narrow(0, 0, bq).addmm_(cn_t, kJ);
          // positives are few in typical P x K batches: sparse row updates unless the tile is dense
          if (tile_pos * 8 > bq * bk) {
            const at::Tensor cp_t = at::from_blob(cp.data(), {bq, bk}, opts);
            accp_t.narrow(0, 0, bq).addmm_(cp_t, kJ);
          } else if (tile_pos > 0) {
            const S* KJ = kJ.data_ptr<S>();
            for (int64_t r = 0; r < bq; ++r) {
              if (!has_pos[r]) continue;
              const S* cprow = cp.data() + r * bk;
              S* a = accp.data() + r * D;
              for (int64_t c = 0; c < bk; ++c) {
                const S w = cprow[c];
                if (w == S(0)) continue;
                const S* kr = KJ + c * D;
                for (int64_t e = 0; e < D; ++e) a[e] += w * kr[e];
              }
            }
          }
        }
      }
      // finish the rows of this block
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
        const S fp = stp.logden == ninf ? S(0) : (S(1) - prm.lam) * rll_exp(rp[r].m - stp.logden);
        const S fn = stn.logden == ninf ? S(0) : -prm.lam * rll_exp(rn[r].m - stn.logden);
        const S* zi = Q + i * D;
        const S* ap = accp.data() + r * D;
        const S* an = accn.data() + r * D;
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
  const Prep<S> P(q, ql, qid_t, k, kl, kid_t);
  const int64_t N = P.N, M = P.M, D = P.D, BQ = P.BQ, BK = P.BK, BKP = P.BKP;
  const int64_t W = V::size();
  const S* G = grad_rows.data_ptr<S>();
  const S* STATS = stats.data_ptr<S>();
  const S rel = dup_rel<S>();
  const S ninf = neg_inf<S>();
  const auto opts = q.options();
  const int64_t nthreads = at::get_num_threads();
  // Gallery gradients of different query blocks hit the same rows: one buffer per thread, summed.
  at::Tensor gk_parts = need_gk ? at::zeros({nthreads, M, D}, opts) : at::Tensor();
  at::Tensor colsum_parts = need_gk ? at::zeros({nthreads, M}, opts) : at::Tensor();

  at::parallel_for(0, P.nblocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t tid = at::get_thread_num();
    std::vector<S> sbuf(BQ * BK), gbuf(BQ * BK);
    std::vector<S> nkp(BKP), klp(BKP), rowsum(BQ);
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
        load_tile(P.NK, P.KLF, j0, bk, BKP, nkp.data(), klp.data());
        bool any = false;
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t i = i0 + r;
          const S* st = STATS + i * 4;
          const S lgp = st[0], Lp = st[1], lgn = st[2], Ln = st[3];
          const bool hasp = lgp != ninf, hasn = lgn != ninf;
          S* grow = gbuf.data() + r * bk;
          if ((!hasp && !hasn) || G[i] == S(0)) {
            std::fill(grow, grow + bk, S(0));
            continue;
          }
          const S* srow = sbuf.data() + r * bk;
          const V nqi(P.NQ[i]), li(P.QLF[i]);
          const S wp = (S(1) - prm.lam) * G[i], wn = prm.lam * G[i];
          V rs(S(0));
          for (int64_t c = 0; c < BKP; c += W) {
            const int64_t cnt = std::min(W, bk - c);
            if (cnt <= 0) break;
            const V dot = cnt >= W ? V::loadu(srow + c) : V::loadu(srow + c, cnt);
            const V nk = V::loadu(nkp.data() + c);
            const V d2 = gram_d2(dot, nqi, nk);
            const auto dup = is_dup(d2, nqi, nk, rel);
            const V d = pair_dist(d2, dup);
            V sm, df;
            label_masks(V::loadu(klp.data() + c), li, sm, df);
            V coef(S(0));
            if (hasp) {
              const V pos = in_pos(sm, d, prm);
              if (!none_set(pos)) {
                const V v = pos_value(d, prm);
                const V p = final_weight(masked_logit(pos, v, prm.Tp), lgp);
                coef = coef + V(wp) * pos_coef(p, v, Lp, prm.Tp, attached);
              }
            }
            if (hasn) {
              const V neg = in_neg(df, d, prm);
              if (!none_set(neg)) {
                const V v = neg_value(d, prm);
                const V p = final_weight(masked_logit(neg, v, prm.Tn), lgn);
                coef = coef + V(wn) * neg_coef(p, v, Ln, prm.Tn, attached);
              }
            }
            const V gv = coef * pair_inv_dist(d, dup);
            rs = rs + gv;
            gv.store(grow + c, cnt);
          }
          rowsum[r] += drop_excluded(P.ex, i, j0, bk, grow, hsum(rs));
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

// In-batch "pml" backward (q is k): the pair (i, j) and the pair (j, i) share d, labels and
// exclusion, so each unordered tile pair (I <= J) is computed once. With
// H_ij = G_ij + G_ji the gradient is dz_i += sum_j H_ij (z_i - z_j) for both ends, i.e. one S GEMM
// and two gradient GEMMs per unordered pair instead of three GEMMs per ordered pair.
template <class S>
void rll_backward_symmetric(const at::Tensor& grad_rows, const at::Tensor& z, const at::Tensor& zl,
                            const c10::optional<at::Tensor>& ids, const at::Tensor& stats, const Params<S> prm,
                            bool attached, at::Tensor& gz) {
  using V = Vectorized<S>;
  const Prep<S> P(z, zl, ids, z, zl, ids);
  const int64_t N = P.N, D = P.D;
  const int64_t W = V::size();
  const int64_t B = 256, BP = (B + W - 1) / W * W;
  const int64_t nb = (N + B - 1) / B;
  const S* G = grad_rows.data_ptr<S>();
  const S* STATS = stats.data_ptr<S>();
  const S rel = dup_rel<S>();
  const S ninf = neg_inf<S>();
  const auto opts = z.options();
  // per-row constants: set weights (0 for an empty set or a zero grad) and finite log-denominators
  std::vector<S> WPr(N), WNr(N), LGP(N), LGN(N), LPr(N), LNr(N);
  for (int64_t i = 0; i < N; ++i) {
    const S* st = STATS + i * 4;
    WPr[i] = st[0] == ninf ? S(0) : (S(1) - prm.lam) * G[i];
    WNr[i] = st[2] == ninf ? S(0) : prm.lam * G[i];
    LGP[i] = st[0] == ninf ? S(0) : st[0];
    LGN[i] = st[2] == ninf ? S(0) : st[2];
    LPr[i] = st[1];
    LNr[i] = st[3];
  }
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t I = 0; I < nb; ++I)
    for (int64_t J = I; J < nb; ++J) pairs.emplace_back(I, J);
  const int64_t nthreads = at::get_num_threads();
  at::Tensor gz_parts = at::zeros({nthreads, N, D}, opts);
  at::Tensor rs_parts = at::zeros({nthreads, N}, opts);

  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t p0, int64_t p1) {
    const int64_t tid = at::get_thread_num();
    std::vector<S> sbuf(B * B), hbuf(B * B);
    std::vector<S> nkp(BP), klp(BP), wpc(BP), wnc(BP), lgpc(BP), lgnc(BP), lpc(BP), lnc(BP), colsum(BP);
    S* RS = rs_parts[tid].data_ptr<S>();
    at::Tensor gzt = gz_parts[tid];
    for (int64_t pi = p0; pi < p1; ++pi) {
      const auto [I, J] = pairs[pi];
      const int64_t i0 = I * B, bi = std::min(B, N - i0);
      const int64_t j0 = J * B, bj = std::min(B, N - j0);
      const at::Tensor zI = z.narrow(0, i0, bi), zJ = z.narrow(0, j0, bj);
      at::Tensor s_t = at::from_blob(sbuf.data(), {bi, bj}, opts);
      at::mm_out(s_t, zI, zJ.t());
      load_tile(P.NK, P.KLF, j0, bj, BP, nkp.data(), klp.data());
      auto col = [&](const std::vector<S>& src, std::vector<S>& dst) {
        std::copy(src.begin() + j0, src.begin() + j0 + bj, dst.begin());
        std::fill(dst.begin() + bj, dst.end(), S(0));
      };
      col(WPr, wpc), col(WNr, wnc), col(LGP, lgpc), col(LGN, lgnc), col(LPr, lpc), col(LNr, lnc);
      std::fill(colsum.begin(), colsum.end(), S(0));
      for (int64_t r = 0; r < bi; ++r) {
        const int64_t i = i0 + r;
        const S* srow = sbuf.data() + r * bj;
        S* hrow = hbuf.data() + r * bj;
        const V nqi(P.NQ[i]), li(P.QLF[i]);
        const S wpi = WPr[i], wni = WNr[i];
        V rs(S(0));
        for (int64_t c = 0; c < BP; c += W) {
          const int64_t cnt = std::min(W, bj - c);
          if (cnt <= 0) break;
          const V dot = cnt >= W ? V::loadu(srow + c) : V::loadu(srow + c, cnt);
          const V nk = V::loadu(nkp.data() + c);
          const V d2 = gram_d2(dot, nqi, nk);
          const auto dup = is_dup(d2, nqi, nk, rel);
          const V d = pair_dist(d2, dup);
          V sm, df;
          label_masks(V::loadu(klp.data() + c), li, sm, df);
          V coef(S(0));
          const V pos = in_pos(sm, d, prm);
          if (!none_set(pos)) {
            const V v = pos_value(d, prm);
            const V lg = masked_logit(pos, v, prm.Tp);
            // row i's view (scalar stats) + row j's view (per-lane stats) of the same pair
            coef = coef + V(wpi) * pos_coef(final_weight(lg, LGP[i]), v, LPr[i], prm.Tp, attached);
            coef = coef + V::loadu(wpc.data() + c) *
                              pos_coef(final_weight(lg, V::loadu(lgpc.data() + c)), v, V::loadu(lpc.data() + c),
                                       V(prm.Tp), attached);
          }
          const V neg = in_neg(df, d, prm);
          if (!none_set(neg)) {
            const V v = neg_value(d, prm);
            const V lg = masked_logit(neg, v, prm.Tn);
            coef = coef + V(wni) * neg_coef(final_weight(lg, LGN[i]), v, LNr[i], prm.Tn, attached);
            coef = coef + V::loadu(wnc.data() + c) *
                              neg_coef(final_weight(lg, V::loadu(lgnc.data() + c)), v, V::loadu(lnc.data() + c),
                                       V(prm.Tn), attached);
          }
          const V h = coef * pair_inv_dist(d, dup);
          rs = rs + h;
          h.store(hrow + c, cnt);
        }
        RS[i] += drop_excluded(P.ex, i, j0, bj, hrow, hsum(rs));
        if (I != J)
          for (int64_t c = 0; c < bj; ++c) colsum[c] += hrow[c];
      }
      const at::Tensor h_t = at::from_blob(hbuf.data(), {bi, bj}, opts);
      gzt.narrow(0, i0, bi).addmm_(h_t, zJ, S(1), S(-1));
      if (I != J) {  // the diagonal tile already holds both orders of each pair in its rows
        gzt.narrow(0, j0, bj).addmm_(h_t.t(), zI, S(1), S(-1));
        for (int64_t c = 0; c < bj; ++c) RS[j0 + c] += colsum[c];
      }
    }
  });
  gz.copy_(gz_parts.sum(0));
  gz.addcmul_(z, rs_parts.sum(0).unsqueeze(1));
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
  // any finite boundaries (docs/semantics.md §2.2): beta >= alpha or beta <= 0 are valid, labels split the sets
  TORCH_CHECK(std::isfinite(alpha) && std::isfinite(beta) && std::isfinite(Tn) && std::isfinite(Tp),
              "rll: alpha, beta, Tn and Tp must be finite, got alpha=", alpha, " beta=", beta, " Tn=", Tn,
              " Tp=", Tp);
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
  // in-batch (the same tensor as queries and gallery, same ids): symmetric kernel; the whole gradient
  // is returned as grad q (grad k is zero), and autograd sums the two for the shared input
  const bool same_ids = q_ids.has_value() ? (k_ids.has_value() && q_ids->is_same(*k_ids)) : !k_ids.has_value();
  const bool symmetric = need_gq && need_gk && q.is_same(k) && q_labels.is_same(k_labels) && same_ids;
  const at::Tensor qd = q.detach(), kd = k.detach(), gd = g.detach(), sd = st.detach();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rll_bwd_cpu", [&] {
    const auto prm = make_params<scalar_t>(alpha, beta, Tn, Tp, imbalance, den_bias);
    if (symmetric) {
      rll_backward_symmetric<scalar_t>(gd, qd, q_labels, q_ids, sd, prm, attached, gq);
      return;
    }
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
