"""Build the rll_kernels C++ extension.

Always builds the CPU kernels (csrc/*.cpp) with ninja. The CUDA kernels (csrc/cuda/*.cu) are added
when torch was built with CUDA, nvcc is found (CUDA_HOME) and a GPU is visible; FORCE_CUDA=1 builds
them on a GPU-less machine (TORCH_CUDA_ARCH_LIST, default "8.0;9.0+PTX"). Otherwise one warning line
and a CPU-only extension. USE_CUDA=0 never builds them.

The extension uses torch's C++ ABI, which changes between torch releases, so a build is tied to the
torch it compiles against:
- the package metadata requires ``torch==X.Y.*`` of that torch (a build without the extension,
  RLL_SKIP_EXT=1, requires the tested range, ``[tool.rll_kernels] tested-torch`` in pyproject.toml);
- ``rll_kernels/_build_info.json``, written beside the compiled extension, records that torch;
  rll_kernels/_extension.py does not load the extension under another one and says how to rebuild;
- an isolated build (``pip install .`` without ``--no-build-isolation``) compiles against the torch of
  ``[build-system] requires``; when the environment being installed into already has a torch of
  another major.minor version, it stops before compiling and says to run
  ``pip install --no-build-isolation .``.
Objects are compiled in build/torch-<torch version>-<python tag>/ (one per torch), so ninja reuses
them between the editable build, the wheel and later rebuilds against the same torch.

The CPU kernels are compiled once per SIMD capability (AVX2 and AVX-512 on x86-64, see _cpu_builds);
the extension picks one when it loads (csrc/cpu_dispatch.cpp; RLL_KERNELS_CPU_CAPABILITY=avx2 forces AVX2).

Env: RLL_SKIP_EXT=1 (pure-Python install: reference + Triton), DEBUG=1 (-O0 -g),
MAX_JOBS (parallel compile jobs), NVCC_THREADS (nvcc --threads per job, default 2).
"""

import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

try:
    import tomllib
except ImportError:  # Python 3.10: setuptools vendors tomli
    import tomli as tomllib

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # Ampere and Hopper cubins + PTX for newer GPUs
BUILD_INFO_FILE = "_build_info.json"  # read by rll_kernels/_extension.py


def _tested_torch() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["rll_kernels"]["tested-torch"]


def _major_minor(version: str):
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


# Run by the interpreter being installed into, with PYTHON* variables ignored (-E), so it sees that
# environment's site-packages rather than pip's isolated build environment; reads torch/version.py
# without importing torch.
_TARGET_TORCH_PROBE = """
import importlib.util, json, os, runpy
spec = importlib.util.find_spec("torch")
if spec is None or not spec.submodule_search_locations:
    print("null")
else:
    v = runpy.run_path(os.path.join(list(spec.submodule_search_locations)[0], "version.py"))
    print(json.dumps({"version": v["__version__"], "cuda": v.get("cuda")}))
"""


def _target_torch():
    """{"version", "cuda"} of the torch in the environment sys.executable belongs to, or None."""
    try:
        out = subprocess.run(
            [sys.executable, "-E", "-c", _TARGET_TORCH_PROBE],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tempfile.gettempdir(),
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def _check_target_torch(torch, with_cuda: bool) -> None:
    """Stop an isolated build whose torch differs from the one of the environment installed into.

    pip's default build isolation runs this file with the target interpreter (sys.executable) but
    with the build environment's site-packages, where [build-system] requires put its own torch.
    """
    here = os.path.realpath(torch.__file__)
    if here.startswith(os.path.realpath(sys.prefix) + os.sep):
        return  # torch comes from the environment installed into: --no-build-isolation or a plain build
    target = _target_torch()
    if target is None:
        return  # no torch there yet: the metadata's torch==X.Y.* makes pip install the one built against
    same = _major_minor(target["version"]) == _major_minor(torch.__version__)
    if same and (target["cuda"] is not None or not with_cuda):
        return
    sys.exit(
        f"rll_kernels: stopping before compiling. This is an isolated build (pip's build isolation), "
        f"which compiles against torch {torch.__version__} from [build-system] requires, but the "
        f"environment you are installing into ({sys.prefix}) has torch {target['version']}, and "
        f"rll_kernels does not load a C++ extension built for another torch release (torch does not keep "
        f"its C++ ABI between releases). Build it against your torch instead:\n"
        f"    {sys.executable} -m pip install setuptools wheel ninja\n"
        f"    cd {ROOT} && {sys.executable} -m pip install --no-build-isolation .\n"
    )


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


def _find_cuda_home() -> None:
    """torch takes CUDA_HOME from the nvcc on PATH; when that nvcc lives outside the toolkit (a link
    or wrapper in /usr/local/bin), point CUDA_HOME at the toolkit that holds libcudart."""
    nvcc_path = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or not nvcc_path:
        return

    def has_cudart(d):
        return bool(glob.glob(os.path.join(d, "lib64", "libcudart.so*")))

    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc_path)))
    if not has_cudart(guess):
        for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
            if has_cudart(cand):
                os.environ["CUDA_HOME"] = cand
                break


def _cpu_builds() -> dict:
    """{name: cxx flags} of the builds of the CPU kernel sources (csrc/*_cpu.cpp), each compiled with
    CPU_CAPABILITY naming it, which puts its code in its own namespace (csrc/cpu_capability.h);
    csrc/cpu_dispatch.cpp picks one when the extension loads. The first build's flags also compile
    the other C++ sources. On x86-64: AVX2 + FMA (any x86-64-v3 CPU) and AVX-512 F/BW/VL/DQ, the flags
    ATen compiles its own kernels of each capability with; ATen's Vectorized takes its width from
    CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512 (Sleef exp). Elsewhere one portable build."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return {"default": ["-DCPU_CAPABILITY=DEFAULT"]}
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    avx512 = avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    return {
        "avx2": avx2 + ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
        "avx512": avx512 + ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    }


def _compile_per_cpu_build(compile_sources, builds: dict):
    """A compiler.compile that compiles the CPU kernel sources (csrc/*_cpu.cpp) once per build of
    ``builds``, each into its own folder of the build directory, and the other sources once with the
    first build's flags. The first build's objects come first in the link: where two builds emit the
    same inline function of torch's or the standard library's headers, the linker keeps the first
    copy, which every CPU that runs the extension can run."""
    first = next(iter(builds.values()))

    def with_flags(postargs: dict, flags: list) -> dict:
        return {**postargs, "cxx": list(postargs["cxx"]) + flags}

    def compile_per_build(sources, output_dir=None, extra_postargs=None, **kwargs):
        kernels = [src for src in sources if src.endswith("_cpu.cpp")]
        shared = [src for src in sources if src not in kernels]
        objects = compile_sources(
            shared, output_dir=output_dir, extra_postargs=with_flags(extra_postargs, first), **kwargs
        )
        for name, flags in builds.items():
            objects += compile_sources(
                kernels,
                output_dir=os.path.join(output_dir, name),
                extra_postargs=with_flags(extra_postargs, flags),
                **kwargs,
            )
        return objects

    return compile_per_build


def _extension(torch, use_cuda: bool):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++20", "-fopenmp", "-DRLL_WITH_OPENMP", "-Wall", "-Wno-unused-function"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not use_cuda:
        return CppExtension(
            "rll_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
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
    return CUDAExtension(
        "rll_kernels._C",
        sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + ["-DRLL_WITH_CUDA"], "nvcc": nvcc + ["-DRLL_WITH_CUDA"]},
        extra_link_args=["-fopenmp"],
    )


def _build_ext_class(torch, build_base: str, use_cuda: bool):
    """torch's ninja BuildExtension, compiling in build_base/temp (kept: editable builds would use a
    fresh temporary folder each time) and writing _build_info.json beside the extension."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtWithInfo(BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(build_base, "temp")

        def build_extension(self, ext):
            compile_sources = self.compiler.compile  # torch's ninja compile, set by build_extensions
            self.compiler.compile = _compile_per_cpu_build(compile_sources, _cpu_builds())
            try:
                return super().build_extension(ext)
            finally:
                self.compiler.compile = compile_sources

        def run(self):
            super().run()
            info = {
                "torch": torch.__version__,
                "torch_cuda": torch.version.cuda,
                "cuda_kernels": use_cuda,
                "cpu_builds": list(_cpu_builds()),
                "python": platform.python_version(),
                "source_dir": ROOT,
            }
            out = os.path.join(os.path.dirname(self.get_ext_fullpath("rll_kernels._C")), BUILD_INFO_FILE)
            with open(out, "w") as f:
                json.dump(info, f, indent=1)

    return BuildExtWithInfo


def _config():
    """setup() keywords: the extension, its build command and the torch requirement."""
    if os.environ.get("RLL_SKIP_EXT", "0") == "1":
        print("rll_kernels: RLL_SKIP_EXT=1, building no C++ extension", file=sys.stderr)
        return {"install_requires": [f"torch{_tested_torch()}", "numpy"]}
    _find_cuda_home()
    import torch

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda, why = _cuda_wanted(torch, cuda_sources)
    if cuda_sources and not use_cuda:
        print(
            f"rll_kernels: warning: CUDA backend not built ({why}); CPU and Triton backends only",
            file=sys.stderr,
        )
    if "sdist" not in sys.argv:
        _check_target_torch(torch, use_cuda)
    from packaging.specifiers import SpecifierSet

    if torch.__version__ not in SpecifierSet(_tested_torch(), prereleases=True):
        print(
            f"rll_kernels: warning: torch {torch.__version__} is outside the tested range "
            f"torch{_tested_torch()}; building against it anyway",
            file=sys.stderr,
        )
    major, minor = _major_minor(torch.__version__)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    build_base = os.path.join("build", f"torch-{torch.__version__}-{tag}")
    return {
        "ext_modules": [_extension(torch, use_cuda)],
        "cmdclass": {"build_ext": _build_ext_class(torch, build_base, use_cuda)},
        "options": {"build": {"build_base": build_base}},
        "install_requires": [f"torch=={major}.{minor}.*", "numpy"],
    }


setup(**_config())
