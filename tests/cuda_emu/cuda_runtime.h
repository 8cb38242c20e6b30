// CPU emulation of the CUDA runtime subset used by csrc/cuda/rll_kernels.cu (tests only).
//
// Each CUDA thread of a block is a host thread; blocks run one after another. __syncthreads and
// __syncwarp are std::barrier waits, warp shuffles go through a per-warp buffer between two
// barriers, __shared__ variables are function statics (one block at a time). It checks the kernels'
// logic (indexing, tiling, masks, reductions, barriers placed where shared data is reused), not
// their speed; the tensor-core branch (__CUDA_ARCH__ >= 800) is compiled only with RLL_EMULATE_WMMA
// (mma.h).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define RLL_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local dim3 threadIdx, blockIdx;

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

namespace rll_emu {
struct Warp {
  std::barrier<> bar{32};
  double buf[32];
};
struct Block {
  explicit Block(int threads) : bar(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<Warp>());
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};
inline thread_local Block* tl_block = nullptr;

template <class... P, class... A>
void launch(void (*kernel)(P...), unsigned grid, int threads, A... args) {
  for (unsigned b = 0; b < grid; ++b) {
    Block blk(threads);
    std::vector<std::thread> ts;
    ts.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        threadIdx.x = unsigned(t);
        blockIdx.x = b;
        tl_block = &blk;
        kernel(args...);
      });
    }
    for (auto& th : ts) th.join();
  }
}
}  // namespace rll_emu

inline void __syncthreads() { rll_emu::tl_block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { rll_emu::tl_block->warps[threadIdx.x / 32]->bar.arrive_and_wait(); }
template <class V>
V __shfl_xor_sync(unsigned, V v, int lane_mask) {
  rll_emu::Warp& w = *rll_emu::tl_block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x & 31;
  w.buf[lane] = double(v);
  w.bar.arrive_and_wait();
  const V r = V(w.buf[lane ^ unsigned(lane_mask)]);
  w.bar.arrive_and_wait();
  return r;
}
