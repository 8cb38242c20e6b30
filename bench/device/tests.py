"""The CUDA-marked tests and the Triton tests, on the GPU, in parallel pytest processes.

Selected by marker (``-m "(cuda or interpreter) and not slow"``: the ``slow`` ones are the CPU
stand-ins of this check and the Triton compiler check without a GPU), with RLL_TRITON_AUTOTUNE=0 (the
first launch configuration that fits: the tests use many small D, each would trigger a tuning).
Each process runs one slice (bench/device/pytest_shard.py) and logs one line per test. The dry run
collects the same selection (it must not be empty) and checks that the slices cover it exactly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from bench.device.context import ROOT, Ctx

MARKERS = "(cuda or interpreter) and not slow"


def _pytest(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "tests", "-m", MARKERS, "-p", "bench.device.pytest_shard", *args]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RLL_TRITON_AUTOTUNE"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def _collect(*extra: str) -> list[str]:
    """Node ids the GPU run would select, collected in this process (the dry run: TRITON_INTERPRET=1)."""
    import contextlib
    import io

    import pytest

    class Recorder:
        ids: list[str] = []

        def pytest_collection_finish(self, session):
            Recorder.ids = [it.nodeid for it in session.items]

    args = [str(ROOT / "tests"), f"--rootdir={ROOT}", "-m", MARKERS, "-p", "bench.device.pytest_shard"]
    args += ["-p", "no:cacheprovider"]
    with contextlib.redirect_stdout(io.StringIO()):
        pytest.main([*args, "--collect-only", "-q", *extra], plugins=[Recorder()])
    return Recorder.ids


def dry_run(ctx: Ctx) -> int:
    """The selection is not empty, and ``--shard`` keeps exactly its slice."""
    from bench.device.pytest_shard import slices

    every = _collect()
    ctx.check("test selection", len(every) > 0, f"{len(every)} tests selected by -m {MARKERS!r}")
    want = slices(every, 3)
    got = _collect("--shard", "2/3")
    ok = sorted(got) == sorted(want[1]) and sorted(sum(want, [])) == sorted(every)
    ctx.check("slices", ok, f"{[len(w) for w in want]} tests, --shard 2/3 kept {len(got)}")
    ctx.note(f"tests: dry run, {len(every)} tests collected (run on the GPU in slices)")
    return ctx.finish()


def run(ctx: Ctx) -> int:
    if ctx.dry:
        return dry_run(ctx)
    n = max(1, min(8, (os.cpu_count() or 2) // 2))
    procs = []
    for i in range(1, n + 1):
        log = open(ctx.out / f"tests-{i}.log", "w")  # noqa: SIM115  (closed after the process ends)
        cmd = _pytest(
            "-v",
            "-rfE",
            "-p",
            "no:cacheprovider",
            "--shard",
            f"{i}/{n}",
            f"--junitxml={ctx.out}/tests-{i}.xml",
        )
        procs.append(
            (subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT), log, i)
        )
    for p, log, i in procs:
        p.wait()
        log.close()
        summarize(ctx, i, p.returncode)
    ctx.note(f"tests: {ctx.passed} slices passed, {ctx.failed} failed ({n} slices)")
    return ctx.finish()


def summarize(ctx: Ctx, i: int, rc: int) -> None:
    text = (ctx.out / f"tests-{i}.log").read_text(errors="replace")
    counts = {
        k: len(re.findall(rf" {k.upper()}(?: |$)", text, re.M))
        for k in ("passed", "failed", "skipped", "error")
    }
    last = [ln for ln in text.splitlines() if re.match(r"=+ .*(passed|failed|error).* =+$", ln)]
    ctx.check(f"tests slice {i}", rc == 0, last[-1].strip("= ") if last else f"exit {rc}, {counts}")
    for ln in text.splitlines():
        if ln.startswith(("FAILED ", "ERROR ")):
            ctx.note(f"  {ln[:180]}")
