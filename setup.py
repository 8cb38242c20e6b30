"""Build the rll_kernels C++ extension.

Always builds the CPU kernels (csrc/*.cpp) with ninja. The CUDA kernels (csrc/cuda/*.cu) are added
when torch was built with CUDA, nvcc is found (CUDA_HOME) and a GPU is visible; FORCE_CUDA=1 builds
them on a GPU-less machine (TORCH_CUDA_ARCH_LIST, default "8.0;9.0+PTX"). Otherwise one warning line
and a CPU-only extension. USE_CUDA=0 never builds them.

Env: RLL_SKIP_EXT=1 (pure-Python install: reference + Triton), DEBUG=1 (-O0 -g),
MAX_JOBS (parallel compile jobs), NVCC_THREADS (nvcc --threads per job, default 2).
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # Ampere and Hopper cubins + PTX for newer GPUs


def _cuda_wanted(torch, cuda_sources):
    """(build the CUDA kernels?, why not). Needs a CUDA torch and nvcc (CUDA_HOME), and a GPU or
    FORCE_CUDA=1 (GPU-less build machines, with TORCH_CUDA_ARCH_LIST)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if not cuda_sources:
        return False, "no csrc/cuda sources"
    if os.environ.get("USE_CUDA", "1") == "0":
        return False, "USE_CUDA=0"
    if torch.version.cuda is None:
        return False, "torch has no CUDA"
    if CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    if not (torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"):
        return False, "no GPU visible; set FORCE_CUDA=1 to build anyway"
    return True, ""


def _ext_modules():
    if os.environ.get("RLL_SKIP_EXT", "0") == "1":
        print("rll_kernels: RLL_SKIP_EXT=1, building no C++ extension", file=sys.stderr)
        return [], {}
    # torch takes CUDA_HOME from the nvcc on PATH; when that nvcc lives outside the toolkit (a link or
    # wrapper in /usr/local/bin), point CUDA_HOME at the toolkit that holds libcudart
    nvcc_path = shutil.which("nvcc")
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and nvcc_path:

        def has_cudart(d):
            return bool(glob.glob(os.path.join(d, "lib64", "libcudart.so*")))

        guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc_path)))
        if not has_cudart(guess):
            for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
                if has_cudart(cand):
                    os.environ["CUDA_HOME"] = cand
                    break
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
    use_cuda, why = _cuda_wanted(torch, cuda_sources)
    if cuda_sources and not use_cuda:
        print(
            f"rll_kernels: warning: CUDA backend not built ({why}); CPU and Triton backends only",
            file=sys.stderr,
        )
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # no GPU to query: cpp_extension would fail on an empty arch list
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
            print(
                f"rll_kernels: no GPU visible, building for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}",
                file=sys.stderr,
            )
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
        # c++20: torch 2.13 headers; stable ABI of torch 2.10 for the glue (csrc/cuda/rll_cuda_glue.cu)
        nvcc += [
            "-std=c++20",
            "--expt-relaxed-constexpr",
            "-DTORCH_TARGET_VERSION=0x020a000000000000",
            "-DUSE_CUDA",
            "--threads",
            os.environ.get("NVCC_THREADS") or "2",
        ]
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
