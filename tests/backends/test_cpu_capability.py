"""The builds of the CPU kernels (docs/architecture.md, "SIMD builds of the CPU kernels"): on x86-64
the kernels are compiled for AVX2 and for AVX-512 and the extension picks one when it loads, from
the CPU (and ATen's own choice, which follows ATEN_CPU_CAPABILITY), or the one that
RLL_KERNELS_CPU_CAPABILITY names; a bad value is a ValueError naming the variable.

Each choice is made in a fresh interpreter. The in-process suite runs every parity test on the
build this machine picks; here the parity subset runs again, in a subprocess, on each other build
this CPU can run (on an AVX-512 machine: AVX2), so both builds are compared with the reference.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts import ROOT

from rll_kernels import _extension

VAR = "RLL_KERNELS_CPU_CAPABILITY"
X86 = platform.machine() in ("x86_64", "AMD64")
pytestmark = [
    pytest.mark.skipif(not _extension.HAS_C, reason="needs the C++ extension"),
    pytest.mark.skipif(not X86, reason="x86-64 has the AVX2 and AVX-512 builds; elsewhere there is one"),
]
CHILD = "import json; from rll_kernels import _extension; print(json.dumps(_extension.cpu_capability()))"
# the parity subset of each loss on the cpp backend (~1 min on 2 busy cores)
PARITY_FILES = ["tests/rll/test_parity.py", "tests/softtriple/test_parity.py", "tests/osm/test_parity.py"]
PARITY_SUBSET = "cpp and (not _sizes or -37- or in_batch_sizes and -129-)"


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (VAR, "ATEN_CPU_CAPABILITY")}
    return {**env, **extra}


def _child(**extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD],
        env=_env(**extra),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def _chosen(**extra: str) -> list:
    out = _child(**extra)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_has_avx512() -> bool:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags


HAS_AVX512 = _cpu_has_avx512()


def test_default_is_avx512_where_the_cpu_and_aten_use_it():
    wanted = "avx512" if HAS_AVX512 and torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2"
    name, why = _chosen()
    assert name == wanted and "chosen from the CPU" in why, (name, why)


@pytest.mark.parametrize("value", ["avx2", "AVX2"])
def test_the_variable_forces_avx2(value):
    assert _chosen(**{VAR: value}) == ["avx2", f"forced by {VAR}"]


def test_aten_cpu_capability_avx2_is_followed():
    name, why = _chosen(ATEN_CPU_CAPABILITY="avx2")
    assert name == "avx2" and "avx2" in why, (name, why)


def test_the_variable_wins_over_aten_cpu_capability():
    assert _chosen(ATEN_CPU_CAPABILITY="default", **{VAR: "avx2"})[0] == "avx2"


def test_forcing_avx512():
    if HAS_AVX512:
        assert _chosen(**{VAR: "avx512"}) == ["avx512", f"forced by {VAR}"]
        return
    out = _child(**{VAR: "avx512"})
    assert out.returncode != 0 and "ValueError" in out.stderr and f"{VAR}=avx512" in out.stderr, out.stderr


@pytest.mark.parametrize("value", ["avx3", "sse", "avx2 "])
def test_a_bad_value_is_an_error_naming_the_variable(value):
    out = _child(**{VAR: value})
    assert out.returncode != 0
    assert f"ValueError: {VAR} must be one of avx2, avx512" in out.stderr and repr(value) in out.stderr, (
        out.stderr
    )


def test_env_report_names_the_build():
    name, why = _extension.cpu_capability()
    from rll_kernels import env_report

    assert f"CPU kernels: {name} build, {why}" in env_report.report()


@pytest.mark.parametrize("build", ["avx2", "avx512"])
def test_parity_subset_on_each_build(build):
    if build == _extension.cpu_capability()[0]:
        pytest.skip(f"{build} is the build of this process: the whole suite runs on it")
    if build == "avx512" and not HAS_AVX512:
        pytest.skip("this CPU has no AVX-512")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PARITY_FILES, "-k", PARITY_SUBSET]
    out = subprocess.run(cmd, env=_env(**{VAR: build}), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-2000:]


FUNCTION_START = re.compile(r"^[0-9a-f]+ <(.+)>:$")
EVEX_OPERAND = re.compile(r"%zmm|%k[0-7]|%[xy]mm(1[6-9]|2[0-9]|3[01])\b")  # registers only AVX-512 has


def _functions_with_avx512_code(so: Path) -> set[str]:
    dis = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True, check=True
    )
    found, function = set(), None
    for line in dis.stdout.splitlines():
        start = FUNCTION_START.match(line)
        if start:
            function = start.group(1)
        elif function is not None and EVEX_OPERAND.search(line):
            found.add(function)
    return found


def _defined_symbols(objects: list[Path]) -> set[str]:
    out = subprocess.run(
        ["nm", "--defined-only", *map(str, objects)], capture_output=True, text=True, check=True
    )
    return {p[2] for p in (ln.split() for ln in out.stdout.splitlines()) if len(p) == 3 and p[1] in "TWV"}


def test_no_avx512_code_behind_a_symbol_the_avx2_build_defines():
    """The AVX2 objects come first in the link (setup.py), so where both builds emit the same inline
    function of torch's headers, the AVX2 copy is the one kept: no function of the extension that an
    AVX2 or shared object defines holds an AVX-512 (EVEX) instruction."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    temp = ROOT / "build" / f"torch-{torch.__version__}-{tag}" / "temp"
    base = sorted((temp / "csrc").glob("*.o")) + sorted((temp / "avx2" / "csrc").glob("*.o"))
    so = next(Path(_extension.__file__).parent.glob("_C*.so"), None)
    if not base or so is None or not (shutil.which("objdump") and shutil.which("nm")):
        pytest.skip(f"needs objdump, nm, the built extension and its objects in {temp}")
    evex_functions = _functions_with_avx512_code(so)
    assert evex_functions, "the AVX-512 build holds no AVX-512 instruction"
    shared = evex_functions & _defined_symbols(base)
    assert not shared, sorted(shared)[:5]
