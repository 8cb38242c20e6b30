// CPU emulation (tests only): the WMMA branch of rll_kernels.cu needs __CUDA_ARCH__ >= 800 and is
// not compiled on the host, so nvcuda::wmma is not needed here.
#pragma once
