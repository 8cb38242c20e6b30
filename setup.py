"""Build the rll_kernels C++ extension.

Always builds the CPU kernels (csrc/*.cpp) with ninja. CUDA sources (csrc/cuda/*.cu) are added
only when torch was built with CUDA and nvcc is present (or FORCE_CUDA=1 with a CUDA torch, for
GPU-less build machines: set TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0+PTX"). Otherwise one warning line.

Env: RLL_SKIP_EXT=1 (pure-Python install: reference + Triton), DEBUG=1 (-O0 -g),
MAX_JOBS (parallel compile jobs), NVCC_THREADS (default 2).
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    if os.environ.get("RLL_SKIP_EXT", "0") == "1":
        print("rll_kernels: RLL_SKIP_EXT=1, building no C++ extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++20", "-fopenmp", "-DRLL_WITH_OPENMP", "-Wall", "-Wno-unused-function"]
    if platform.machine() in ("x86_64", "AMD64"):
        # AVX2+FMA vectors through ATen's Vectorized (Sleef exp); any x86-64-v3 CPU runs it.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    has_cuda_torch = torch.version.cuda is not None
    has_nvcc = shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    use_cuda = bool(cuda_sources) and has_cuda_torch and (has_nvcc or force)
    if cuda_sources and not use_cuda:
        why = "torch has no CUDA" if not has_cuda_torch else "nvcc not found"
        print(f"rll_kernels: warning: CUDA backend not built ({why}); CPU and Triton backends only",
              file=sys.stderr)
    if use_cuda:
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
                "--threads", os.environ.get("NVCC_THREADS", "2")]
        ext = CUDAExtension(
            "rll_kernels._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DRLL_WITH_CUDA"], "nvcc": nvcc + ["-DRLL_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "rll_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
