"""compute-sanitizer memcheck and racecheck on a small case of every kernel (Triton and CUDA).

``sanitize`` starts the two tools at once, each around ``gpu_check.py sanitize-case``, which runs
every loss on every fused backend, forward and backward, in fp32 and fp16 (N = 256, D = 128: the
Triton kernels compiled by the parity part are reused). The caching allocator is off
(PYTORCH_NO_CUDA_MEMORY_CACHING=1) so memcheck sees each tensor's real bounds. The report lists the
error count of each tool and the kernels named in its errors. In a dry run the commands are printed,
not run, and the case runs once on the CPU without a sanitizer.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import torch

from bench.device.context import ROOT, Ctx, synchronize
from bench.device.losses import LOSSES, fused_fn, not_available, problem

TOOLS = {"memcheck": [], "racecheck": ["--racecheck-report", "all"]}


def sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [
        os.environ.get("CUDA_HOME", ""),
        "/usr/local/cuda",
        *sorted(glob.glob("/usr/local/cuda-*"), reverse=True),
    ]
    for home in homes:
        for cand in (f"{home}/bin/compute-sanitizer", f"{home}/compute-sanitizer/compute-sanitizer"):
            if home and os.path.exists(cand):
                return cand
    return None


def commands(ctx: Ctx, exe: str) -> dict[str, list[str]]:
    case = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "sanitize-case", "--out", str(ctx.out)]
    base = [
        "--error-exitcode",
        "3",
        "--print-limit",
        "40",
        "--show-backtrace",
        "no",
        "--target-processes",
        "application-only",
    ]
    return {
        tool: [exe, "--tool", tool, *base, *extra, "--log-file", str(ctx.out / f"sanitize-{tool}.log"), *case]
        + ["--name", f"sanitize-case-{tool}"]
        for tool, extra in TOOLS.items()
    }


def run(ctx: Ctx) -> int:
    exe = sanitizer()
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", RLL_TRITON_AUTOTUNE="0")
    cmds = commands(ctx, exe or "compute-sanitizer")
    if ctx.dry or exe is None:
        for tool, cmd in cmds.items():
            ctx.note(
                f"sanitize {tool}: would run: PYTORCH_NO_CUDA_MEMORY_CACHING=1 {' '.join(cmd)}", summary=False
            )
        ctx.note("sanitize: " + ("dry run, commands printed" if ctx.dry else "compute-sanitizer not found"))
        if exe is None and not ctx.dry:
            ctx.check("compute-sanitizer found", False, "not on PATH, CUDA_HOME or /usr/local/cuda*")
        return run_case(ctx) if ctx.dry else ctx.finish()
    procs = {
        tool: subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for tool, cmd in cmds.items()
    }
    for tool, p in procs.items():
        out, _ = p.communicate()
        (ctx.out / f"sanitize-{tool}.stdout").write_text(out)
        report(ctx, tool, p.returncode, out)
    return ctx.finish()


def report(ctx: Ctx, tool: str, rc: int, stdout: str) -> None:
    log_path = ctx.out / f"sanitize-{tool}.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    m = re.search(r"ERROR SUMMARY: (\d+) error", log)
    errors = int(m.group(1)) if m else -1
    kernels = sorted(
        set(
            re.findall(
                r"=+\s+(?:at|Write access at|Read access at)\s+(?:0x[0-9a-f]+ in )?([A-Za-z_]\w*)", log
            )
        )
    )
    ran = stdout.count("sanitize-case ran ")
    detail = f"{errors} errors, {ran} cases ran, exit {rc}" + (
        f"; kernels named: {', '.join(kernels[:8])}" if kernels else ""
    )
    ctx.check(f"sanitize {tool}", errors == 0 and rc == 0 and ran > 0, detail)


def run_case(ctx: Ctx) -> int:
    """Every loss x fused backend, forward and backward, fp32 and fp16, synchronised after each."""
    n, d = (24, 16) if ctx.dry else (256, 128)
    for loss in LOSSES.values():
        for backend in loss.backends:
            for dtype in (torch.float32,) if ctx.dry else (torch.float32, torch.float16):
                prob = problem(loss, n, d, ctx.dev, seed=5)
                leaves = prob.leaves(dtype)
                try:
                    fused_fn(loss, backend, ctx.dry)(leaves, prob.y).backward()
                    synchronize(ctx.dev)
                except Exception as e:
                    if not_available(e):
                        continue
                    ctx.check(
                        f"sanitize-case {loss.name} {backend} {dtype}",
                        False,
                        f"{type(e).__name__}: {e}"[:200],
                    )
                    continue
                print(f"sanitize-case ran {loss.name} {backend} {dtype}", flush=True)
                ctx.passed += 1
    ctx.note(f"sanitize-case: {ctx.passed} cases ran")
    return ctx.finish()
