// Fused Ranked List Loss, CUDA kernels and launchers (torch-free; see rll_kernels.cuh).
//
// Tiles: a block of 256 threads (8 warps) owns BQ query rows (or BK gallery rows) and streams the
// other side in tiles. Per tile:
//   1. the distance tile S = Q_I K_J^T (BQ x BK) is built in shared memory from D-chunks of Q_I and
//      K_J staged in shared memory (WMMA tensor cores for fp16/bf16, register-tiled FMAs else);
//   2. each warp takes BQ/8 rows, each lane BK/32 columns, and applies the per-pair math of
//      rll_pair.h (Gram distance, duplicates, sets, logits, online softmax or gradient coefficients);
//      row reductions are warp shuffles, so a row's online state needs no block barrier;
//   3. gradient kernels turn the tile into G (in place) and add -G K_J (or -G^T Q_I) to the rows
//      the block owns, with a second register-tiled product through shared memory.
// Every output row is written by exactly one block: no atomics, deterministic results.
#include "rll_kernels.cuh"

#include <mma.h>

#include <limits>
#include <type_traits>

// Kernel launch; tests/cuda_emu/ runs the same kernels on the CPU (one host thread per CUDA
// thread) by defining RLL_CUDA_EMULATION, so their logic is tested without a GPU.
#ifdef RLL_CUDA_EMULATION
#define RLL_LAUNCH(kernel, grid, stream, ...) rll_emu::launch(kernel, grid, kThreads, __VA_ARGS__)
#else
#define RLL_LAUNCH(kernel, grid, stream, ...) kernel<<<grid, kThreads, 0, stream>>>(__VA_ARGS__)
#endif

namespace rll {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <class T>
struct TileCfg {  // fp32: 64 x 64 tiles, D staged 16 at a time
  static constexpr int BQ = 64, BK = 64, BD = 16, DC = 64, LDT = BD + 1;
};
template <>
struct TileCfg<double> {  // fp64: 32 x 32 tiles keep the static shared memory under 48 KiB
  static constexpr int BQ = 32, BK = 32, BD = 16, DC = 32, LDT = BD + 1;
};
template <>
struct TileCfg<__half> {  // WMMA: 8 warps x (16 x 32) = 64 x 64, k-steps of 16, ldm multiple of 8
  static constexpr int BQ = 64, BK = 64, BD = 32, DC = 64, LDT = BD + 8;
};
template <>
struct TileCfg<__nv_bfloat16> : TileCfg<__half> {};

template <class T>
__device__ __forceinline__ acc_t<T> to_acc(T x) {
  return static_cast<acc_t<T>>(x);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <class T>
__device__ __forceinline__ T zero_of() {
  return T(0);
}
template <>
__device__ __forceinline__ __half zero_of<__half>() {
  return __float2half(0.f);
}
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() {
  return __float2bfloat16(0.f);
}

template <class T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

template <class S>
__device__ __forceinline__ S warp_sum(S v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class S>
__device__ __forceinline__ S warp_max(S v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = rll_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Shared memory of every kernel. `tile` holds S = Q_I K_J^T, then G in place.
template <class T>
struct Smem {
  using S = acc_t<T>;
  using C = TileCfg<T>;
  static constexpr int LDS = C::BK + 4;  // multiple of 4: WMMA store of fp32
  static constexpr int XR = C::BQ > C::BK ? C::BQ : C::BK;
  alignas(128) S tile[C::BQ][LDS];
  union U {
    struct Dot {
      alignas(128) T a[C::BQ][C::LDT];
      alignas(128) T b[C::BK][C::LDT];
    } dot;
    alignas(128) S x[XR][C::DC + 1];  // operand chunk of the gradient product
  };
  alignas(128) U u;
  S nq[C::BQ], nk[C::BK];
  int64_t ql[C::BQ], kl[C::BK], qid[C::BQ], kid[C::BK];
  S row_state[C::BQ][6];  // per row: online states (m, l, a) of both sets, or (logden_P, L_P, logden_N, L_N, g)
  S rowsum[C::BQ];        // row sums of G
  S colsum[C::BK];        // column sums of G
  int nonfinite;          // a row of this block's tiles has an Inf or NaN squared norm
};

// 1 when a squared norm is Inf or NaN (x - x is 0 exactly for finite x).
template <class S>
__device__ __forceinline__ bool nonfinite_norm(S n) {
  return !(n - n == S(0));
}

// Stage rows [r0, r0 + R) x columns [d0, d0 + BD) of X in shared memory, zero-padded.
template <class T, int R, int BD, int LDT>
__device__ __forceinline__ void stage_rows(T (*dst)[LDT], const T* __restrict__ X, int64_t ldx, int64_t r0,
                                           int64_t nrows, int64_t d0, int64_t D) {
  for (int idx = threadIdx.x; idx < R * BD; idx += kThreads) {
    const int r = idx / BD, c = idx % BD;
    const int64_t gr = r0 + r, gd = d0 + c;
    dst[r][c] = (gr < nrows && gd < D) ? X[gr * ldx + gd] : zero_of<T>();
  }
}

// Tile tile = Q[i0:i0+BQ] K[j0:j0+BK]^T on the tensor cores (fp16/bf16, sm_80+): 8 warps x
// (16 x 32) outputs, WMMA m16n16k16 with fp32 accumulation. Called by all threads; ends synced.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(RLL_EMULATE_WMMA)
template <class T>
__device__ __forceinline__ void wmma_dot_tile(Smem<T>& sm, const Problem<T>& pb, int64_t i0, int64_t j0) {
  namespace wmma = nvcuda::wmma;
  using C = TileCfg<T>;
  constexpr int BQ = C::BQ, BK = C::BK, BD = C::BD, LDT = C::LDT;
  static_assert(BQ == 64 && BK == 64 && kWarps == 8, "WMMA layout: 8 warps x (16 x 32)");
  const int warp = threadIdx.x / 32;
  const int r0 = (warp % 4) * 16, c0 = (warp / 4) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc0, acc1;
  wmma::fill_fragment(acc0, 0.f);
  wmma::fill_fragment(acc1, 0.f);
  for (int64_t d0 = 0; d0 < pb.D; d0 += BD) {
    stage_rows<T, BQ, BD, LDT>(sm.u.dot.a, pb.q, pb.ldq, i0, pb.N, d0, pb.D);
    stage_rows<T, BK, BD, LDT>(sm.u.dot.b, pb.k, pb.ldk, j0, pb.M, d0, pb.D);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BD; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb0, fb1;
      wmma::load_matrix_sync(fa, &sm.u.dot.a[r0][kk], LDT);
      // B(d, c) = K[c][d]: column-major with leading dimension LDT
      wmma::load_matrix_sync(fb0, &sm.u.dot.b[c0][kk], LDT);
      wmma::load_matrix_sync(fb1, &sm.u.dot.b[c0 + 16][kk], LDT);
      wmma::mma_sync(acc0, fa, fb0, acc0);
      wmma::mma_sync(acc1, fa, fb1, acc1);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(&sm.tile[r0][c0], acc0, Smem<T>::LDS, wmma::mem_row_major);
  wmma::store_matrix_sync(&sm.tile[r0][c0 + 16], acc1, Smem<T>::LDS, wmma::mem_row_major);
  __syncthreads();
}
#endif

// The same tile on the CUDA cores: a 16 x 16 thread grid, each thread (BQ/16) x (BK/16) outputs,
// strided by 16. Called by all threads; ends synced.
template <class T>
__device__ __forceinline__ void fma_dot_tile(Smem<T>& sm, const Problem<T>& pb, int64_t i0, int64_t j0) {
  using C = TileCfg<T>;
  using S = acc_t<T>;
  constexpr int BQ = C::BQ, BK = C::BK, BD = C::BD, LDT = C::LDT;
  constexpr int RA = BQ / 16, RB = BK / 16;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  S acc[RA][RB];
#pragma unroll
  for (int a = 0; a < RA; ++a)
#pragma unroll
    for (int b = 0; b < RB; ++b) acc[a][b] = S(0);
  for (int64_t d0 = 0; d0 < pb.D; d0 += BD) {
    stage_rows<T, BQ, BD, LDT>(sm.u.dot.a, pb.q, pb.ldq, i0, pb.N, d0, pb.D);
    stage_rows<T, BK, BD, LDT>(sm.u.dot.b, pb.k, pb.ldk, j0, pb.M, d0, pb.D);
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < BD; ++kk) {
      S av[RA], bv[RB];
#pragma unroll
      for (int a = 0; a < RA; ++a) av[a] = to_acc(sm.u.dot.a[ty + 16 * a][kk]);
#pragma unroll
      for (int b = 0; b < RB; ++b) bv[b] = to_acc(sm.u.dot.b[tx + 16 * b][kk]);
#pragma unroll
      for (int a = 0; a < RA; ++a)
#pragma unroll
        for (int b = 0; b < RB; ++b) acc[a][b] += av[a] * bv[b];
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < RA; ++a)
#pragma unroll
    for (int b = 0; b < RB; ++b) sm.tile[ty + 16 * a][tx + 16 * b] = acc[a][b];
  __syncthreads();
}

// tile = Q[i0:i0+BQ] K[j0:j0+BK]^T over the full embedding: tensor cores for fp16/bf16 on sm_80+,
// CUDA-core FMAs else. Called by all threads; ends synced.
template <class T>
__device__ void dot_tile(Smem<T>& sm, const Problem<T>& pb, int64_t i0, int64_t j0) {
  constexpr bool kHalf = !std::is_same<T, float>::value && !std::is_same<T, double>::value;
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(RLL_EMULATE_WMMA)
  if constexpr (kHalf) {
    wmma_dot_tile(sm, pb, i0, j0);
    return;
  }
#endif
  (void)kHalf;
  fma_dot_tile(sm, pb, i0, j0);
}

// Query-side and gallery-side information of a tile in shared memory.
template <class T>
__device__ __forceinline__ void load_query_rows(Smem<T>& sm, const Problem<T>& pb, const acc_t<T>* norms, int64_t i0) {
  for (int r = threadIdx.x; r < TileCfg<T>::BQ; r += kThreads) {
    const int64_t i = i0 + r;
    const bool ok = i < pb.N;
    sm.nq[r] = ok ? norms[i] : acc_t<T>(0);
    sm.ql[r] = ok ? pb.q_labels[i] : 0;
    sm.qid[r] = (ok && pb.q_ids) ? pb.q_ids[i] : i;  // self_pairs: the row index
    if (nonfinite_norm(sm.nq[r])) sm.nonfinite = 1;
  }
}
template <class T>
__device__ __forceinline__ void load_gallery_rows(Smem<T>& sm, const Problem<T>& pb, const acc_t<T>* norms, int64_t j0) {
  for (int c = threadIdx.x; c < TileCfg<T>::BK; c += kThreads) {
    const int64_t j = j0 + c;
    const bool ok = j < pb.M;
    sm.nk[c] = ok ? norms[pb.N + j] : acc_t<T>(0);
    sm.kl[c] = ok ? pb.k_labels[j] : 0;
    sm.kid[c] = (ok && pb.k_ids) ? pb.k_ids[j] : j;  // self_pairs: the row index
    if (nonfinite_norm(sm.nk[c])) sm.nonfinite = 1;
  }
}
// Row stats for the gradient kernels: row_state[r] = (logden_P, L_P, logden_N, L_N, upstream grad).
template <class T>
__device__ __forceinline__ void load_row_stats(Smem<T>& sm, const Problem<T>& pb, const acc_t<T>* stats,
                                               const acc_t<T>* grad_rows, int64_t i0) {
  using S = acc_t<T>;
  for (int r = threadIdx.x; r < TileCfg<T>::BQ; r += kThreads) {
    const int64_t i = i0 + r;
    const bool ok = i < pb.N;
#pragma unroll
    for (int s = 0; s < 4; ++s) sm.row_state[r][s] = ok ? stats[i * 4 + s] : neg_inf<S>();
    sm.row_state[r][4] = ok ? (grad_rows ? grad_rows[i] : S(1)) : S(0);
  }
}

// Per-pair quantities of tile entry (r, c), all from rll_pair.h.
template <class S>
struct PairVals {
  S d, inv;
  bool same, diff;
};
template <class T>
__device__ __forceinline__ PairVals<acc_t<T>> pair_at(const Smem<T>& sm, const Problem<T>& pb, int r, int c,
                                                      int64_t j, acc_t<T> rel) {
  using S = acc_t<T>;
  const S nq = sm.nq[r], nk = sm.nk[c];
  const S d2 = gram_d2(sm.tile[r][c], nq, nk);
  const bool dup = is_dup(d2, nq, nk, rel);
  PairVals<S> pv;
  pv.d = pair_dist(d2, dup);
  pv.inv = pair_inv_dist(pv.d, dup);
  const bool valid = j < pb.M && ((pb.q_ids == nullptr && !pb.self_pairs) || sm.kid[c] != sm.qid[r]);
  const bool lab = sm.kl[c] == sm.ql[r];
  pv.same = valid && lab;
  pv.diff = valid && !lab;
  return pv;
}

// One online-softmax step of one row and set, by a whole warp (state in shared memory).
template <class S, int CPL>
__device__ __forceinline__ void online_step(S* st, S tile_max, const S (&s)[CPL], const S (&v)[CPL]) {
  if (tile_max == neg_inf<S>()) return;  // warp-uniform: no member in this tile
  OnlineRow<S> row;
  row.m = st[0];
  row.l = st[1];
  row.a = st[2];
  online_begin_tile(row, tile_max);
  S l = S(0), a = S(0);
#pragma unroll
  for (int t = 0; t < CPL; ++t) {
    const S w = online_weight(s[t], row);
    l += w;
    a += w * v[t];
  }
  l = warp_sum(l);
  a = warp_sum(a);
  __syncwarp();
  if ((threadIdx.x & 31) == 0) {
    st[0] = row.m;
    st[1] = row.l + l;
    st[2] = row.a + a;
  }
  __syncwarp();
}

// G_ij = dL_i/dd_ij / d_ij (times the upstream gradient) for the rows of tile, in place.
// Row sums are added to sm.rowsum when with_rowsum. Called by all threads; no barrier inside.
template <class T, bool with_rowsum>
__device__ __forceinline__ void pair_grad_tile(Smem<T>& sm, const Problem<T>& pb, const Params<acc_t<T>>& prm,
                                               bool attached, int64_t i0, int64_t j0) {
  using S = acc_t<T>;
  using C = TileCfg<T>;
  constexpr int RPW = C::BQ / kWarps, CPL = C::BK / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const S rel = dup_rel<S>();
  for (int rr = 0; rr < RPW; ++rr) {
    const int r = warp * RPW + rr;
    const S* st = sm.row_state[r];
    const S logden_p = st[0], Lp = st[1], logden_n = st[2], Ln = st[3], g = st[4];
    const bool has_p = logden_p != neg_inf<S>(), has_n = logden_n != neg_inf<S>();
    const bool live = i0 + r < pb.N && (has_p || has_n) && g != S(0);  // warp-uniform
    const S wp = (S(1) - prm.lam) * g, wn = prm.lam * g;
    S rs = S(0);
#pragma unroll
    for (int t = 0; t < CPL; ++t) {
      const int c = lane + 32 * t;
      S G = S(0);
      if (live) {
        const PairVals<S> pv = pair_at(sm, pb, r, c, j0 + c, rel);
        S coef = S(0);
        if (has_p) {
          const S vp = pos_value(pv.d, prm);
          coef += pos_pair_grad(wp, masked_logit(in_pos(pv.same, pv.d, prm), vp, prm.Tp), vp, logden_p, Lp, prm.Tp,
                                attached);
        }
        if (has_n) {
          const S vn = neg_value(pv.d, prm);
          coef += neg_pair_grad(wn, masked_logit(in_neg(pv.diff, pv.d, prm), vn, prm.Tn), vn, logden_n, Ln, prm.Tn,
                                attached);
        }
        G = coef * pv.inv;
      }
      sm.tile[r][c] = G;
      rs += G;
    }
    if (with_rowsum) {
      rs = warp_sum(rs);
      if (lane == 0) sm.rowsum[r] += rs;
    }
  }
}

// out[o][e] -= sum_k G(o, k) X[x0 + k][e] for o < R, all e < D, with G(o, k) = tile[o][k]
// (query side: R = BQ, inner BK) or tile[k][o] (gallery side, TRANS: R = BK, inner BQ).
// out points at the block's first owned row (row stride ldo); rows >= nout are not written.
template <class T, bool TRANS>
__device__ void sub_g_times_x(Smem<T>& sm, const T* __restrict__ X, int64_t ldx, int64_t x0, int64_t nx,
                              acc_t<T>* __restrict__ out, int64_t ldo, int64_t nout, int64_t D) {
  using S = acc_t<T>;
  using C = TileCfg<T>;
  constexpr int R = TRANS ? C::BK : C::BQ, KI = TRANS ? C::BQ : C::BK, DC = C::DC;
  constexpr int RA = R / 16, RB = DC / 16;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  for (int64_t e0 = 0; e0 < D; e0 += DC) {
    for (int idx = threadIdx.x; idx < KI * DC; idx += kThreads) {
      const int kq = idx / DC, e = idx % DC;
      const int64_t gx = x0 + kq, ge = e0 + e;
      sm.u.x[kq][e] = (gx < nx && ge < D) ? to_acc(X[gx * ldx + ge]) : S(0);
    }
    __syncthreads();
    S acc[RA][RB];
#pragma unroll
    for (int a = 0; a < RA; ++a)
#pragma unroll
      for (int b = 0; b < RB; ++b) acc[a][b] = S(0);
#pragma unroll 4
    for (int kq = 0; kq < KI; ++kq) {
      S gv[RA], xv[RB];
#pragma unroll
      for (int a = 0; a < RA; ++a) gv[a] = TRANS ? sm.tile[kq][ty + 16 * a] : sm.tile[ty + 16 * a][kq];
#pragma unroll
      for (int b = 0; b < RB; ++b) xv[b] = sm.u.x[kq][tx + 16 * b];
#pragma unroll
      for (int a = 0; a < RA; ++a)
#pragma unroll
        for (int b = 0; b < RB; ++b) acc[a][b] += gv[a] * xv[b];
    }
#pragma unroll
    for (int a = 0; a < RA; ++a) {
      const int o = ty + 16 * a;
      if (o >= nout) continue;
#pragma unroll
      for (int b = 0; b < RB; ++b) {
        const int64_t e = e0 + tx + 16 * b;
        if (e < D) out[o * ldo + e] -= acc[a][b];
      }
    }
    __syncthreads();  // before the next chunk overwrites sm.u.x
  }
}

// out[o][e] += rowsum[o] * X[x0 + o][e] for the block's rows (after all tiles).
template <class T>
__device__ __forceinline__ void add_diag(const acc_t<T>* sums, const T* __restrict__ X, int64_t ldx, int64_t x0,
                                         int rows, acc_t<T>* __restrict__ out, int64_t D) {
  for (int o = threadIdx.x / 32; o < rows; o += kWarps) {
    const acc_t<T> s = sums[o];
    if (s == acc_t<T>(0)) continue;
    for (int64_t e = threadIdx.x & 31; e < D; e += 32) out[o * D + e] += s * to_acc(X[(x0 + o) * ldx + e]);
  }
}

// ---------------------------------------------------------------- kernels
template <class T>
__global__ void __launch_bounds__(kThreads, 2) rll_sqnorm_kernel(const T* __restrict__ x, int64_t rows, int64_t D,
                                                              int64_t ld, acc_t<T>* __restrict__ out) {
  using S = acc_t<T>;
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= rows) return;
  S s = S(0);
  for (int64_t e = threadIdx.x & 31; e < D; e += 32) {
    const S v = to_acc(x[r * ld + e]);
    s += v * v;
  }
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) out[r] = s;
}

// z = x/|x| per row, one warp per row, scale-safe (docs/semantics.md §1.4): max |x| first, then
// sum (x/m)^2 in [1, D], so no finite row overflows or underflows. NaN: the sum is NaN; Inf: x/m is.
template <class T>
__global__ void __launch_bounds__(kThreads, 2)
    rll_normalize_kernel(const T* __restrict__ x, int64_t rows, int64_t D, int64_t ldr, int64_t ldc,
                         T* __restrict__ z, acc_t<T>* __restrict__ norms) {
  using S = acc_t<T>;
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const T* xr = x + r * ldr;
  S m = S(0);
  for (int64_t e = lane; e < D; e += 32) m = rll_max(m, S(fabs(to_acc(xr[e * ldc]))));
  m = warp_max(m);
  const S ms = m > S(0) ? m : S(1);
  S s = S(0), sq = S(0);
  for (int64_t e = lane; e < D; e += 32) {
    const S x = to_acc(xr[e * ldc]), v = x / ms;
    s += v * v;
    sq += x * x;
  }
  s = warp_sum(s);  // NaN for a NaN or Inf entry (Inf / Inf)
  sq = warp_sum(sq);
  // the plain sqrt(sum x^2) where it neither overflows nor underflows (as the CPU op), else m sqrt(s)
  const bool plain = sq <= std::numeric_limits<S>::max() &&
                     sq >= std::numeric_limits<S>::min() / std::numeric_limits<S>::epsilon() && s == s;
  const S norm = plain ? rll_sqrt(sq) : m * rll_sqrt(s);
  // x / |x| (one rounding, as F.normalize); (x / m) / sqrt(s) where |x| is subnormal; 0 for a zero row;
  // NaN for a non-finite row (|x| is NaN: s is)
  const bool tiny = norm < std::numeric_limits<S>::min();
  const S inv_s = m > S(0) ? S(1) / rll_sqrt(s) : S(0);
  const S n_div = (tiny || !(m > S(0))) ? S(1) : norm;
  for (int64_t e = lane; e < D; e += 32) {
    const S v = to_acc(xr[e * ldc]);
    const S zv = m > S(0) ? (tiny ? v / ms * inv_s : v / n_div) : S(0);
    z[r * D + e] = from_acc<T>(norm == norm ? zv : norm);  // a non-finite row: NaN z, so NaN losses
  }
  if (lane == 0) norms[r] = norm;
}

// g <- (g - z (z . g)) / |x| per row (one warp per row); a zero row gets 0.
template <class T>
__global__ void __launch_bounds__(kThreads, 2)
    rll_normalize_backward_kernel(acc_t<T>* __restrict__ g, const T* __restrict__ z,
                                  const acc_t<T>* __restrict__ norms, int64_t rows, int64_t D) {
  using S = acc_t<T>;
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  S* gr = g + r * D;
  const T* zr = z + r * D;
  S zg = S(0);
  for (int64_t e = lane; e < D; e += 32) zg += to_acc(zr[e]) * gr[e];
  zg = warp_sum(zg);
  const S n = norms[r];
  for (int64_t e = lane; e < D; e += 32) gr[e] = n == S(0) ? S(0) : (gr[e] - to_acc(zr[e]) * zg) / n;
}

// Empty online states of both sets: row_state[r] = (m_P, l_P, a_P, m_N, l_N, a_N).
template <class T>
__device__ __forceinline__ void start_online_rows(Smem<T>& sm) {
  using S = acc_t<T>;
  for (int r = threadIdx.x; r < TileCfg<T>::BQ; r += kThreads) {
    sm.row_state[r][0] = sm.row_state[r][3] = neg_inf<S>();
    sm.row_state[r][1] = sm.row_state[r][2] = sm.row_state[r][4] = sm.row_state[r][5] = S(0);
  }
}

// Folds the gallery tile at j0 (Gram tile in sm.tile) into the online state of every query row:
// each warp owns BQ/8 rows, each lane BK/32 columns. warp, lane and rel = dup_rel are taken once
// by the kernel (computed in here they changed the generated code). Called by all threads; no
// barrier inside.
template <class T>
__device__ __forceinline__ void fold_tile_into_online_rows(Smem<T>& sm, const Problem<T>& pb,
                                                           const Params<acc_t<T>>& prm, int64_t i0, int64_t j0,
                                                           int warp, int lane, acc_t<T> rel) {
  using S = acc_t<T>;
  using C = TileCfg<T>;
  constexpr int RPW = C::BQ / kWarps, CPL = C::BK / 32;
  for (int rr = 0; rr < RPW; ++rr) {
    const int r = warp * RPW + rr;
    if (i0 + r >= pb.N) break;  // warp-uniform
    S sp[CPL], vp[CPL], sn[CPL], vn[CPL];
    S max_sp = neg_inf<S>(), max_sn = neg_inf<S>();
#pragma unroll
    for (int t = 0; t < CPL; ++t) {
      const int c = lane + 32 * t;
      const PairVals<S> pv = pair_at(sm, pb, r, c, j0 + c, rel);
      vp[t] = pos_value(pv.d, prm);
      vn[t] = neg_value(pv.d, prm);
      sp[t] = masked_logit(in_pos(pv.same, pv.d, prm), vp[t], prm.Tp);
      sn[t] = masked_logit(in_neg(pv.diff, pv.d, prm), vn[t], prm.Tn);
      max_sp = rll_max(max_sp, sp[t]);
      max_sn = rll_max(max_sn, sn[t]);
    }
    max_sp = warp_max(max_sp);
    max_sn = warp_max(max_sn);
    online_step<S, CPL>(&sm.row_state[r][0], max_sp, sp, vp);
    online_step<S, CPL>(&sm.row_state[r][3], max_sn, sn, vn);
  }
}

// Loss and stats [logden_P, L_P, logden_N, L_N] of the block's rows from their online states.
template <class T>
__device__ __forceinline__ void finish_rows(const Smem<T>& sm, const Problem<T>& pb, const Params<acc_t<T>>& prm,
                                            int64_t i0, acc_t<T>* __restrict__ loss, acc_t<T>* __restrict__ stats) {
  using S = acc_t<T>;
  for (int r = threadIdx.x; r < TileCfg<T>::BQ; r += kThreads) {
    const int64_t i = i0 + r;
    if (i >= pb.N) continue;
    const S* st = sm.row_state[r];
    OnlineRow<S> on_pos, on_neg;
    on_pos.m = st[0];
    on_pos.l = st[1];
    on_pos.a = st[2];
    on_neg.m = st[3];
    on_neg.l = st[4];
    on_neg.a = st[5];
    const SetStats<S> pos = online_finish(on_pos, prm.den_bias), neg = online_finish(on_neg, prm.den_bias);
    loss[i] = sm.nonfinite ? std::numeric_limits<S>::quiet_NaN() : row_loss(pos.L, neg.L, prm);
    stats[i * 4 + 0] = pos.logden;
    stats[i * 4 + 1] = pos.L;
    stats[i * 4 + 2] = neg.logden;
    stats[i * 4 + 3] = neg.L;
  }
}

// Loss and stats of the block's BQ query rows, streaming every gallery tile.
template <class T>
__global__ void __launch_bounds__(kThreads, 2) rll_stats_kernel(const Problem<T> pb, const Params<acc_t<T>> prm,
                                                             const acc_t<T>* __restrict__ norms,
                                                             acc_t<T>* __restrict__ loss,
                                                             acc_t<T>* __restrict__ stats) {
  using S = acc_t<T>;
  using C = TileCfg<T>;
  __shared__ Smem<T> sm;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t i0 = int64_t(blockIdx.x) * C::BQ;
  const S rel = dup_rel<S>();
  if (threadIdx.x == 0) sm.nonfinite = 0;
  __syncthreads();
  load_query_rows(sm, pb, norms, i0);
  start_online_rows(sm);
  for (int64_t j0 = 0; j0 < pb.M; j0 += C::BK) {
    __syncthreads();  // the previous tile is consumed
    load_gallery_rows(sm, pb, norms, j0);
    dot_tile(sm, pb, i0, j0);
    fold_tile_into_online_rows(sm, pb, prm, i0, j0, warp, lane, rel);
  }
  __syncthreads();
  finish_rows(sm, pb, prm, i0, loss, stats);
}

// dL/dq for the block's BQ query rows; grad_rows == nullptr means 1 ("paper" grad in forward).
template <class T>
__global__ void __launch_bounds__(kThreads, 2) rll_grad_q_kernel(const Problem<T> pb, const Params<acc_t<T>> prm,
                                                              const acc_t<T>* __restrict__ norms,
                                                              const acc_t<T>* __restrict__ stats,
                                                              const acc_t<T>* __restrict__ grad_rows,
                                                              bool attached, acc_t<T>* __restrict__ gq) {
  using S = acc_t<T>;
  using C = TileCfg<T>;
  __shared__ Smem<T> sm;
  const int64_t i0 = int64_t(blockIdx.x) * C::BQ;
  const int rows = int(pb.N - i0 < C::BQ ? pb.N - i0 : C::BQ);
  load_query_rows(sm, pb, norms, i0);
  load_row_stats(sm, pb, stats, grad_rows, i0);
  for (int r = threadIdx.x; r < C::BQ; r += kThreads) sm.rowsum[r] = S(0);
  for (int64_t j0 = 0; j0 < pb.M; j0 += C::BK) {
    __syncthreads();
    load_gallery_rows(sm, pb, norms, j0);
    dot_tile(sm, pb, i0, j0);
    pair_grad_tile<T, true>(sm, pb, prm, attached, i0, j0);
    __syncthreads();
    sub_g_times_x<T, false>(sm, pb.k, pb.ldk, j0, pb.M, gq + i0 * pb.D, pb.D, rows, pb.D);
  }
  __syncthreads();
  add_diag(sm.rowsum, pb.q, pb.ldq, i0, rows, gq + i0 * pb.D, pb.D);
}

// dL/dk for the block's BK gallery rows, streaming every query tile.
template <class T>
__global__ void __launch_bounds__(kThreads, 2) rll_grad_k_kernel(const Problem<T> pb, const Params<acc_t<T>> prm,
                                                              const acc_t<T>* __restrict__ norms,
                                                              const acc_t<T>* __restrict__ stats,
                                                              const acc_t<T>* __restrict__ grad_rows,
                                                              bool attached, acc_t<T>* __restrict__ gk) {
  using S = acc_t<T>;
  using C = TileCfg<T>;
  __shared__ Smem<T> sm;
  const int64_t j0 = int64_t(blockIdx.x) * C::BK;
  const int cols = int(pb.M - j0 < C::BK ? pb.M - j0 : C::BK);
  load_gallery_rows(sm, pb, norms, j0);
  for (int c = threadIdx.x; c < C::BK; c += kThreads) sm.colsum[c] = S(0);
  for (int64_t i0 = 0; i0 < pb.N; i0 += C::BQ) {
    __syncthreads();
    load_query_rows(sm, pb, norms, i0);
    load_row_stats(sm, pb, stats, grad_rows, i0);
    dot_tile(sm, pb, i0, j0);
    pair_grad_tile<T, false>(sm, pb, prm, attached, i0, j0);
    __syncthreads();
    for (int c = threadIdx.x; c < C::BK; c += kThreads) {  // one owner per column
      S s = S(0);
      for (int r = 0; r < C::BQ; ++r) s += sm.tile[r][c];
      sm.colsum[c] += s;
    }
    sub_g_times_x<T, true>(sm, pb.q, pb.ldq, i0, pb.N, gk + j0 * pb.D, pb.D, cols, pb.D);
  }
  __syncthreads();
  add_diag(sm.colsum, pb.k, pb.ldk, j0, cols, gk + j0 * pb.D, pb.D);
}

template <class T>
cudaError_t launch_norms(const Problem<T>& pb, acc_t<T>* norms, cudaStream_t stream) {
  if (pb.N > 0)
    RLL_LAUNCH(rll_sqnorm_kernel<T>, unsigned((pb.N + kWarps - 1) / kWarps), stream, pb.q, pb.N, pb.D, pb.ldq, norms);
  if (pb.M > 0)
    RLL_LAUNCH(rll_sqnorm_kernel<T>, unsigned((pb.M + kWarps - 1) / kWarps), stream, pb.k, pb.M, pb.D, pb.ldk,
               norms + pb.N);
  return cudaGetLastError();
}

}  // namespace

template <class T>
cudaError_t launch_rll_fwd(const Problem<T>& pb, const Params<acc_t<T>>& prm, acc_t<T>* loss, acc_t<T>* stats,
                           acc_t<T>* grad_q, acc_t<T>* norms, cudaStream_t stream) {
  using C = TileCfg<T>;
  if (pb.N == 0) return cudaSuccess;
  cudaError_t err = launch_norms(pb, norms, stream);
  if (err != cudaSuccess) return err;
  const unsigned qblocks = unsigned((pb.N + C::BQ - 1) / C::BQ);
  RLL_LAUNCH(rll_stats_kernel<T>, qblocks, stream, pb, prm, norms, loss, stats);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (grad_q != nullptr)  // "paper": weights detached, upstream gradient 1 per row
    RLL_LAUNCH(rll_grad_q_kernel<T>, qblocks, stream, pb, prm, norms, stats, nullptr, false, grad_q);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_rll_bwd(const Problem<T>& pb, const Params<acc_t<T>>& prm, const acc_t<T>* grad_rows,
                           const acc_t<T>* stats, bool attached, acc_t<T>* grad_q, acc_t<T>* grad_k,
                           acc_t<T>* norms, cudaStream_t stream) {
  using C = TileCfg<T>;
  if (pb.N == 0 || (grad_q == nullptr && grad_k == nullptr)) return cudaSuccess;
  cudaError_t err = launch_norms(pb, norms, stream);
  if (err != cudaSuccess) return err;
  if (grad_q != nullptr) {
    const unsigned qblocks = unsigned((pb.N + C::BQ - 1) / C::BQ);
    RLL_LAUNCH(rll_grad_q_kernel<T>, qblocks, stream, pb, prm, norms, stats, grad_rows, attached, grad_q);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (grad_k != nullptr && pb.M > 0) {
    const unsigned kblocks = unsigned((pb.M + C::BK - 1) / C::BK);
    RLL_LAUNCH(rll_grad_k_kernel<T>, kblocks, stream, pb, prm, norms, stats, grad_rows, attached, grad_k);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_rll_normalize(const T* x, int64_t rows, int64_t D, int64_t ldr, int64_t ldc, T* z,
                                 acc_t<T>* norms, cudaStream_t stream) {
  if (rows > 0) RLL_LAUNCH(rll_normalize_kernel<T>, unsigned((rows + kWarps - 1) / kWarps), stream, x, rows, D, ldr,
                           ldc, z, norms);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_rll_normalize_backward(acc_t<T>* g, const T* z, const acc_t<T>* norms, int64_t rows, int64_t D,
                                          cudaStream_t stream) {
  if (rows > 0)
    RLL_LAUNCH(rll_normalize_backward_kernel<T>, unsigned((rows + kWarps - 1) / kWarps), stream, g, z, norms, rows, D);
  return cudaGetLastError();
}

#define RLL_INSTANTIATE(T)                                                                                    \
  template cudaError_t launch_rll_fwd<T>(const Problem<T>&, const Params<acc_t<T>>&, acc_t<T>*, acc_t<T>*,    \
                                         acc_t<T>*, acc_t<T>*, cudaStream_t);                                 \
  template cudaError_t launch_rll_bwd<T>(const Problem<T>&, const Params<acc_t<T>>&, const acc_t<T>*,         \
                                         const acc_t<T>*, bool, acc_t<T>*, acc_t<T>*, acc_t<T>*, cudaStream_t); \
  template cudaError_t launch_rll_normalize<T>(const T*, int64_t, int64_t, int64_t, int64_t, T*, acc_t<T>*,    \
                                               cudaStream_t);                                                 \
  template cudaError_t launch_rll_normalize_backward<T>(acc_t<T>*, const T*, const acc_t<T>*, int64_t, int64_t, \
                                                        cudaStream_t);
RLL_INSTANTIATE(float)
RLL_INSTANTIATE(double)
RLL_INSTANTIATE(__half)
RLL_INSTANTIATE(__nv_bfloat16)
#undef RLL_INSTANTIATE

}  // namespace cuda
}  // namespace rll
