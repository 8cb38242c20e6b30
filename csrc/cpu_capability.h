// The CPU kernel sources (rll_cpu.cpp, softtriple_cpu.cpp, osm_cpu.cpp) are compiled once per SIMD
// capability (setup.py: AVX2, and AVX-512 on x86-64), each build with CPU_CAPABILITY naming it, as
// ATen's own kernels are. Everything those builds define, here and in the headers they include,
// lives in the inline namespace rll::<CPU_CAPABILITY>, so two builds never share a symbol (a helper
// sized for 16-lane vectors must never be linked into the 8-lane build). cpu_dispatch.cpp picks
// one build at load time and registers its kernels.
//
// Torch-free: rll_pair.h, which the CUDA kernels share, includes it; outside a CPU build (nvcc, or
// no CPU_CAPABILITY) the macros are empty.
#pragma once

#if defined(CPU_CAPABILITY) && !defined(__CUDACC__) && !defined(__HIPCC__)
#define RLL_CPU_CAPABILITY_BEGIN inline namespace CPU_CAPABILITY {
#define RLL_CPU_CAPABILITY_END }
#else
#define RLL_CPU_CAPABILITY_BEGIN
#define RLL_CPU_CAPABILITY_END
#endif
