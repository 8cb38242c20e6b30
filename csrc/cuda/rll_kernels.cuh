// Fused Ranked List Loss, CUDA kernels: torch-free interface (raw pointers, strides, cudaStream_t).
//
// The kernels (rll_kernels.cu) include only <cuda_runtime.h>, the half types and ../rll_pair.h,
// so they compile with plain `nvcc -c` in CI without a GPU or a CUDA torch. The torch glue
// (rll_cuda_glue.cu) allocates the outputs and calls the launchers declared here.
//
// Semantics are those of the CPU kernel (csrc/rll_cpu.cpp, docs/semantics.md §2). With
// G_ij = dL_i/dd_ij / d_ij:
//   dL/dq_i = sum_j G_ij (q_i - k_j) = (G 1)_i q_i - (G K)_i
//   dL/dk_j = sum_i G_ij (k_j - q_i) = (G^T 1)_j k_j - (G^T Q)_j
// Kernels (all tiled, fp32 accumulation, fp64 for fp64 inputs, no atomics):
//   rll_normalize_kernel    z = e/|e| of every row with scale-safe norms (docs/semantics.md §1.4),
//                       before the others when the op normalises; rll_normalize_backward_kernel
//                       takes the gradients w.r.t. z back to e, (I - z z^T)/|e|, after them
//   rll_sqnorm_kernel   |x_r|^2 of every query and gallery row (Gram-form distances)
//   rll_stats_kernel    one block per query tile, streams gallery tiles; online max / sum exp /
//                       sum exp*value per row and set -> per-row loss and stats
//                       [logden_P, L_P, logden_N, L_N]
//   rll_grad_q_kernel   one block per query tile, streams gallery tiles, recomputes each tile from
//                       the stats; the block owns its rows of dL/dq ("paper" query gradient in the
//                       forward with grad_rows = 1, and the rll_bwd query gradient)
//   rll_grad_k_kernel   one block per gallery tile, streams query tiles (recomputing); the block owns
//                       its rows of dL/dk ("pml" gallery gradient)
// Distance tiles Q_I K_J^T use tensor cores (WMMA m16n16k16, fp32 accumulate) for fp16/bf16 inputs
// on sm_80+, CUDA-core FMAs for fp32/fp64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../rll_pair.h"

namespace rll {
namespace cuda {

// Accumulation type of an input type: fp32 for fp16/bf16/fp32, fp64 for fp64.
template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccOf<T>::type;

// One RLL problem: queries q (N x D, row stride ldq) against the gallery k (M x D, row stride ldk).
// Labels are int64; ids (nullable, given together) exclude the pairs with q_ids[i] == k_ids[j];
// self_pairs (in-batch without ids: k is q) excludes the pairs i = j.
template <class T>
struct Problem {
  const T* q;
  const T* k;
  const int64_t* q_labels;
  const int64_t* k_labels;
  const int64_t* q_ids;  // nullptr: no excluded pairs (unless self_pairs)
  const int64_t* k_ids;
  int64_t N, M, D, ldq, ldk;
  bool self_pairs;
};

// z = x/|x| of `rows` rows of x (row stride ldr, column stride ldc) into the contiguous z (rows x D),
// |x| into norms; a zero row stays 0, a row with an Inf or NaN gets a NaN norm and NaN z, which
// makes every loss NaN (docs/semantics.md §6).
template <class T>
cudaError_t launch_rll_normalize(const T* x, int64_t rows, int64_t D, int64_t ldr, int64_t ldc, T* z,
                                 acc_t<T>* norms, cudaStream_t stream);

// g <- (g - z (z . g)) / |x| for every row of the contiguous gradient g (rows x D): the gradient
// w.r.t. the raw rows from the one w.r.t. z (0 for a zero row).
template <class T>
cudaError_t launch_rll_normalize_backward(acc_t<T>* g, const T* z, const acc_t<T>* norms, int64_t rows, int64_t D,
                                          cudaStream_t stream);

// Forward. Writes loss (N,) and stats (N, 4) in acc_t<T>; every loss is NaN when a row of q or k is
// not finite. When grad_q is not null (the "paper"
// query gradient of every row's loss, grad-in-forward), it must hold N x D zeros (row stride D).
// norms: scratch of N + M values of acc_t<T>. All pointers on the current device.
template <class T>
cudaError_t launch_rll_fwd(const Problem<T>& pb, const Params<acc_t<T>>& prm, acc_t<T>* loss, acc_t<T>* stats,
                           acc_t<T>* grad_q, acc_t<T>* norms, cudaStream_t stream);

// Backward from the saved stats. grad_rows (N,) is the upstream gradient of each row's loss.
// grad_q (N x D) and grad_k (M x D), when not null, must hold zeros (row stride D). attached=true
// differentiates the softmax weights too ("pml"). grad_k may be grad_q (in-batch: both ends of every
// pair accumulate into the same rows; the gallery kernel runs after the query kernel and adds).
template <class T>
cudaError_t launch_rll_bwd(const Problem<T>& pb, const Params<acc_t<T>>& prm, const acc_t<T>* grad_rows,
                           const acc_t<T>* stats, bool attached, acc_t<T>* grad_q, acc_t<T>* grad_k,
                           acc_t<T>* norms, cudaStream_t stream);

}  // namespace cuda
}  // namespace rll
