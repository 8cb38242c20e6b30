// CPU emulation of the nvcuda::wmma subset used by csrc/cuda/rll_kernels.cu (tests only).
//
// Compiled in when RLL_EMULATE_WMMA is defined, so the tensor-core branch of the kernels (tile
// layout, leading dimensions, fragment offsets) runs on the CPU too. Every lane holds the whole
// 16 x 16 tile and computes it redundantly (a warp-collective op gives every lane the same
// result); stores are done by lane 0 between two warp barriers. Accumulation is fp32, products of
// fp16/bf16 values are exact in fp32, as on the tensor cores; only the summation order differs.
#pragma once

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

#include <type_traits>

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emulated shape: m16n16k16");
  float x[16][16];
};

inline float emu_to_float(__half v) { return __half2float(v); }
inline float emu_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float emu_to_float(float v) { return v; }

template <class F>
void fill_fragment(F& f, float v) {
  for (auto& row : f.x)
    for (float& e : row) e = v;
}

// Element (i, j) of the logical matrix (A: M x K, B: K x N) at p[i * ldm + j] (row-major) or
// p[j * ldm + i] (column-major).
template <class Use, class T, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.x[i][j] = emu_to_float(std::is_same<L, row_major>::value ? p[i * ldm + j] : p[j * ldm + i]);
}

template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i][j];
      for (int k = 0; k < 16; ++k) s += a.x[i][k] * b.x[k][j];
      out[i][j] = s;
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.x[i][j] = out[i][j];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  __syncwarp();
  if ((threadIdx.x & 31) == 0)
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) p[layout == mem_row_major ? i * ldm + j : j * ldm + i] = f.x[i][j];
  __syncwarp();
}
}  // namespace wmma
}  // namespace nvcuda
