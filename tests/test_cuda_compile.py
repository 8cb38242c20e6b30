"""Compile checks of the CUDA backend (csrc/cuda/), run on every CI machine that has nvcc, GPU or not.

* The torch-free kernel file is compiled with ``nvcc -c`` for sm_80 and sm_90 plus compute_90 PTX,
  with ``-Xptxas -v`` and the flags torch's CUDAExtension adds (``COMMON_NVCC_FLAGS``: no implicit
  half conversions). The ptxas report is parsed: every hot kernel must exist for both arches and
  have no spill stores/loads and a zero stack frame; registers per kernel are printed.
* The stable-ABI glue is compiled against the installed torch headers and those of the GPU
  machine's torch (2.11.0, tests/torch_headers.py), and every launcher it calls must be defined by
  the kernel object (catches a drifted launcher signature). The CPU translation units (csrc/*.cpp)
  are checked against those other headers with ``g++ -fsyntax-only`` and setup.py's own flags (the
  build compiles them against the installed ones). The kernel file includes no torch header.
* setup.py on a torch without CUDA prints one warning line and builds the CPU extension only.

Without nvcc the compile tests are skipped with a message saying so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_ext
import torch_headers

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNELS = CUDA_DIR / "rll_kernels.cu"
GLUE = CUDA_DIR / "rll_cuda_glue.cu"


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cand = Path(home) / "bin" / "nvcc" if home else None
    return str(cand) if cand is not None and cand.exists() else None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None,
    reason="nvcc not found (PATH, CUDA_HOME): CUDA compile checks skipped; "
    "install the CUDA toolkit to run them",
)

# What each CI run compiles: the arches of docs/cuda.md's TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX".
GENCODE = [
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=sm_90",
    "-gencode",
    "arch=compute_90,code=compute_90",
]
ARCHES = ("sm_80", "sm_90")
# Flags of setup.py's nvcc branch (and the ones CUDAExtension always adds).
BUILD_FLAGS = [
    "-O3",
    "-std=c++20",
    "--expt-relaxed-constexpr",
    "-Xcompiler",
    "-fPIC",
    *cpp_ext.COMMON_NVCC_FLAGS,
]
HOT_KERNELS = ("rll_stats_kernel", "rll_grad_q_kernel", "rll_grad_k_kernel", "rll_sqnorm_kernel")
DTYPES = ("float", "double", "__half", "__nv_bfloat16")
# what CUDAExtension / CppExtension define for every extension source
EXTENSION_DEFINES = [
    "-DTORCH_API_INCLUDE_EXTENSION_H",
    "-DTORCH_EXTENSION_NAME=_C",
    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
]
STABLE_ABI = ["-DTORCH_TARGET_VERSION=0x020a000000000000", "-DUSE_CUDA", *EXTENSION_DEFINES]


# the torch headers each compile check runs against: the installed torch's and the GPU machine's
HEADER_SETS = ["installed", *torch_headers.VERSIONS]


def torch_includes(which: str) -> list[str]:
    """-I flags of a header set; skips when another release's headers were not fetched."""
    if which == "installed":
        return [f"-I{p}" for p in cpp_ext.include_paths()]
    dirs = torch_headers.include_dirs(which)
    if dirs is None:
        pytest.skip(f"torch {which} headers not fetched: run `make torch-headers` (tests/torch_headers.py)")
    return [f"-I{p}" for p in dirs]


# ------------------------------------------------------------------ ptxas report parsing
@dataclass
class KernelInfo:
    name: str  # demangled when c++filt exists
    arch: str
    registers: int = -1
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    smem: int = 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> list[KernelInfo]:
    """Entry functions of an ``-Xptxas -v`` report with their registers, stack and spills."""
    out: list[KernelInfo] = []
    cur: KernelInfo | None = None
    props_of: str | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = KernelInfo(m.group(1), m.group(2))
            out.append(cur)
            props_of = None
            continue
        m = _PROPS.search(line)
        if m:
            props_of = m.group(1)
            continue
        m = _STACK.search(line)
        if m and cur is not None and props_of == cur.name:
            cur.stack, cur.spill_stores, cur.spill_loads = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m and cur is not None and cur.registers < 0:
            cur.registers = int(m.group(1))
            s = _SMEM.search(line)
            cur.smem = int(s.group(1)) if s else 0
    return out


def _demangle(names: list[str]) -> list[str]:
    if not shutil.which("c++filt"):
        return names
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return r.stdout.splitlines() if r.returncode == 0 else names


def _short(demangled: str) -> str:
    # "void rll::cuda::(anonymous namespace)::rll_stats_kernel<float>(...)" -> "rll_stats_kernel<float>"
    m = re.search(r"(\w+<[^<>]*>)\(", demangled)
    return m.group(1) if m else demangled


def test_parser_finds_spills_and_stack():
    # a hand-written report in ptxas's format: the check must be able to fail
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size, 4096 bytes smem
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90'
ptxas info    : Function properties for _Z3barPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""
    ks = parse_ptxas(text)
    assert [(k.name, k.arch) for k in ks] == [("_Z3fooPf", "sm_80"), ("_Z3barPf", "sm_90")]
    assert (ks[0].registers, ks[0].stack, ks[0].spill_stores, ks[0].spill_loads, ks[0].smem) == (
        255,
        16,
        8,
        12,
        4096,
    )
    assert (ks[1].registers, ks[1].stack, ks[1].spill_stores, ks[1].spill_loads) == (40, 0, 0, 0)
    assert _clean_problems(ks) == ["_Z3fooPf [sm_80]: stack 16 B, spill stores 8 B, spill loads 12 B"]


def _clean_problems(ks: list[KernelInfo]) -> list[str]:
    bad = []
    for k in ks:
        if k.stack != 0 or k.spill_stores != 0 or k.spill_loads != 0:
            bad.append(
                f"{_short(k.name)} [{k.arch}]: stack {k.stack} B, spill stores {k.spill_stores} B, "
                f"spill loads {k.spill_loads} B"
            )
    return bad


# ------------------------------------------------------------------ compiles
def _nvcc(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([NVCC, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def kernels_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda")
    obj = tmp / "rll_kernels.o"
    # -keep leaves the PTX of each virtual arch in tmp (no second compile for the tensor-core check)
    r = _nvcc(
        [
            "-c",
            *BUILD_FLAGS,
            *GENCODE,
            "-Xptxas",
            "-v",
            "-keep",
            "-keep-dir",
            str(tmp),
            "-I",
            str(ROOT / "csrc"),
            str(KERNELS),
            "-o",
            str(obj),
        ]
    )
    return r, obj


@needs_nvcc
def test_kernel_file_is_torch_free():
    for f in sorted(CUDA_DIR.glob("*")):
        if f.name == GLUE.name or f.suffix not in (".cu", ".cuh"):
            continue
        includes = re.findall(r'#include\s+[<"]([^>"]+)[>"]', f.read_text())
        torchy = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "Python.h", "pybind11")]
        assert not torchy, f"{f.name} must stay torch-free (compiled without torch in CI), includes {torchy}"


@needs_nvcc
@pytest.mark.slow
def test_kernels_compile_without_spills(kernels_build, capsys):
    r, obj = kernels_build
    assert r.returncode == 0, f"nvcc failed on {KERNELS.name}:\n{r.stderr[-6000:]}"
    assert obj.exists()
    ks = parse_ptxas(r.stdout + r.stderr)
    for k, dn in zip(ks, _demangle([k.name for k in ks])):
        k.name = dn
    # registers per kernel, shown on every run (not only on failure)
    rows: dict[str, dict[str, KernelInfo]] = {}
    for k in ks:
        rows.setdefault(_short(k.name), {})[k.arch] = k
    lines = [
        f"{'ptxas (-Xptxas -v)':34s} "
        + "  ".join(f"{a:>5s} regs" for a in ARCHES)
        + "   smem B  stack/spills"
    ]
    for name in sorted(rows):
        per = rows[name]
        regs = "  ".join(f"{per[a].registers:10d}" if a in per else f"{'-':>10s}" for a in ARCHES)
        worst = max(max(k.stack, k.spill_stores, k.spill_loads) for k in per.values())
        lines.append(f"{name:34s} {regs} {max(k.smem for k in per.values()):8d}  {worst:4d} B")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    # every hot kernel, every dtype, every arch was compiled and reported
    seen = {(_short(k.name), k.arch) for k in ks}
    missing = [
        (f"{n}<{t}>", a) for n in HOT_KERNELS for t in DTYPES for a in ARCHES if (f"{n}<{t}>", a) not in seen
    ]
    assert not missing, f"kernels missing from the ptxas report: {missing}"
    assert all(k.registers > 0 and k.stack >= 0 for k in ks), "unparsed ptxas lines"
    hot = [k for k in ks if any(h in k.name for h in HOT_KERNELS)]
    problems = _clean_problems(hot)
    assert not problems, "register spills / local stack in hot kernels:\n" + "\n".join(problems)
    # 2 blocks of 256 threads per SM (the __launch_bounds__) must fit: <= 128 registers
    assert max(k.registers for k in hot) <= 128


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("headers", HEADER_SETS)
def test_glue_compiles_against_torch_headers(kernels_build, tmp_path, headers):
    obj = tmp_path / "rll_cuda_glue.o"
    incs = torch_includes(headers)
    # the glue is host code around launchers: one arch is enough to check it against the headers
    r = _nvcc(
        [
            "-c",
            *BUILD_FLAGS,
            *STABLE_ABI,
            *incs,
            "-gencode",
            "arch=compute_80,code=sm_80",
            "-I",
            str(ROOT / "csrc"),
            str(GLUE),
            "-o",
            str(obj),
        ]
    )
    version = torch.__version__ if headers == "installed" else headers
    assert r.returncode == 0, f"nvcc failed on {GLUE.name} (torch {version} headers):\n{r.stderr[-6000:]}"
    kr, kobj = kernels_build
    if kr.returncode != 0 or not shutil.which("nm"):
        pytest.fail("kernel object or nm unavailable: cannot check the launcher symbols")
    undefined = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True).stdout.split()
    wanted = {s for s in undefined if "launch_rll" in s}
    assert len(wanted) == 16, (
        f"the glue should call the 4 launch_rll_* launchers for 4 dtypes, found {sorted(wanted)}"
    )
    defined = {
        ln.split()[-1]
        for ln in subprocess.run(
            ["nm", "--defined-only", str(kobj)], capture_output=True, text=True
        ).stdout.splitlines()
        if ln.strip()
    }
    assert wanted <= defined, (
        f"launchers called by the glue but not defined by the kernels: {wanted - defined}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("headers", [h for h in HEADER_SETS if h != "installed"])
def test_cpu_sources_compile_against_other_torch_headers(monkeypatch, headers):
    # the C++ translation units of a CUDA build (setup.py's cxx flags, -DRLL_WITH_CUDA), syntax and
    # template instantiation only: what the installed headers get from the build itself
    incs = torch_includes(headers)
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.fail("no host C++ compiler (g++/c++) for the CPU sources")
    calls = _exec_setup_py(monkeypatch, cuda="13.0", cuda_home="/usr/local/cuda", gpu=True, env={})
    flags = calls["cuda"][0][1]["extra_compile_args"]["cxx"]

    common = [cxx, "-fsyntax-only", *flags, *EXTENSION_DEFINES, *incs, f"-I{ROOT / 'csrc'}"]
    common += [f"-I{sysconfig.get_paths()['include']}"]  # Python.h
    sources = sorted((ROOT / "csrc").glob("*.cpp"))
    assert sources, "no csrc/*.cpp"

    def check(src: Path) -> str:
        r = subprocess.run([*common, str(src)], capture_output=True, text=True, cwd=ROOT, timeout=600)
        return "" if r.returncode == 0 else f"{src.name}:\n{r.stderr[-3000:]}"

    with ThreadPoolExecutor(max_workers=2) as pool:  # two compilers at a time: CI has 2 cores
        failed = [e for e in pool.map(check, sources) if e]
    assert not failed, f"against the torch {headers} headers:\n" + "\n".join(failed)


def ptx_mma_counts(ptx: str) -> dict[str, int]:
    """Mangled entry name -> number of warp-level MMA instructions (wmma.mma / mma.sync) in its body."""
    counts: dict[str, int] = {}
    cur = None
    for line in ptx.splitlines():
        m = re.search(r"\.entry\s+(\w+)", line)
        if m:
            cur = m.group(1)
            counts[cur] = 0
        elif cur is not None and "mma.sync" in line:
            counts[cur] += 1
    return counts


@needs_nvcc
@pytest.mark.slow
def test_half_kernels_use_tensor_cores(kernels_build):
    r, obj = kernels_build
    assert r.returncode == 0, r.stderr[-3000:]
    for arch in ("compute_80", "compute_90"):
        ptx = list(obj.parent.glob(f"*{arch}*.ptx"))
        assert len(ptx) == 1, f"no PTX kept for {arch}: {sorted(p.name for p in obj.parent.iterdir())}"
        counts = ptx_mma_counts(ptx[0].read_text())
        names = dict(zip(counts, _demangle(list(counts))))
        for mangled, n in counts.items():
            short = _short(names[mangled])
            if "sqnorm" in short or "normalize" in short:  # row passes, no tile product
                continue
            tensor_core = "__half" in short or "__nv_bfloat16" in short
            assert (n > 0) == tensor_core, f"{short} [{arch}]: {n} mma.sync instructions"
        assert sum(1 for n in counts.values() if n > 0) == 6, counts  # 3 kernels x (fp16, bf16)


# ------------------------------------------------------------------ setup.py without a CUDA torch
@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch branch of setup.py")
def test_setup_cpu_torch_warns_once_and_builds_cpu_only():
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX")
    r = subprocess.run(
        [sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    warn = [ln for ln in r.stderr.splitlines() if "CUDA backend not built" in ln]
    assert len(warn) == 1, f"expected one warning line, got:\n{r.stderr}"
    assert "torch has no CUDA" in warn[0]


def _exec_setup_py(monkeypatch, *, cuda: str | None, cuda_home: str | None, gpu: bool, env: dict[str, str]):
    """Run setup.py's module code with torch's CUDA facts faked and setup()/extensions recorded."""
    import setuptools

    calls: dict[str, list] = {"cuda": [], "cpp": []}
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(cpp_ext, "CUDA_HOME", cuda_home)
    monkeypatch.setattr(
        cpp_ext, "CUDAExtension", lambda name, sources, **kw: calls["cuda"].append((sources, kw))
    )
    monkeypatch.setattr(
        cpp_ext, "CppExtension", lambda name, sources, **kw: calls["cpp"].append((sources, kw))
    )
    for key in ("FORCE_CUDA", "USE_CUDA", "TORCH_CUDA_ARCH_LIST", "NVCC_THREADS", "RLL_SKIP_EXT", "DEBUG"):
        monkeypatch.setenv(key, env.get(key, ""))
    code = compile((ROOT / "setup.py").read_text(), str(ROOT / "setup.py"), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(ROOT / "setup.py")})
    return calls


def test_setup_force_cuda_without_gpu_builds_cuda_extension(monkeypatch, capsys):
    calls = _exec_setup_py(
        monkeypatch,
        cuda="12.8",
        cuda_home="/usr/local/cuda",
        gpu=False,
        env={"FORCE_CUDA": "1", "NVCC_THREADS": "3"},
    )
    assert not calls["cpp"] and len(calls["cuda"]) == 1
    sources, kw = calls["cuda"][0]
    names = {Path(s).as_posix() for s in sources}
    assert {
        "csrc/ops.cpp",
        "csrc/rll_cpu.cpp",
        "csrc/cuda/rll_kernels.cu",
        "csrc/cuda/rll_cuda_glue.cu",
    } <= names
    nvcc = kw["extra_compile_args"]["nvcc"]
    assert "-std=c++20" in nvcc and "--expt-relaxed-constexpr" in nvcc
    assert nvcc[nvcc.index("--threads") + 1] == "3"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"  # default when no GPU can be queried
    assert "CUDA backend not built" not in capsys.readouterr().err


def test_setup_nvcc_threads_default(monkeypatch):
    calls = _exec_setup_py(monkeypatch, cuda="12.8", cuda_home="/usr/local/cuda", gpu=True, env={})
    nvcc = calls["cuda"][0][1]["extra_compile_args"]["nvcc"]
    assert nvcc[nvcc.index("--threads") + 1] == "2"


def test_setup_keeps_explicit_arch_list(monkeypatch):
    calls = _exec_setup_py(
        monkeypatch,
        cuda="12.8",
        cuda_home="/usr/local/cuda",
        gpu=False,
        env={"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0"},
    )
    assert len(calls["cuda"]) == 1 and os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"


@pytest.mark.parametrize(
    "cuda,home,gpu,env,why",
    [
        (None, "/usr/local/cuda", True, {"FORCE_CUDA": "1"}, "torch has no CUDA"),
        ("12.8", None, True, {}, "nvcc not found"),
        ("12.8", "/usr/local/cuda", False, {}, "no GPU visible; set FORCE_CUDA=1"),
        ("12.8", "/usr/local/cuda", True, {"USE_CUDA": "0"}, "USE_CUDA=0"),
    ],
)
def test_setup_without_cuda_warns_once_and_builds_cpu(monkeypatch, capsys, cuda, home, gpu, env, why):
    calls = _exec_setup_py(monkeypatch, cuda=cuda, cuda_home=home, gpu=gpu, env=env)
    assert not calls["cuda"] and len(calls["cpp"]) == 1
    assert not any(s.endswith(".cu") for s in calls["cpp"][0][0])
    warn = [ln for ln in capsys.readouterr().err.splitlines() if "CUDA backend not built" in ln]
    assert len(warn) == 1 and why in warn[0], warn


def test_other_torch_headers_missing_means_skip(monkeypatch, tmp_path):
    # an empty cache: no include dirs, and the compile checks skip naming the make target
    monkeypatch.setenv("RLL_TORCH_HEADERS_CACHE", str(tmp_path))
    assert torch_headers.include_dirs("2.11.0") is None
    with pytest.raises(pytest.skip.Exception, match="make torch-headers"):
        torch_includes("2.11.0")
    (tmp_path / "torch-2.11.0" / "include").mkdir(parents=True)
    assert torch_headers.include_dirs("2.11.0") is None  # no stamp: an interrupted extraction
    (tmp_path / "torch-2.11.0" / torch_headers.STAMP).write_text("x")
    assert torch_headers.include_dirs("2.11.0")[0] == str(tmp_path / "torch-2.11.0" / "include")
