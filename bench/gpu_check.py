"""The parts of the GPU device check; bench/device_check.sh runs them in order, each with a timeout.

    python bench/gpu_check.py PART [--out DIR] [--dry-run]

PART is one of: env, tests, parity, goal, sync, sanitize, timings, roofline, summary (and the
helpers parity-cases and sanitize-case, started by parity and sanitize). Every part prints its
findings, writes its tables, CSV and ``<part>.summary.json`` under DIR (default
bench/results/device/) and exits 1 if one of its checks failed. ``--dry-run`` runs the part on the
CPU (Triton interpreter, the CUDA kernels emulated, tiny sizes): it checks this script, not the
GPU. docs/device_check.md says what each part shows and how long it takes on an H200.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if "--dry-run" in sys.argv:  # read when the Triton kernels are decorated: before rll_kernels is imported
    os.environ["TRITON_INTERPRET"] = "1"
if sys.argv[1:2] == ["warm"] or "--no-extension" in sys.argv:
    # warm runs while the extension builds: never map a _C*.so that the build may overwrite (the
    # Triton backend needs no C++ extension); its parity-cases workers inherit the flag
    sys.modules["rll_kernels._C"] = None  # type: ignore[assignment]  (import _C raises ImportError)

PARTS = ("env", "tests", "parity", "goal", "sync", "sanitize", "timings", "roofline", "summary", "warm")
HELPERS = ("parity-cases", "sanitize-case")


def env_part(ctx) -> int:
    """Versions, the GPU (nvidia-smi), the usable backends (rll_kernels.env_report)."""
    import subprocess

    import torch

    import rll_kernels
    from bench.device.losses import has_pml
    from rll_kernels import env_report

    text = ""
    if not ctx.dry:
        cmd = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            text += f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}\n"
        except (OSError, subprocess.TimeoutExpired) as e:
            text += f"$ {' '.join(cmd)}\n{type(e).__name__}: {e}\n"
    text += env_report.report() + "\n"
    print(text)
    ctx.write("env.txt", text)
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    pml = "yes" if has_pml() else "NO (columns left out)"
    ctx.note(f"env: torch {torch.__version__}, triton {tv}, {gpu}, {os.cpu_count()} cores, PML {pml}")
    dev = "cpu" if ctx.dry else "cuda"
    ctx.note(f"env: RLL backends on {dev}: {json.dumps(rll_kernels.available_backends(dev))}")
    ctx.check("device", ctx.dry or torch.cuda.is_available(), gpu)
    return ctx.finish()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=PARTS + HELPERS)
    default_out = os.environ.get("DEVICE_CHECK_DIR") or str(ROOT / "bench" / "results" / "device")
    ap.add_argument("--out", default=default_out, help="the results folder (not the GPU tool's $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes (checks this script)")
    ap.add_argument("--name", default=None, help="(workers) the name of this process's summary and log")
    ap.add_argument("--cases", default="[]", help="(workers) JSON list of the cases to run")
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds: optional steps stop here")
    ap.add_argument("--no-extension", action="store_true", help="do not load rll_kernels._C (warm)")
    args = ap.parse_args(argv)
    if not args.dry_run and os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: unset it for a GPU run (or pass --dry-run)")
        return 2
    from bench.device.context import Ctx

    ctx = Ctx(args.name or args.part, Path(args.out), args.dry_run, deadline=args.deadline)
    if args.part == "summary":
        from bench.device import summary

        return summary.run(ctx)
    return run_part(ctx, args.part, json.loads(args.cases))


def run_part(ctx, part: str, cases: list) -> int:
    from bench.device import parity, roofline, sanitize, sync, tests, timing

    table = {
        "env": env_part,
        "tests": tests.run,
        "parity": parity.run,
        "warm": parity.warm,
        "parity-cases": lambda c: parity.run_cases(c, cases),
        "goal": timing.goal,
        "sync": sync.run,
        "sanitize": sanitize.run,
        "sanitize-case": sanitize.run_case,
        "timings": timing.timings,
        "roofline": roofline.run,
    }
    try:
        return table[part](ctx)
    except Exception as e:  # the part's own failure: recorded, so the summary says what happened
        import traceback

        traceback.print_exc()
        ctx.check(f"{part} ran", False, f"{type(e).__name__}: {str(e)[:160]}")
        return ctx.finish()


if __name__ == "__main__":
    sys.exit(main())
