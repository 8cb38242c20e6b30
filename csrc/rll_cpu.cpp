// Fused Ranked List Loss, CPU kernels (docs/semantics.md §2, fused form §2.6).
//
// Per query tile I (BQ rows), the gallery is streamed in tiles J of BK rows: the distance tile comes
// from one GEMM (Q_I K_J^T), masks and weights are computed with SIMD vectors, and per query row
// the two sets keep an online (max, sum exp, sum exp * value) state. "paper" semantics also
// accumulates the query gradient in the same pass: sum_j c_ij (q_i - k_j) =
// (sum_j c_ij) q_i - (C K_J)_i, one more GEMM per tile, rescaled when the running max moves.
// No N x M matrix is ever held: memory is O((N + M) D) plus per-thread tiles.
// The backward kernel (rll_bwd_cpu) serves "pml" semantics (docs/semantics.md §2.3): it recomputes
// each tile with the saved row statistics and writes both the query and the gallery gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <vector>

#include "cpu_tiles.h"
#include "row_norms.h"

namespace rll {
RLL_CPU_CAPABILITY_BEGIN
namespace {

// Tile sizes: a gallery tile of BK x D stays in L2 (2 MiB here); BQ x BK tiles stay in L1/L2.
struct Tiling {
  int64_t BQ, BK;
};
// A gallery smaller than one tile gets a tile of its own size: the row loops run over the tile's
// padded width, so a wider tile would compute masked-out columns (8x the work at M = 64).
inline Tiling choose_tiling(int64_t N, int64_t M, int64_t D) {
  // keep both threads busy on small query sets (bank case: N = 256 queries); at N <= 128 one tile
  // per thread (64 x 128: 76 -> 59 us per forward; the tile GEMMs are too small to balance better)
  const int64_t BK = std::max<int64_t>(1, std::min<int64_t>(D <= 256 ? 512 : 256, M));
  return {tile_size_for_threads(64, 16, N, N <= 128 ? 1 : 2), BK};
}

// In-batch kernels that visit each unordered tile pair once (the statistics-only forward and the
// "pml" backward) use square tiles of B rows: 256, halved down to 64 until every thread has at least
// two tile pairs (N = 512: 128-row tiles, 10 pairs; N = 128: 64 rows, 3 pairs). Below kSymmetricMinRows
// the forward keeps the query-tile kernel: at N = 128, D = 512 both took the same time (3 tile pairs
// do not split evenly over 2 threads), bench/RESULTS.md §14.
constexpr int64_t kSymmetricTile = 256;
constexpr int64_t kSymmetricMinRows = 256;
inline int64_t symmetric_tile_rows(int64_t N) {
  const int64_t threads = at::get_num_threads();
  int64_t B = kSymmetricTile;
  while (B > 64 && ceil_div(N, B) * (ceil_div(N, B) + 1) / 2 < 2 * threads) B /= 2;
  return std::max<int64_t>(1, std::min(B, N));
}

// ================================================================ forward
// What every thread of one forward call reads.
template <class S>
struct Forward {
  const PairProblem<S>& pb;
  const at::Tensor& q;
  const at::Tensor& k;
  Params<S> prm;
  bool paper_grad;  // accumulate the "paper" query gradient in the same pass
  int64_t BQ, BK, BKP;
  S* loss;
  S* stats;  // (N, 4): [logden_P, L_P, logden_N, L_N]
  S* gq;     // (N, D) when paper_grad
  const S* q_norms;  // |e_i| of the query rows when the op normalises them, else null
  S* kept = nullptr;  // (N, M): where the Gram rows are kept for a second pass (one gallery tile), or null
};

// One row's running forward state, wherever it is kept (a query tile's buffers, or one thread's
// copy of every row in the in-batch kernel): the two sets' online states and, for "paper", each
// set's coefficient sum and query-gradient accumulator (D values), in units of e^m.
template <class S>
struct RowState {
  OnlineRow<S>* pos;
  OnlineRow<S>* neg;
  S* cp_sum;
  S* cn_sum;
  S* acc_p;  // null without the "paper" gradient
  S* acc_n;
};

// Per-thread buffers of the forward: one query tile I against one gallery tile J.
template <class S>
struct ForwardTile {
  std::vector<S> dots, cp, cn;                 // BQ x BK: Gram tile; coefficients c_ij of each set
  std::vector<S> sp, sn, vp, vn, inv, nk, kl;  // BKP, one row: logits, hinge values, 1/d; tile norms, labels
  std::vector<OnlineRow<S>> on_pos, on_neg;    // BQ: online state of each set
  std::vector<S> cp_sum, cn_sum;               // BQ: sum_j c_ij of each set, in units of e^m
  std::vector<S> acc_p, acc_n;                 // BQ x D: sum_j c_ij k_j of each set, in units of e^m
  at::Tensor acc_p_t, acc_n_t;
  // own_rows: the tile keeps the states of its BQ rows (the query-tile kernel); the in-batch kernel
  // keeps every row's state per thread instead and uses only the tile and row buffers.
  ForwardTile(const Forward<S>& fwd, bool own_rows)
      : dots(fwd.BQ * fwd.BK),
        cp(fwd.BQ * fwd.BK),
        cn(fwd.BQ * fwd.BK),
        sp(fwd.BKP),
        sn(fwd.BKP),
        vp(fwd.BKP),
        vn(fwd.BKP),
        inv(fwd.BKP),
        nk(fwd.BKP),
        kl(fwd.BKP),
        on_pos(own_rows ? fwd.BQ : 0),
        on_neg(own_rows ? fwd.BQ : 0),
        cp_sum(own_rows ? fwd.BQ : 0),
        cn_sum(own_rows ? fwd.BQ : 0),
        acc_p(own_rows && fwd.paper_grad ? fwd.BQ * fwd.pb.D : 0),
        acc_n(own_rows && fwd.paper_grad ? fwd.BQ * fwd.pb.D : 0) {
    if (acc_p.empty()) return;
    acc_p_t = at::from_blob(acc_p.data(), {fwd.BQ, fwd.pb.D}, fwd.q.options());
    acc_n_t = at::from_blob(acc_n.data(), {fwd.BQ, fwd.pb.D}, fwd.q.options());
  }
  RowState<S> row(int64_t r, int64_t D) {
    const bool grad = !acc_p.empty();
    return {&on_pos[r], &on_neg[r], &cp_sum[r], &cn_sum[r], grad ? acc_p.data() + r * D : nullptr,
            grad ? acc_n.data() + r * D : nullptr};
  }
  void start_rows() {
    std::fill(on_pos.begin(), on_pos.end(), OnlineRow<S>{});
    std::fill(on_neg.begin(), on_neg.end(), OnlineRow<S>{});
    std::fill(cp_sum.begin(), cp_sum.end(), S(0));
    std::fill(cn_sum.begin(), cn_sum.end(), S(0));
    std::fill(acc_p.begin(), acc_p.end(), S(0));
    std::fill(acc_n.begin(), acc_n.end(), S(0));
  }
};

// Logits sp, sn, hinge values vp, vn (and 1/d for "paper") of query row i against the gallery tile
// (its Gram row dot_row, the tile's nk, kl) in the tile's row buffers; returns the largest logit of
// each set in max_sp, max_sn.
template <class S>
void row_logits(const Forward<S>& fwd, ForwardTile<S>& tile, int64_t i, const S* dot_row, int64_t bk, S& max_sp,
                S& max_sn) {
  using V = Vectorized<S>;
  const int64_t W = V::size();
  const Params<S> prm = fwd.prm;
  const S rel = dup_rel<S>();
  const V nq(fwd.pb.NQ[i]), li(fwd.pb.QL[i]);
  V lane_max_sp(neg_inf<S>()), lane_max_sn(neg_inf<S>());
  for (int64_t c = 0; c < fwd.BKP; c += W) {
    const PairDistances<S> pd = pair_distances(dot_row, tile.nk.data(), c, std::min(W, bk - c), nq, rel);
    V same, diff;
    label_masks(V::loadu(tile.kl.data() + c), li, same, diff);
    const V pos = in_pos(same, pd.d, prm), neg = in_neg(diff, pd.d, prm);
    const V vp = pos_value(pd.d, prm), vn = neg_value(pd.d, prm);
    const V sp = masked_logit(pos, vp, prm.Tp), sn = masked_logit(neg, vn, prm.Tn);
    sp.store(tile.sp.data() + c);
    sn.store(tile.sn.data() + c);
    vp.store(tile.vp.data() + c);
    vn.store(tile.vn.data() + c);
    if (fwd.paper_grad) pair_inv_dist(pd.d, pd.dup).store(tile.inv.data() + c);
    lane_max_sp = at::vec::maximum(lane_max_sp, sp);
    lane_max_sn = at::vec::maximum(lane_max_sn, sn);
  }
  max_sp = hmax(lane_max_sp);
  max_sn = hmax(lane_max_sn);
}

// Excluded pairs (the pair i = i in-batch) are in no set: their logits become -inf, and the tile
// maxima are taken again if one of them held it.
template <class S>
void drop_excluded_pairs(const Forward<S>& fwd, ForwardTile<S>& tile, int64_t i, int64_t j0, int64_t bk, S& max_sp,
                         S& max_sn) {
  const S ninf = neg_inf<S>();
  bool rescan = false;
  for_excluded(fwd.pb.ex, i, j0, bk, [&](int64_t c) {
    rescan |= (tile.sp[c] == max_sp && max_sp != ninf) || (tile.sn[c] == max_sn && max_sn != ninf);
    tile.sp[c] = tile.sn[c] = ninf;
  });
  if (!rescan) return;
  max_sp = *std::max_element(tile.sp.begin(), tile.sp.end());
  max_sn = *std::max_element(tile.sn.begin(), tile.sn.end());
}

// One set of one row: fold the tile's logits s and values v into the online state (and, for
// "paper", write the row's coefficients c_ij = w_ij / d_ij to c_row, summed into c_sum, after
// rescaling c_sum and acc_row to the new running max). Returns false when the tile holds no member.
template <class S>
bool fold_set_into_online_row(const Forward<S>& fwd, const ForwardTile<S>& tile, OnlineRow<S>& on, const S* s,
                              const S* v, S tile_max, int64_t bk, S* c_row, S& c_sum, S* acc_row) {
  using V = Vectorized<S>;
  const int64_t W = V::size();
  const S ninf = neg_inf<S>();
  const bool paper_grad = fwd.paper_grad;
  if (tile_max == ninf) {
    if (paper_grad) std::fill(c_row, c_row + bk, S(0));
    return false;
  }
  const S f = online_begin_tile(on, tile_max);
  if (paper_grad && f != S(1)) {
    c_sum *= f;
    for (int64_t e = 0; e < fwd.pb.D; ++e) acc_row[e] *= f;
  }
  V l_sum(S(0)), a_sum(S(0)), c_vsum(S(0));
  for (int64_t c = 0; c < fwd.BKP; c += W) {
    const int64_t cnt = std::min(W, bk - c);
    const V sv = V::loadu(s + c);
    if (none_set(sv != V(ninf))) {  // most vectors hold no member: skip the exp
      if (paper_grad && cnt > 0) V(S(0)).store(c_row + c, cnt);
      continue;
    }
    const V w = online_weight(sv, on);
    l_sum = l_sum + w;
    a_sum = a_sum + w * V::loadu(v + c);
    if (paper_grad) {
      const V cc = w * V::loadu(tile.inv.data() + c);
      c_vsum = c_vsum + cc;
      if (cnt > 0) cc.store(c_row + c, cnt);
    }
  }
  on.l += hsum(l_sum);
  on.a += hsum(a_sum);
  c_sum += hsum(c_vsum);
  return true;
}

// Nonzero coefficients of each set in a tile ("paper" only).
struct SetCounts {
  int64_t pos = 0, neg = 0;
};

// Folds a gallery tile (bk rows at j0; dot_row: row i's Gram row against it) into query row i's
// state st; r: the row's place in the tile's coefficient rows ("paper"). Returns how many nonzero
// coefficients the row holds in this tile in each set ("paper" only, else 0).
template <class S>
SetCounts fold_row(const Forward<S>& fwd, ForwardTile<S>& tile, int64_t i, int64_t r, const S* dot_row, int64_t j0,
                   int64_t bk, const RowState<S>& st) {
  S max_sp, max_sn;
  row_logits(fwd, tile, i, dot_row, bk, max_sp, max_sn);
  drop_excluded_pairs(fwd, tile, i, j0, bk, max_sp, max_sn);
  S* cp_row = tile.cp.data() + r * bk;
  S* cn_row = tile.cn.data() + r * bk;
  const bool has_pos = fold_set_into_online_row(fwd, tile, *st.pos, tile.sp.data(), tile.vp.data(), max_sp, bk,
                                                cp_row, *st.cp_sum, st.acc_p);
  const bool has_neg = fold_set_into_online_row(fwd, tile, *st.neg, tile.sn.data(), tile.vn.data(), max_sn, bk,
                                                cn_row, *st.cn_sum, st.acc_n);
  SetCounts n;
  if (!fwd.paper_grad) return n;
  if (has_pos) n.pos = count_nonzero(cp_row, bk);
  if (has_neg) n.neg = count_nonzero(cn_row, bk);
  return n;
}

// "paper": acc += C K_J for both sets (acc_p, acc_n: the accumulator rows of the tile's bq rows),
// each dense or sparse by its count (add_coef_product): the positives of a P x K batch are always
// few, the negatives inside the margin often.
template <class S>
void add_tile_to_query_grad(const ForwardTile<S>& tile, const at::Tensor& acc_p, const at::Tensor& acc_n,
                            const at::Tensor& kJ, int64_t bq, int64_t bk, SetCounts n) {
  add_coef_product(acc_n, tile.cn.data(), bq, bk, n.neg, kJ, S(1), false);
  add_coef_product(acc_p, tile.cp.data(), bq, bk, n.pos, kJ, S(1), false);
}

// Row i's loss and stats [logden_P, L_P, logden_N, L_N] from its final online states; returns the
// positive and the negative set's statistics.
template <class S>
std::pair<SetStats<S>, SetStats<S>> write_row_stats(const Forward<S>& fwd, int64_t i, const OnlineRow<S>& on_p,
                                                    const OnlineRow<S>& on_n) {
  const SetStats<S> pos = online_finish(on_p, fwd.prm.den_bias), neg = online_finish(on_n, fwd.prm.den_bias);
  fwd.loss[i] = row_loss(pos.L, neg.L, fwd.prm);
  S* st = fwd.stats + i * 4;
  st[0] = pos.logden;
  st[1] = pos.L;
  st[2] = neg.logden;
  st[3] = neg.L;
  return {pos, neg};
}

// Row i's loss and stats from its final state and, for "paper", its query gradient
// dL/dq_i = sum_set sign * lam_set / den_set * (c_sum q_i - acc_i), weights in units of e^m
// (taken back to e_i when the op normalises).
template <class S>
void finish_row(const Forward<S>& fwd, int64_t i, const RowState<S>& st) {
  const auto [pos, neg] = write_row_stats(fwd, i, *st.pos, *st.neg);
  if (!fwd.paper_grad) return;
  const Params<S> prm = fwd.prm;
  const S ninf = neg_inf<S>();
  const int64_t D = fwd.pb.D;
  const S fp = pos.logden == ninf ? S(0) : (S(1) - prm.lam) * rll_exp(st.pos->m - pos.logden);
  const S fn = neg.logden == ninf ? S(0) : -prm.lam * rll_exp(st.neg->m - neg.logden);
  const S* qi = fwd.q.template data_ptr<S>() + i * D;
  S* g = fwd.gq + i * D;
  const S cq = fp * *st.cp_sum + fn * *st.cn_sum;
  for (int64_t e = 0; e < D; ++e) g[e] = cq * qi[e] - fp * st.acc_p[e] - fn * st.acc_n[e];
  if (fwd.q_norms != nullptr) normalize_backward_row(g, qi, fwd.q_norms[i], D);  // dL/de_i from dL/dz_i
}

// Query tile I (rows i0..i0+bq) against every gallery tile J.
template <class S>
void forward_query_tile(const Forward<S>& fwd, ForwardTile<S>& tile, int64_t i0) {
  const int64_t bq = std::min(fwd.BQ, fwd.pb.N - i0);
  const at::Tensor qI = fwd.q.narrow(0, i0, bq);
  tile.start_rows();
  for (int64_t j0 = 0; j0 < fwd.pb.M; j0 += fwd.BK) {
    const int64_t bk = std::min(fwd.BK, fwd.pb.M - j0);
    const at::Tensor kJ = fwd.k.narrow(0, j0, bk);
    S* dots = fwd.kept != nullptr ? fwd.kept + i0 * bk : tile.dots.data();  // kept: bk is M
    gram_tile(dots, qI, kJ);
    load_tile(fwd.pb.NK, fwd.pb.KL, j0, bk, fwd.BKP, tile.nk.data(), tile.kl.data());
    SetCounts n;
    for (int64_t r = 0; r < bq; ++r) {
      const SetCounts row = fold_row(fwd, tile, i0 + r, r, dots + r * bk, j0, bk, tile.row(r, fwd.pb.D));
      n.pos += row.pos;
      n.neg += row.neg;
    }
    if (fwd.paper_grad)
      add_tile_to_query_grad(tile, tile.acc_p_t.narrow(0, 0, bq), tile.acc_n_t.narrow(0, 0, bq), kJ, bq, bk, n);
  }
  for (int64_t r = 0; r < bq; ++r) finish_row(fwd, i0 + r, tile.row(r, fwd.pb.D));
}

// Whether the forward can keep its Gram rows (N x M, row stride M) for a second pass: one gallery tile.
inline bool gram_rows_keepable(int64_t N, int64_t M, int64_t D) { return choose_tiling(N, M, D).BK >= M; }

// kept: an N x M buffer that the Gram rows are written to (gram_rows_keepable), or null.
template <class S>
void rll_forward_kernel(const PairProblem<S>& pb, const at::Tensor& q, const at::Tensor& k, const S* q_norms,
                        const Params<S> prm, bool paper_grad, at::Tensor& loss, at::Tensor& gq, at::Tensor& stats,
                        S* kept = nullptr) {
  const Tiling tl = choose_tiling(pb.N, pb.M, pb.D);
  TORCH_INTERNAL_ASSERT(kept == nullptr || tl.BK >= pb.M, "rll: kept Gram rows need one gallery tile");
  const Forward<S> fwd{pb,
                       q,
                       k,
                       prm,
                       paper_grad,
                       tl.BQ,
                       tl.BK,
                       vec_pad<S>(tl.BK),
                       loss.data_ptr<S>(),
                       stats.data_ptr<S>(),
                       paper_grad ? gq.data_ptr<S>() : nullptr,
                       q_norms,
                       kept};
  at::parallel_for(0, ceil_div(pb.N, fwd.BQ), 1, [&](int64_t b0, int64_t b1) {
    ForwardTile<S> tile(fwd, true);
    for (int64_t b = b0; b < b1; ++b) forward_query_tile(fwd, tile, b * fwd.BQ);
  });
}

// ================================================================ in-batch forward
// In-batch (q is k = z): the pair (i, j) and the pair (j, i) share d, labels and exclusion, so each
// unordered tile pair (I <= J) gets one Gram GEMM; its rows are folded into the states of the rows of
// I and its transpose into those of the rows of J (the diagonal tile holds both orders of its pairs).
// Every ordered pair is folded once, as in the query-tile kernel, for ~half its Gram FLOPs. Each
// thread keeps its own state of every row, merged at the end (online_merge, FlashAttention's split-K);
// with the "paper" gradient that state holds each row's two D-value accumulators, and each side of a
// tile pair adds its coefficient product C_IJ z_J (or C_JI z_I) to the rows of its side.
template <class S>
struct SymmetricForwardTile {
  ForwardTile<S> tile;                 // dots: the Gram tile; nk, kl: the gallery side's; cp, cn
  std::vector<S> dots_t;               // the Gram tile's transpose
  std::vector<OnlineRow<S>> pos, neg;  // N: this thread's state of every row
  std::vector<S> cp_sum, cn_sum;       // N
  at::Tensor acc_p_t, acc_n_t;         // N x D each, kept scratch ("paper" gradient only)
  S* acc_p = nullptr;
  S* acc_n = nullptr;
  explicit SymmetricForwardTile(const Forward<S>& fwd)
      : tile(fwd, false),
        dots_t(fwd.BQ * fwd.BK),
        pos(fwd.pb.N),
        neg(fwd.pb.N),
        cp_sum(fwd.pb.N),
        cn_sum(fwd.pb.N) {
    if (!fwd.paper_grad) return;
    acc_p_t = kept_zeros({fwd.pb.N, fwd.pb.D}, fwd.q.options());
    acc_n_t = kept_zeros({fwd.pb.N, fwd.pb.D}, fwd.q.options());
    acc_p = acc_p_t.template data_ptr<S>();
    acc_n = acc_n_t.template data_ptr<S>();
  }
  RowState<S> row(int64_t i, int64_t D) {
    const bool grad = acc_p != nullptr;
    return {&pos[i], &neg[i], &cp_sum[i], &cn_sum[i], grad ? acc_p + i * D : nullptr, grad ? acc_n + i * D : nullptr};
  }
};

// Rows x0..x0+nx against the rows y0..y0+ny (zY), from their Gram rows (row stride ny); "paper":
// then their coefficient products into their accumulators.
template <class S>
void fold_tile_rows(const Forward<S>& fwd, SymmetricForwardTile<S>& st, const S* gram, int64_t x0, int64_t nx,
                    int64_t y0, int64_t ny, const at::Tensor& zY) {
  ForwardTile<S>& tile = st.tile;
  load_tile(fwd.pb.NK, fwd.pb.KL, y0, ny, fwd.BKP, tile.nk.data(), tile.kl.data());
  SetCounts n;
  for (int64_t r = 0; r < nx; ++r) {
    const SetCounts row = fold_row(fwd, tile, x0 + r, r, gram + r * ny, y0, ny, st.row(x0 + r, fwd.pb.D));
    n.pos += row.pos;
    n.neg += row.neg;
  }
  if (fwd.paper_grad)
    add_tile_to_query_grad(tile, st.acc_p_t.narrow(0, x0, nx), st.acc_n_t.narrow(0, x0, nx), zY, nx, ny, n);
}

// Tile pair (I, J); kept: where its Gram tile is kept for a second pass (GramTileCache), or null.
template <class S>
void forward_tile_pair(const Forward<S>& fwd, SymmetricForwardTile<S>& st, int64_t I, int64_t J, S* kept) {
  const int64_t B = fwd.BQ, N = fwd.pb.N;
  const int64_t i0 = I * B, bq = std::min(B, N - i0), j0 = J * B, bk = std::min(B, N - j0);
  const at::Tensor zI = fwd.q.narrow(0, i0, bq), zJ = fwd.q.narrow(0, j0, bk);
  S* dots = kept != nullptr ? kept : st.tile.dots.data();
  pair_gram_tile(dots, zI, zJ, I == J);
  fold_tile_rows(fwd, st, dots, i0, bq, j0, bk, zJ);
  if (I == J) return;
  transpose_tile(dots, bq, bk, st.dots_t.data());
  fold_tile_rows(fwd, st, st.dots_t.data(), j0, bk, i0, bq, zI);
}

// Merges o, another thread's partial state of one row's set, into r; "paper": its coefficient sum
// and accumulator (D values) too, each rescaled to the merged running max.
template <class S>
void merge_row_set(OnlineRow<S>& r, S& c_sum, S* acc, const OnlineRow<S>& o, S o_c_sum, const S* o_acc, int64_t D) {
  using V = Vectorized<S>;
  const S m_new = rll_max(r.m, o.m);
  if (m_new == neg_inf<S>()) return;
  const S fr = rescale(r.m, m_new), fo = rescale(o.m, m_new);
  online_merge(r, o);
  c_sum = c_sum * fr + o_c_sum * fo;
  if (acc == nullptr) return;
  const V vr(fr), vo(fo);
  at::vec::map2([&](V a, V b) { return a * vr + b * vo; }, acc, acc, o_acc, D);
}

// Every thread's partial states of rows r0..r1 merged, then each row finished (finish_row).
template <class S>
void merge_and_finish_rows(const Forward<S>& fwd, const std::vector<std::unique_ptr<SymmetricForwardTile<S>>>& parts,
                           int64_t r0, int64_t r1) {
  const int64_t D = fwd.pb.D;
  std::vector<S> acc_p(fwd.paper_grad ? D : 0), acc_n(fwd.paper_grad ? D : 0);
  for (int64_t i = r0; i < r1; ++i) {
    OnlineRow<S> on_p, on_n;
    S cp_sum = 0, cn_sum = 0;
    std::fill(acc_p.begin(), acc_p.end(), S(0));
    std::fill(acc_n.begin(), acc_n.end(), S(0));
    S* ap = fwd.paper_grad ? acc_p.data() : nullptr;
    S* an = fwd.paper_grad ? acc_n.data() : nullptr;
    for (const auto& st : parts) {
      if (!st) continue;
      const RowState<S> o = st->row(i, D);
      merge_row_set(on_p, cp_sum, ap, *o.pos, *o.cp_sum, o.acc_p, D);
      merge_row_set(on_n, cn_sum, an, *o.neg, *o.cn_sum, o.acc_n, D);
    }
    finish_row(fwd, i, RowState<S>{&on_p, &on_n, &cp_sum, &cn_sum, ap, an});
  }
}

// The in-batch kernel, with the "paper" query gradient when paper_grad; cache: where the Gram tiles
// are kept for the gradient pass of the same call (rll_pml_in_batch_with_grad), or null.
template <class S>
void rll_forward_symmetric(const PairProblem<S>& pb, const at::Tensor& z, const S* norms, const Params<S> prm,
                           bool paper_grad, at::Tensor& loss, at::Tensor& gq, at::Tensor& stats,
                           const GramTileCache<S>* cache = nullptr) {
  const int64_t B = symmetric_tile_rows(pb.N);
  const Forward<S> fwd{pb,       z, z, prm, paper_grad, B, B, vec_pad<S>(B), loss.data_ptr<S>(), stats.data_ptr<S>(),
                       paper_grad ? gq.data_ptr<S>() : nullptr, norms};
  const auto pairs = upper_tile_pairs(ceil_div(pb.N, B));
  std::vector<std::unique_ptr<SymmetricForwardTile<S>>> per_thread(at::get_num_threads());
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t p0, int64_t p1) {
    auto& st = per_thread[at::get_thread_num()];
    if (!st) st = std::make_unique<SymmetricForwardTile<S>>(fwd);
    for (int64_t p = p0; p < p1; ++p)
      forward_tile_pair(fwd, *st, pairs[p].first, pairs[p].second, cache != nullptr ? cache->tile(p) : nullptr);
  });
  at::parallel_for(0, pb.N, paper_grad ? rows_grain(pb.D) : 512,
                   [&](int64_t r0, int64_t r1) { merge_and_finish_rows(fwd, per_thread, r0, r1); });
}

// The in-batch forward with the "paper" gradient runs from kSymmetricGradMinRows rows, and from
// kSymmetricGradMinRowsDeep at D >= kSymmetricGradDeep (2 threads, in-process A/Bs against the query-tile
// kernel, bench/RESULTS.md §15 and §20: 1.04x at 320 x 128, 1.07x at 384 x 128, 1.10x at 300 x 300 and
// 384 x 512, a median 1.02x at 256 x 512, but 0.96x at 256 x 128 and 0.985x at 256 x 256), while its two
// N x D accumulators per thread take at most kSymmetricGradBytes in all; else the query-tile kernel runs.
constexpr int64_t kSymmetricGradMinRows = 320;
constexpr int64_t kSymmetricGradMinRowsDeep = 256;
constexpr int64_t kSymmetricGradDeep = 512;
constexpr int64_t kSymmetricGradBytes = int64_t(64) << 20;
template <class S>
bool symmetric_grad_fits(int64_t N, int64_t D) {
  return N >= (D >= kSymmetricGradDeep ? kSymmetricGradMinRowsDeep : kSymmetricGradMinRows) &&
         at::get_num_threads() * 2 * N * D * static_cast<int64_t>(sizeof(S)) <= kSymmetricGradBytes;
}

// ================================================================ backward
// Per-row constants of the backward, from the saved stats [logden_P, L_P, logden_N, L_N] and the
// upstream gradients g_i: the set weights w = (1 - lam) g_i and lam g_i (0 for an empty set),
// finite log-denominators (0 for an empty set) and the set means. Arrays over the rows, so that the
// in-batch backward reads a gallery tile's as vectors.
template <class S>
struct RowSets {
  std::vector<S> wp, wn, logden_p, logden_n, Lp, Ln;
  std::vector<char> has_p, has_n;  // the set is not empty
  RowSets(const S* g_rows, const S* stats, const Params<S>& prm, int64_t N)
      : wp(N), wn(N), logden_p(N), logden_n(N), Lp(N), Ln(N), has_p(N), has_n(N) {
    const S ninf = neg_inf<S>();
    for (int64_t i = 0; i < N; ++i) {
      const S* st = stats + i * 4;
      has_p[i] = st[0] != ninf;
      has_n[i] = st[2] != ninf;
      wp[i] = has_p[i] ? (S(1) - prm.lam) * g_rows[i] : S(0);
      wn[i] = has_n[i] ? prm.lam * g_rows[i] : S(0);
      logden_p[i] = has_p[i] ? st[0] : S(0);
      logden_n[i] = has_n[i] ? st[2] : S(0);
      Lp[i] = st[1];
      Ln[i] = st[3];
    }
  }
};

// The same constants for the rows j0..j0+bk of a gallery tile, zero-padded to whole vectors.
template <class S>
struct TileSets {
  std::vector<S> wp, wn, logden_p, logden_n, Lp, Ln;
  explicit TileSets(int64_t bk_pad)
      : wp(bk_pad), wn(bk_pad), logden_p(bk_pad), logden_n(bk_pad), Lp(bk_pad), Ln(bk_pad) {}
  void load(const RowSets<S>& rows, int64_t j0, int64_t bk) {
    const int64_t bk_pad = static_cast<int64_t>(wp.size());
    copy_padded(rows.wp.data() + j0, bk, wp.data(), bk_pad, S(0));
    copy_padded(rows.wn.data() + j0, bk, wn.data(), bk_pad, S(0));
    copy_padded(rows.logden_p.data() + j0, bk, logden_p.data(), bk_pad, S(0));
    copy_padded(rows.logden_n.data() + j0, bk, logden_n.data(), bk_pad, S(0));
    copy_padded(rows.Lp.data() + j0, bk, Lp.data(), bk_pad, S(0));
    copy_padded(rows.Ln.data() + j0, bk, Ln.data(), bk_pad, S(0));
  }
};

// G_ij = dL/dd_ij / d_ij of query row i against a gallery tile (bk columns at j0, norms nk and
// labels kl padded to bk_pad) into g_row (excluded pairs: 0); returns sum_j G_ij. Row i's sets
// enter when has_p / has_n. With cols (the in-batch backward, q is k), G_ij also holds the gradient
// of row j's loss: the pair (j, i) has the same distance, sets and exclusion.
template <class S>
S row_pair_grads(const PairProblem<S>& pb, const Params<S> prm, bool attached, const RowSets<S>& rows,
                 const TileSets<S>* cols, bool has_p, bool has_n, const S* dot_row, const S* nk, const S* kl, int64_t i,
                 int64_t j0, int64_t bk, int64_t bk_pad, S* g_row) {
  using V = Vectorized<S>;
  const int64_t W = V::size();
  const S rel = dup_rel<S>();
  const V nq(pb.NQ[i]), li(pb.QL[i]), wp(rows.wp[i]), wn(rows.wn[i]);
  const S logden_p = rows.logden_p[i], logden_n = rows.logden_n[i], Lp = rows.Lp[i], Ln = rows.Ln[i];
  V rs(S(0));
  for (int64_t c = 0; c < bk_pad; c += W) {
    const int64_t cnt = std::min(W, bk - c);
    if (cnt <= 0) break;
    const PairDistances<S> pd = pair_distances(dot_row, nk, c, cnt, nq, rel);
    V same, diff;
    label_masks(V::loadu(kl + c), li, same, diff);
    V coef(S(0));
    const V pos = in_pos(same, pd.d, prm);
    if (has_p && !none_set(pos)) {
      const V vp = pos_value(pd.d, prm);
      const V sp = masked_logit(pos, vp, prm.Tp);
      coef = coef + pos_pair_grad(wp, sp, vp, logden_p, Lp, prm.Tp, attached);
      if (cols != nullptr)
        coef = coef + pos_pair_grad(V::loadu(cols->wp.data() + c), sp, vp, V::loadu(cols->logden_p.data() + c),
                                    V::loadu(cols->Lp.data() + c), V(prm.Tp), attached);
    }
    const V neg = in_neg(diff, pd.d, prm);
    if (has_n && !none_set(neg)) {
      const V vn = neg_value(pd.d, prm);
      const V sn = masked_logit(neg, vn, prm.Tn);
      coef = coef + neg_pair_grad(wn, sn, vn, logden_n, Ln, prm.Tn, attached);
      if (cols != nullptr)
        coef = coef + neg_pair_grad(V::loadu(cols->wn.data() + c), sn, vn, V::loadu(cols->logden_n.data() + c),
                                    V::loadu(cols->Ln.data() + c), V(prm.Tn), attached);
    }
    const V g = coef * pair_inv_dist(pd.d, pd.dup);
    rs = rs + g;
    g.store(g_row + c, cnt);
  }
  // An excluded pair is in no set, but the vector loop computed its entry as if it were: its logit may
  // exceed the set's log-denominator (the d = 0 diagonal when beta < 0) and exp() overflow, so the row
  // is summed again after zeroing instead of subtracting the entry from the sum.
  bool any_excluded = false;
  for_excluded(pb.ex, i, j0, bk, [&](int64_t c) {
    g_row[c] = S(0);
    any_excluded = true;
  });
  return any_excluded ? std::accumulate(g_row, g_row + bk, S(0)) : hsum(rs);
}

// What every thread of one (not in-batch) backward call reads and writes.
template <class S>
struct Backward {
  const PairProblem<S>& pb;
  const RowSets<S>& rows;
  const at::Tensor& q;
  const at::Tensor& k;
  const S* g_rows;
  Params<S> prm;
  bool attached, need_gq, need_gk;
  int64_t BQ, BK, BKP;
  at::Tensor& gq;
  const S* q_norms;                   // |e_i| of the query rows when the op normalises them, else null
  at::Tensor gk_parts, colsum_parts;  // per thread: gallery gradients of different query tiles hit the same rows
};

template <class S>
struct BackwardTile {
  std::vector<S> dots, g, nk, kl, rowsum;
  explicit BackwardTile(const Backward<S>& bwd)
      : dots(bwd.BQ * bwd.BK), g(bwd.BQ * bwd.BK), nk(bwd.BKP), kl(bwd.BKP), rowsum(bwd.BQ) {}
};

// The G tile of query tile I (rows i0..i0+bq) against gallery tile J; false when it is all zero.
template <class S>
bool pair_grad_tile(const Backward<S>& bwd, BackwardTile<S>& tile, int64_t i0, int64_t bq, int64_t j0, int64_t bk) {
  bool any = false;
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t i = i0 + r;
    S* g_row = tile.g.data() + r * bk;
    const bool has_p = bwd.rows.has_p[i], has_n = bwd.rows.has_n[i];
    if ((!has_p && !has_n) || bwd.g_rows[i] == S(0)) {
      std::fill(g_row, g_row + bk, S(0));
      continue;
    }
    tile.rowsum[r] +=
        row_pair_grads(bwd.pb, bwd.prm, bwd.attached, bwd.rows, static_cast<const TileSets<S>*>(nullptr), has_p, has_n,
                       tile.dots.data() + r * bk, tile.nk.data(), tile.kl.data(), i, j0, bk, bwd.BKP, g_row);
    any = true;
  }
  return any;
}

// dL/dq_i += sum_j G_ij (-k_j), dL/dk_j += sum_i G_ij (-q_i) (this thread's part) and the column
// sums sum_i G_ij; the diagonal terms (sum_j G_ij) q_i and (sum_i G_ij) k_j are added at the end.
template <class S>
void add_tile_grads(Backward<S>& bwd, BackwardTile<S>& tile, int64_t tid, const at::Tensor& qI, const at::Tensor& kJ,
                    int64_t i0, int64_t j0) {
  const int64_t bq = qI.size(0), bk = kJ.size(0);
  const int64_t nnz = count_nonzero(tile.g.data(), bq * bk);  // dense or sparse products (add_coef_product)
  if (bwd.need_gq) add_coef_product(bwd.gq.narrow(0, i0, bq), tile.g.data(), bq, bk, nnz, kJ, S(-1), false);
  if (!bwd.need_gk) return;
  add_coef_product(bwd.gk_parts[tid].narrow(0, j0, bk), tile.g.data(), bq, bk, nnz, qI, S(-1), true);
  S* colsum = bwd.colsum_parts[tid].template data_ptr<S>();
  for (int64_t r = 0; r < bq; ++r) {
    const S* g_row = tile.g.data() + r * bk;
    for (int64_t c = 0; c < bk; ++c) colsum[j0 + c] += g_row[c];
  }
}

// Query tile I against every gallery tile J.
template <class S>
void backward_query_tile(Backward<S>& bwd, BackwardTile<S>& tile, int64_t tid, int64_t i0) {
  const int64_t bq = std::min(bwd.BQ, bwd.pb.N - i0);
  const at::Tensor qI = bwd.q.narrow(0, i0, bq);
  std::fill(tile.rowsum.begin(), tile.rowsum.end(), S(0));
  for (int64_t j0 = 0; j0 < bwd.pb.M; j0 += bwd.BK) {
    const int64_t bk = std::min(bwd.BK, bwd.pb.M - j0);
    const at::Tensor kJ = bwd.k.narrow(0, j0, bk);
    gram_tile(tile.dots.data(), qI, kJ);
    load_tile(bwd.pb.NK, bwd.pb.KL, j0, bk, bwd.BKP, tile.nk.data(), tile.kl.data());
    if (pair_grad_tile(bwd, tile, i0, bq, j0, bk)) add_tile_grads(bwd, tile, tid, qI, kJ, i0, j0);
  }
  if (!bwd.need_gq) return;
  bwd.gq.narrow(0, i0, bq).addcmul_(qI, at::from_blob(tile.rowsum.data(), {bq, 1}, qI.options()));
  if (bwd.q_norms != nullptr)  // dL/de_i from dL/dz_i
    normalize_backward_rows(bwd.gq.template data_ptr<S>() + i0 * bwd.pb.D, qI.template data_ptr<S>(),
                            bwd.q_norms + i0, bq, bwd.pb.D);
}

// The per-thread partial gradients summed, in one pass over the rows: out_r = sum_t parts[t]_r +
// (sum_t rowsums[t]_r) x_r, then through the normalisation when norms is not null (dL/de_r).
template <class S>
void combine_thread_parts(const at::Tensor& parts, const at::Tensor& rowsums, const at::Tensor& x, const S* norms,
                          at::Tensor& out) {
  const int64_t T = parts.size(0), R = parts.size(1), D = parts.size(2);
  const S *P = parts.data_ptr<S>(), *RS = rowsums.data_ptr<S>(), *X = x.data_ptr<S>();
  S* O = out.data_ptr<S>();
  at::parallel_for(0, R, rows_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      S rs = S(0);
      for (int64_t t = 0; t < T; ++t) rs += RS[t * R + r];
      S* o = O + r * D;
      const S* xr = X + r * D;
      for (int64_t e = 0; e < D; ++e) o[e] = rs * xr[e];
      for (int64_t t = 0; t < T; ++t) {
        const S* p = P + (t * R + r) * D;
        for (int64_t e = 0; e < D; ++e) o[e] += p[e];
      }
      if (norms != nullptr) normalize_backward_row(o, xr, norms[r], D);
    }
  });
}

template <class S>
void rll_backward_kernel(const PairProblem<S>& pb, const at::Tensor& grad_rows, const at::Tensor& q,
                         const at::Tensor& k, const S* q_norms, const S* k_norms, const at::Tensor& stats,
                         const Params<S> prm, bool attached, bool need_gq, bool need_gk, at::Tensor& gq,
                         at::Tensor& gk) {
  const RowSets<S> rows(grad_rows.data_ptr<S>(), stats.data_ptr<S>(), prm, pb.N);
  const Tiling tl = choose_tiling(pb.N, pb.M, pb.D);
  const auto opts = q.options();
  Backward<S> bwd{pb,
                  rows,
                  q,
                  k,
                  grad_rows.data_ptr<S>(),
                  prm,
                  attached,
                  need_gq,
                  need_gk,
                  tl.BQ,
                  tl.BK,
                  vec_pad<S>(tl.BK),
                  gq,
                  q_norms,
                  need_gk ? zeros_per_thread({pb.M, pb.D}, opts) : at::Tensor(),
                  need_gk ? zeros_per_thread({pb.M}, opts) : at::Tensor()};
  at::parallel_for(0, ceil_div(pb.N, bwd.BQ), 1, [&](int64_t b0, int64_t b1) {
    const int64_t tid = at::get_thread_num();
    BackwardTile<S> tile(bwd);
    for (int64_t b = b0; b < b1; ++b) backward_query_tile(bwd, tile, tid, b * bwd.BQ);
  });
  if (need_gk) combine_thread_parts(bwd.gk_parts, bwd.colsum_parts, k, k_norms, gk);
}

// ================================================================ in-batch backward
// In-batch "pml" backward (q is k = z): the pair (i, j) and the pair (j, i) share d, labels and
// exclusion, so each unordered tile pair (I <= J) is computed once. With H_ij = G_ij + G_ji the
// gradient is dz_i += sum_j H_ij (z_i - z_j) for both ends, i.e. one Gram GEMM and two gradient
// GEMMs per unordered pair instead of three GEMMs per ordered pair.

template <class S>
struct SymmetricTile {
  int64_t B, BP;  // tile rows (symmetric_tile_rows) and their padded width
  std::vector<S> dots, h, nk, kl, colsum;
  TileSets<S> cols;
  explicit SymmetricTile(int64_t B_)
      : B(B_), BP(vec_pad<S>(B_)), dots(B * B), h(B * B), nk(BP), kl(BP), colsum(BP), cols(BP) {}
};

// Rows grouped by label: `order` sorts the rows by (label, row), rows first[i]..last[i] of it share
// row i's label.
struct LabelGroups {
  std::vector<int64_t> order, first, last;
};
template <class S>
LabelGroups group_by_label(const S* labels, int64_t N) {
  LabelGroups g{std::vector<int64_t>(N), std::vector<int64_t>(N), std::vector<int64_t>(N)};
  std::iota(g.order.begin(), g.order.end(), int64_t(0));
  std::sort(g.order.begin(), g.order.end(), [&](int64_t a, int64_t b) {
    return labels[a] < labels[b] || (labels[a] == labels[b] && a < b);
  });
  for (int64_t s = 0; s < N;) {
    int64_t e = s;
    while (e < N && labels[g.order[e]] == labels[g.order[s]]) ++e;
    for (int64_t t = s; t < e; ++t) g.first[g.order[t]] = s, g.last[g.order[t]] = e;
    s = e;
  }
  return g;
}

// What every tile pair of one in-batch backward call reads. A tile whose rows all have an empty
// negative set (has_neg false) holds no negative member in any of its pairs: j in N_i iff i in N_j
// (d, labels and exclusion are symmetric), so N_i empty for every i in I, or for every j in J, leaves
// only the same-label pairs of the tile pair (I, J) to compute (same_label_tile).
template <class S>
struct SymmetricBackward {
  const PairProblem<S>& pb;
  const RowSets<S>& rows;
  Params<S> prm;
  bool attached;
  const at::Tensor& z;
  int64_t B;
  LabelGroups groups;
  std::vector<char> has_neg;  // per tile: some row of it has a non-empty negative set
  SymmetricBackward(const PairProblem<S>& pb_, const RowSets<S>& rows_, Params<S> prm_, bool attached_,
                    const at::Tensor& z_, int64_t B_)
      : pb(pb_), rows(rows_), prm(prm_), attached(attached_), z(z_), B(B_), has_neg(ceil_div(pb_.N, B_), 0) {
    for (int64_t i = 0; i < pb.N; ++i) has_neg[i / B] |= rows.has_n[i];
    // some row without negatives: a tile pair or a block of rows may need the same-label pairs alone
    if (std::find(rows.has_n.begin(), rows.has_n.end(), 0) != rows.has_n.end()) groups = group_by_label(pb.QL, pb.N);
  }
};

// The Gram tile of (I, J) with only its same-label pairs computed (the others 0: with the negative
// terms off, only positives read a pair's distance), when those are at most one pair in kDenseShare;
// returns false (nothing written) when they are more, for the GEMM.
template <class S>
bool same_label_tile(const SymmetricBackward<S>& sb, int64_t i0, int64_t bq, int64_t j0, int64_t bk, S* dots) {
  const LabelGroups& g = sb.groups;
  std::vector<std::pair<const int64_t*, const int64_t*>> spans(bq);  // row i's group members in [j0, j0 + bk)
  int64_t count = 0;
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t *b = g.order.data() + g.first[i0 + r], *e = g.order.data() + g.last[i0 + r];
    spans[r] = {std::lower_bound(b, e, j0), std::lower_bound(b, e, j0 + bk)};
    count += spans[r].second - spans[r].first;
  }
  if (count * kDenseShare > bq * bk) return false;
  std::fill(dots, dots + bq * bk, S(0));
  const int64_t D = sb.pb.D;
  const S* Z = sb.z.template const_data_ptr<S>();
  using V = Vectorized<S>;
  for (int64_t r = 0; r < bq; ++r)
    for (const int64_t* it = spans[r].first; it != spans[r].second; ++it)
      dots[r * bk + (*it - j0)] = at::vec::map2_reduce_all<S>([](V x, V y) { return x * y; },
                                                               [](V x, V y) { return x + y; }, Z + (i0 + r) * D,
                                                               Z + *it * D, D);
  return true;
}

// The rows [r0, r1) of tile pair (I, J) against tile J (loaded in tile), from their Gram rows dots
// (row stride bk): H into tile.h, the row sums of H into rowsum; negatives: whether the negative
// terms are evaluated.
template <class S>
void symmetric_h_rows(const SymmetricBackward<S>& sb, SymmetricTile<S>& tile, const S* dots, bool negatives,
                      int64_t i0, int64_t j0, int64_t bk, int64_t r0, int64_t r1, S* rowsum) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = i0 + r;
    rowsum[i] += row_pair_grads(sb.pb, sb.prm, sb.attached, sb.rows, &tile.cols, true, negatives, dots + r * bk,
                                tile.nk.data(), tile.kl.data(), i, j0, bk, tile.BP, tile.h.data() + r * bk);
  }
}

// Tile pair (I, J): H into tile.h, the row sums of H into rowsum, and dz_I -= H z_J,
// dz_J -= H^T z_I (off the diagonal) into gz. wide: the call runs on the calling thread alone,
// outside any parallel region, so the GEMMs use every thread and the rows are split over them;
// else it is one thread's task and runs serially. kept: the pair's Gram tile from the forward pass
// of the same call (GramTileCache), else null and it is computed here.
template <class S>
void symmetric_tile_pair(const SymmetricBackward<S>& sb, SymmetricTile<S>& tile, int64_t I, int64_t J,
                         at::Tensor& gz, S* rowsum, bool wide, const S* kept) {
  const int64_t B = tile.B, BP = tile.BP, N = sb.pb.N;
  const int64_t i0 = I * B, bq = std::min(B, N - i0);
  const int64_t j0 = J * B, bk = std::min(B, N - j0);
  const at::Tensor zI = sb.z.narrow(0, i0, bq), zJ = sb.z.narrow(0, j0, bk);
  const bool negatives = sb.has_neg[I] && sb.has_neg[J];
  if (kept == nullptr && (negatives || !same_label_tile(sb, i0, bq, j0, bk, tile.dots.data())))
    pair_gram_tile(tile.dots.data(), zI, zJ, I == J);
  const S* dots = kept != nullptr ? kept : tile.dots.data();
  load_tile(sb.pb.NK, sb.pb.KL, j0, bk, BP, tile.nk.data(), tile.kl.data());
  tile.cols.load(sb.rows, j0, bk);
  if (wide)
    at::parallel_for(0, bq, 8, [&](int64_t r0, int64_t r1) {
      symmetric_h_rows(sb, tile, dots, negatives, i0, j0, bk, r0, r1, rowsum);
    });
  else
    symmetric_h_rows(sb, tile, dots, negatives, i0, j0, bk, 0, bq, rowsum);
  const int64_t nnz = count_nonzero(tile.h.data(), bq * bk);  // dense or sparse products (add_coef_product)
  add_coef_product(gz.narrow(0, i0, bq), tile.h.data(), bq, bk, nnz, zJ, S(-1), false);
  if (I == J) return;  // the diagonal tile already holds both orders of each pair in its rows
  add_coef_product(gz.narrow(0, j0, bk), tile.h.data(), bq, bk, nnz, zI, S(-1), true);
  std::fill(tile.colsum.begin(), tile.colsum.end(), S(0));
  for (int64_t r = 0; r < bq; ++r)
    for (int64_t c = 0; c < bk; ++c) tile.colsum[c] += tile.h[r * bk + c];
  for (int64_t c = 0; c < bk; ++c) rowsum[j0 + c] += tile.colsum[c];
}

// Small batches (at most two tiles): the rows split over the threads, each block of rows against
// the whole batch. H_ij = G_ij + G_ji holds both orders of a pair, so row i's gradient
// sum_j H_ij (z_i - z_j) needs only row i of H: every thread's GEMMs are its own (single-threaded
// tile GEMMs run ~1.5x faster per core than one 64-row GEMM on two threads), with no per-thread
// parts to zero and combine; the Gram FLOPs are those of the whole N x N tile. kept: the forward's
// Gram rows (N x N) of the same call (rll_pml_in_batch_with_grad), or null and they are computed here.
template <class S>
void rll_backward_row_blocks(const SymmetricBackward<S>& sb, const S* norms, at::Tensor& gz, const S* kept) {
  const int64_t N = sb.pb.N, D = sb.pb.D, BP = vec_pad<S>(N);
  std::vector<S> nk(BP), kl(BP);
  load_tile(sb.pb.NK, sb.pb.KL, 0, N, BP, nk.data(), kl.data());
  TileSets<S> cols(BP);
  cols.load(sb.rows, 0, N);
  const S* Z = sb.z.template const_data_ptr<S>();
  S* GZ = gz.data_ptr<S>();
  at::parallel_for(0, N, 8, [&](int64_t r0, int64_t r1) {
    const int64_t R = r1 - r0;
    std::vector<S> dots(kept != nullptr ? 0 : R * N), h(R * N), rowsum(R);
    const bool negatives = std::find(sb.rows.has_n.begin() + r0, sb.rows.has_n.begin() + r1, 1) !=
                           sb.rows.has_n.begin() + r1;  // some row of the block has a negative member
    if (kept == nullptr && (negatives || !same_label_tile(sb, r0, R, 0, N, dots.data())))
      gram_tile(dots.data(), sb.z.narrow(0, r0, R), sb.z);
    const S* gram = kept != nullptr ? kept + r0 * N : dots.data();
    for (int64_t r = 0; r < R; ++r)
      rowsum[r] = row_pair_grads(sb.pb, sb.prm, sb.attached, sb.rows, &cols, true, negatives, gram + r * N,
                                 nk.data(), kl.data(), r0 + r, 0, N, BP, h.data() + r * N);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t e = 0; e < D; ++e) GZ[(r0 + r) * D + e] = rowsum[r] * Z[(r0 + r) * D + e];
    add_coef_product(gz.narrow(0, r0, R), h.data(), R, N, count_nonzero(h.data(), R * N), sb.z, S(-1), false);
    if (norms != nullptr) normalize_backward_rows(GZ + r0 * D, Z + r0 * D, norms + r0, R, D);
  });
}

// Fewer tile pairs than 2 per thread: one pair at a time on every thread ("wide"), else each
// thread takes whole pairs into its own partial gradient. The forward pass of the same call
// (rll_pml_in_batch_with_grad) may have kept its Gram tiles (cache) or, at one or two tiles, its Gram
// rows (gram_rows, N x N); else both are null.
template <class S>
void rll_backward_symmetric(const PairProblem<S>& pb, const at::Tensor& grad_rows, const at::Tensor& z,
                            const S* norms, const at::Tensor& stats, const Params<S> prm, bool attached,
                            at::Tensor& gz, const GramTileCache<S>* cache = nullptr,
                            const S* gram_rows = nullptr) {
  const RowSets<S> rows(grad_rows.data_ptr<S>(), stats.data_ptr<S>(), prm, pb.N);
  const int64_t B = symmetric_tile_rows(pb.N);
  const SymmetricBackward<S> sb(pb, rows, prm, attached, z, B);
  if (ceil_div(pb.N, B) <= 2) {  // N <= 128 at 2 threads; at N = 256 both took the same time, at 512 blocks lost
    rll_backward_row_blocks(sb, norms, gz, gram_rows);
    return;
  }
  const auto pairs = upper_tile_pairs(ceil_div(pb.N, B));
  const int64_t n_pairs = static_cast<int64_t>(pairs.size());
  const bool wide = n_pairs < 2 * at::get_num_threads();
  const int64_t parts = wide ? 1 : at::get_num_threads();
  at::Tensor gz_parts = kept_zeros({parts, pb.N, pb.D}, z.options());
  at::Tensor rowsum_parts = kept_zeros({parts, pb.N}, z.options());
  const auto kept = [&](int64_t p) -> const S* { return cache != nullptr ? cache->tile(p) : nullptr; };
  if (wide) {
    SymmetricTile<S> tile(B);
    at::Tensor gz_t = gz_parts[0];
    for (int64_t p = 0; p < n_pairs; ++p)
      symmetric_tile_pair(sb, tile, pairs[p].first, pairs[p].second, gz_t, rowsum_parts.data_ptr<S>(), true, kept(p));
  } else {
    at::parallel_for(0, n_pairs, 1, [&](int64_t p0, int64_t p1) {
      const int64_t tid = at::get_thread_num();
      SymmetricTile<S> tile(B);
      at::Tensor gz_t = gz_parts[tid];
      S* rowsum = rowsum_parts[tid].data_ptr<S>();
      for (int64_t p = p0; p < p1; ++p)
        symmetric_tile_pair(sb, tile, pairs[p].first, pairs[p].second, gz_t, rowsum, false, kept(p));
    });
  }
  combine_thread_parts(gz_parts, rowsum_parts, z, norms, gz);
}

// ================================================================ "pml" in-batch, both passes in one call
// With a uniform upstream gradient (need_grad with attached, in-batch: what the mean and sum reductions
// ask for, docs/semantics.md §2.6) the forward op computes the gradient of the rows' mean
// (1/N) sum_i L(i) as well: the statistics pass, then the backward's pass over the same tile pairs with
// row weights 1/N (what the mean's backward gives every row, so that autograd can return it as is), reading
// the Gram tiles that the first pass kept (GramTileCache) instead of computing them again; autograd
// hands it on, scaled to the upstream gradient. Where the backward splits the rows over the threads
// (one or two tiles: N <= 128 at 2 threads, N <= 512 at 1), the statistics come from the query-tile
// kernel, which keeps its N x N Gram rows for it (when the gallery is one tile and they fit
// kGramCacheBytes); below kSymmetricMinRows that kernel runs too, keeping nothing.
template <class S>
void rll_pml_in_batch_with_grad(const PairProblem<S>& pb, const at::Tensor& z, const S* norms, const Params<S> prm,
                                at::Tensor& loss, at::Tensor& stats, at::Tensor& gz) {
  const at::Tensor mean_rows = at::full({pb.N}, 1.0 / static_cast<double>(pb.N), z.options());
  at::Tensor no_query_grad;
  const int64_t B = symmetric_tile_rows(pb.N);
  const bool row_blocks = ceil_div(pb.N, B) <= 2;
  if (pb.N < kSymmetricMinRows || row_blocks) {
    const bool keep = row_blocks && gram_rows_keepable(pb.N, pb.N, pb.D) &&
                      pb.N * pb.N * static_cast<int64_t>(sizeof(S)) <= static_cast<int64_t>(kGramCacheBytes);
    const at::Tensor gram_rows = keep ? kept_empty({pb.N, pb.N}, z.options()) : at::Tensor();
    S* kept = keep ? gram_rows.data_ptr<S>() : nullptr;
    rll_forward_kernel<S>(pb, z, z, norms, prm, false, loss, no_query_grad, stats, kept);
    rll_backward_symmetric<S>(pb, mean_rows, z, norms, stats, prm, true, gz, nullptr, kept);
    return;
  }
  const GramTileCache<S> cache(upper_tile_pairs(ceil_div(pb.N, B)), B, pb.N, z.options());
  rll_forward_symmetric<S>(pb, z, norms, prm, false, loss, no_query_grad, stats, &cache);
  rll_backward_symmetric<S>(pb, mean_rows, z, norms, stats, prm, true, gz, &cache);
}

// ---------------------------------------------------------------- argument checks
void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, "rll: ", name, " must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "rll (cpu): ", name,
              " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "rll (cpu): ", name, " must be on the CPU, got ", x.device());
}

void check_index(const c10::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == at::kLong, "rll: ", name,
              " must be int64 of shape (", n, ",), got ", t->sizes(), " ", t->scalar_type());
  TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "rll (cpu): ", name, " must be a contiguous CPU tensor");
}

// In-batch (k absent): no gallery labels or ids either; else k with the queries' D and dtype.
void check_inputs(const at::Tensor& q, const at::Tensor& ql, const c10::optional<at::Tensor>& qid,
                  const c10::optional<at::Tensor>& k, const c10::optional<at::Tensor>& kl,
                  const c10::optional<at::Tensor>& kid) {
  check_rows(q, "q");
  check_index(ql, "q_labels", q.size(0));
  check_index(qid, "q_ids", q.size(0));
  if (!k.has_value()) {
    TORCH_CHECK(!kl.has_value() && !kid.has_value(), "rll: k_labels and k_ids need k (in-batch: all three absent)");
    return;
  }
  check_rows(*k, "k");
  TORCH_CHECK(q.size(1) == k->size(1), "rll: q and k must have the same embedding size, got ", q.size(1), " and ",
              k->size(1));
  TORCH_CHECK(q.scalar_type() == k->scalar_type(), "rll: q and k must have the same dtype, got ", q.scalar_type(),
              " and ", k->scalar_type());
  TORCH_CHECK(kl.has_value(), "rll: k_labels must be given with k");
  check_index(kl, "k_labels", k->size(0));
  TORCH_CHECK(qid.has_value() == kid.has_value(), "rll: q_ids and k_ids must be given together");
  check_index(kid, "k_ids", k->size(0));
}

// den_bias = bias_per_row x (den_rows, or the gallery's rows): PML's M * 1e-5 (docs/semantics.md §2.8).
template <class S>
Params<S> make_params(double alpha, double beta, double Tn, double Tp, double lam, double bias_per_row,
                      c10::optional<int64_t> den_rows, int64_t M) {
  const double den_bias = bias_per_row * static_cast<double>(den_rows.value_or(M));
  const std::string err = params_error(alpha, beta, Tn, Tp, lam, den_bias);
  TORCH_CHECK(err.empty(), err);
  return params_in<S>(alpha, beta, Tn, Tp, lam, den_bias);
}

// ---------------------------------------------------------------- operands
// The rows as the kernels read them (docs/semantics.md §1.4). normalize: z = e/|e| of the queries
// and then (unless in-batch) the gallery in one contiguous tensor, |e| in norms, |z|^2 as the
// squared norms; else the raw rows, contiguous, and their squared norms. k is q in-batch.
template <class S>
struct Operands {
  at::Tensor q, k, nq, nk;
  const S* q_norms = nullptr;  // |e| of the query rows (normalize), else null
  const S* k_norms = nullptr;
};

template <class S>
void view_normalized(Operands<S>& op, const at::Tensor& z, const at::Tensor& norms, const at::Tensor& sq, int64_t N,
                     bool in_batch) {
  const int64_t M = z.size(0) - (in_batch ? 0 : N);
  op.q = z.narrow(0, 0, N);
  op.k = in_batch ? op.q : z.narrow(0, N, M);
  op.nq = sq.narrow(0, 0, N);
  op.nk = in_batch ? op.nq : sq.narrow(0, N, M);
  op.q_norms = norms.data_ptr<S>();
  op.k_norms = op.q_norms + (in_batch ? 0 : N);
}

// Squared norms of raw rows; a non-finite row raises, naming the tensor.
template <class S>
at::Tensor checked_sq_norms(const at::Tensor& x, const char* name) {
  at::Tensor sq = at::empty({x.size(0)}, x.options());
  check_finite_rows(sq_norms_checked<S>(x, sq.data_ptr<S>()), name);
  return sq;
}

// Forward: normalises (writing z and norms) or takes the raw rows, checking every row is finite.
template <class S>
Operands<S> forward_operands(const at::Tensor& q, const c10::optional<at::Tensor>& k, bool normalize, at::Tensor& z,
                             at::Tensor& norms) {
  const int64_t N = q.size(0), D = q.size(1);
  const bool in_batch = !k.has_value();
  Operands<S> op;
  if (normalize) {
    const int64_t R = N + (in_batch ? 0 : k->size(0));
    z = at::empty({R, D}, q.options());
    norms = at::empty({R}, q.options());
    at::Tensor sq = at::empty({R}, q.options());
    S *Z = z.data_ptr<S>(), *NR = norms.data_ptr<S>(), *SQ = sq.data_ptr<S>();
    check_finite_rows(normalize_rows<S>(q.detach(), Z, NR, SQ), "embeddings");
    if (!in_batch) check_finite_rows(normalize_rows<S>(k->detach(), Z + N * D, NR + N, SQ + N), "ref_emb");
    view_normalized(op, z, norms, sq, N, in_batch);
    return op;
  }
  z = at::empty({0}, q.options());
  norms = at::empty({0}, q.options());
  op.q = q.detach().contiguous();
  op.nq = checked_sq_norms<S>(op.q, "embeddings");
  op.k = in_batch ? op.q : k->detach().contiguous();
  op.nk = in_batch ? op.nq : checked_sq_norms<S>(op.k, "ref_emb");
  return op;
}

// Backward: the forward's z and norms, or the raw rows.
template <class S>
Operands<S> backward_operands(const at::Tensor& q, const c10::optional<at::Tensor>& k, bool normalize,
                              const at::Tensor& z, const at::Tensor& norms) {
  const int64_t N = q.size(0);
  const bool in_batch = !k.has_value();
  Operands<S> op;
  if (normalize) {
    const int64_t R = N + (in_batch ? 0 : k->size(0));
    TORCH_CHECK(z.dim() == 2 && z.size(0) == R && z.size(1) == q.size(1) && z.scalar_type() == q.scalar_type() &&
                    z.is_contiguous(),
                "rll_bwd: z must be the forward's contiguous (", R, ", ", q.size(1), ") rows, got ", z.sizes());
    TORCH_CHECK(norms.dim() == 1 && norms.size(0) == R && norms.scalar_type() == q.scalar_type(),
                "rll_bwd: norms must be the forward's (", R, ",) norms, got ", norms.sizes());
    const at::Tensor zd = z.detach();
    view_normalized(op, zd, norms.detach().contiguous(), row_sq_norms<S>(zd), N, in_batch);
    return op;
  }
  op.q = q.detach().contiguous();
  op.nq = row_sq_norms<S>(op.q);
  op.k = in_batch ? op.q : k->detach().contiguous();
  op.nk = in_batch ? op.nq : row_sq_norms<S>(op.k);
  return op;
}

// ---------------------------------------------------------------- ops
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rll_fwd_cpu(
    const at::Tensor& q, const at::Tensor& q_labels, const c10::optional<at::Tensor>& q_ids,
    const c10::optional<at::Tensor>& k, const c10::optional<at::Tensor>& k_labels,
    const c10::optional<at::Tensor>& k_ids, double alpha, double beta, double Tn, double Tp, double imbalance,
    double bias_per_row, c10::optional<int64_t> den_rows, bool normalize, bool attached, bool need_grad) {
  const bool paper_grad = need_grad && !attached;
  // "pml" in-batch: need_grad says the upstream gradient is uniform; the gradient of the rows' mean
  // comes from this call (rll_pml_in_batch_with_grad)
  const bool pml_grad = need_grad && attached && !k.has_value();
  check_inputs(q, q_labels, q_ids, k, k_labels, k_ids);
  const int64_t N = q.size(0), D = q.size(1), M = k.has_value() ? k->size(0) : N;
  at::Tensor loss = at::empty({N}, q.options());
  at::Tensor stats = at::empty({N, 4}, q.options());
  at::Tensor gq = paper_grad || pml_grad ? at::empty({N, D}, q.options()) : at::empty({0}, q.options());
  at::Tensor z, norms;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rll_fwd_cpu", [&] {
    const auto prm = make_params<scalar_t>(alpha, beta, Tn, Tp, imbalance, bias_per_row, den_rows, M);
    const Operands<scalar_t> op = forward_operands<scalar_t>(q, k, normalize, z, norms);
    if (N == 0) return;
    const PairProblem<scalar_t> pb(op.nq, op.nk, q_labels, q_ids, k.has_value() ? &*k_labels : nullptr, k_ids, D);
    if (pml_grad) {
      rll_pml_in_batch_with_grad<scalar_t>(pb, op.q, op.q_norms, prm, loss, stats, gq);
      return;
    }
    // in-batch: each unordered tile pair once (with the "paper" gradient while its accumulators fit)
    if (!k.has_value() && N >= kSymmetricMinRows && (!paper_grad || symmetric_grad_fits<scalar_t>(N, D)))
      rll_forward_symmetric<scalar_t>(pb, op.q, op.q_norms, prm, paper_grad, loss, gq, stats);
    else
      rll_forward_kernel<scalar_t>(pb, op.q, op.k, op.q_norms, prm, paper_grad, loss, gq, stats);
  });
  return {loss, gq, stats, z, norms};
}

std::tuple<at::Tensor, at::Tensor> rll_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& q, const at::Tensor& q_labels,
    const c10::optional<at::Tensor>& q_ids, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& k_labels, const c10::optional<at::Tensor>& k_ids, const at::Tensor& stats,
    const at::Tensor& z, const at::Tensor& norms, double alpha, double beta, double Tn, double Tp, double imbalance,
    double bias_per_row, c10::optional<int64_t> den_rows, bool normalize, bool attached, bool need_gq, bool need_gk) {
  check_inputs(q, q_labels, q_ids, k, k_labels, k_ids);
  const bool in_batch = !k.has_value();
  const int64_t N = q.size(0), M = in_batch ? N : k->size(0);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == N && grad_rows.scalar_type() == q.scalar_type(),
              "rll_bwd: grad_rows must be (", N, ",) of dtype ", q.scalar_type(), ", got ", grad_rows.sizes(), " ",
              grad_rows.scalar_type());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == 4 && stats.scalar_type() == q.scalar_type(),
              "rll_bwd: stats must be (", N, ", 4), got ", stats.sizes());
  need_gk = need_gk && !in_batch;  // in-batch, the whole gradient is grad q
  // the in-batch "pml" backward writes every entry of grad q once (combine_thread_parts); the others add tiles into it
  const bool symmetric = in_batch && attached;
  at::Tensor gq = !need_gq   ? at::empty({0}, q.options())
                  : symmetric ? at::empty_like(q, at::MemoryFormat::Contiguous)
                              : at::zeros_like(q, at::MemoryFormat::Contiguous);
  at::Tensor gk = need_gk ? at::zeros({M, q.size(1)}, q.options()) : at::empty({0}, q.options());
  if (N == 0 || (!need_gq && !need_gk)) return {gq, gk};
  const at::Tensor g = grad_rows.detach().contiguous(), st = stats.detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rll_bwd_cpu", [&] {
    const auto prm = make_params<scalar_t>(alpha, beta, Tn, Tp, imbalance, bias_per_row, den_rows, M);
    const Operands<scalar_t> op = backward_operands<scalar_t>(q, k, normalize, z, norms);
    const PairProblem<scalar_t> pb(op.nq, op.nk, q_labels, q_ids, in_batch ? nullptr : &*k_labels, k_ids,
                                   q.size(1));
    // in-batch "pml": both ends of every pair, each unordered tile pair once
    if (symmetric) {
      rll_backward_symmetric<scalar_t>(pb, g, op.q, op.q_norms, st, prm, attached, gq);
      return;
    }
    rll_backward_kernel<scalar_t>(pb, g, op.q, op.k, op.q_norms, op.k_norms, st, prm, attached, need_gq, need_gk,
                                  gq, gk);
  });
  return {gq, gk};
}

}  // namespace

// This build's RLL kernels (csrc/cpu_capability.h); cpu_dispatch.cpp registers those of the build it picks.
void register_rll_cpu_kernels(torch::Library& m) {
  m.impl("rll_fwd", &rll_fwd_cpu);
  m.impl("rll_bwd", &rll_bwd_cpu);
}

RLL_CPU_CAPABILITY_END
}  // namespace rll
