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
// Labels are int64; ids (nullable, given together) exclude the pairs with q_ids[i] == k_ids[j].
template <class T>
struct Problem {
  const T* q;
  const T* k;
  const int64_t* q_labels;
  const int64_t* k_labels;
  const int64_t* q_ids;  // nullptr: no excluded pairs
  const int64_t* k_ids;
  int64_t N, M, D, ldq, ldk;
};

// Forward. Writes loss (N,) and stats (N, 4) in acc_t<T>. When grad_q is not null (the "paper"
// query gradient of every row's loss, grad-in-forward), it must hold N x D zeros (row stride D).
// norms: scratch of N + M values of acc_t<T>. All pointers on the current device.
template <class T>
cudaError_t launch_rll_fwd(const Problem<T>& pb, const Params<acc_t<T>>& prm, acc_t<T>* loss, acc_t<T>* stats,
                           acc_t<T>* grad_q, acc_t<T>* norms, cudaStream_t stream);

// Backward from the saved stats. grad_rows (N,) is the upstream gradient of each row's loss.
// grad_q (N x D) and grad_k (M x D), when not null, must hold zeros (row stride D). attached=true
// differentiates the softmax weights too ("pml").
template <class T>
cudaError_t launch_rll_bwd(const Problem<T>& pb, const Params<acc_t<T>>& prm, const acc_t<T>* grad_rows,
                           const acc_t<T>* stats, bool attached, acc_t<T>* grad_q, acc_t<T>* grad_k,
                           acc_t<T>* norms, cudaStream_t stream);

}  // namespace cuda
}  // namespace rll
