"""`make bench`: the fused Ranked List Loss against the baselines a user would otherwise run.

For every case: one child process times all providers interleaved, then one child process per
provider measures its peak memory (so peaks are isolated). A provider whose predicted memory
exceeds the budget (default 75% of RAM, or of GPU memory) is reported as "OOM (needs ~X GiB)"
instead of being run. Results: ``bench/results/rll_<timestamp>.csv`` (+ ``latest.csv``),
``latest.md`` (the table printed at the end) and ``rll_{time,memory}_<semantics>.png``.

Children are forked from a ``forkserver`` that imported torch, rll_kernels and PML once, so a
child starts in milliseconds and never inherits a used allocator or thread pool.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench import measure  # noqa: E402
from bench.cases import GRIDS, Case, floor_flops, predicted_bytes  # noqa: E402
from bench.providers import Provider, all_providers  # noqa: E402
from bench.report import Result, write_csv, write_table  # noqa: E402

GiB = 1024.0**3
MIN_EXTRAPOLATE_S = 2.0
CPU_SECONDS = [0.0]  # CPU time of all children (user + system), reported with the wall time


def run_child(ctx, fn_name: str, args: tuple, timeout: float) -> dict:
    """Run ``measure.<fn_name>(*args)`` in a fresh child process; a crash or timeout becomes a status."""
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=measure.child_main, args=(child, fn_name, args))
    proc.start()
    child.close()
    result: Optional[dict] = None
    if parent.poll(timeout):
        try:
            result = parent.recv()
        except EOFError:
            result = None
    proc.join(5 if result is not None else 0.1)
    if result is not None:
        CPU_SECONDS[0] += result.pop("cpu_s", 0.0)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return result or {"status": f"timeout after {timeout:.0f} s"}
    if result is None:
        code = proc.exitcode
        why = "killed (out of memory?)" if code is not None and code < 0 else f"exit code {code}"
        return {"status": f"crashed: {why}"}
    return result


def memory_budget(device: str, frac: float) -> float:
    """Bytes a provider may use: ``frac`` of RAM (CPU) or of the GPU's memory."""
    if device.startswith("cuda"):
        return frac * torch.cuda.get_device_properties(torch.device(device)).total_memory
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return frac * 1024.0 * int(line.split()[1])
    return frac * 16 * GiB


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclasses.dataclass
class Plan:
    """What to run for one case: timed providers, memory providers, pre-decided statuses."""

    case: Case
    run: list[str]
    status: dict[str, str]
    reuse: dict[str, Case]  # semantics-free provider -> the case whose measurement it reuses


def plan_cases(cases: list[Case], providers: list[Provider], budget: float) -> list[Plan]:
    """Decide per case which providers run, which are skipped (and why), which reuse a result."""
    plans: list[Plan] = []
    measured: dict[tuple, Case] = {}
    for case in cases:
        run, status, reuse = [], {}, {}
        for p in providers:
            if p.status is not None:
                status[p.name] = p.status
                continue
            need = predicted_bytes(case, p.family)
            if need > budget:
                status[p.name] = f"OOM (needs ~{need / GiB:.1f} GiB)"
                continue
            key = (p.name, case.N, case.M, case.D, case.dtype)
            if p.semantics_free and key in measured:
                reuse[p.name] = measured[key]
                continue
            measured[key] = case
            run.append(p.name)
        plans.append(Plan(case, run, status, reuse))
    return plans


def series(case: Case) -> tuple:
    """Cases that differ only in size (N or M) form a series, for extrapolating times."""
    return case.kind, case.D, case.dtype, case.semantics


def time_alone(ctx, case: Case, names: list[str], cfg: measure.Config, timeout: float) -> dict:
    """Time each provider in a child of its own (not interleaved): the fallback after a crash."""
    merged: dict = {"providers": {}}
    for name in names:
        r = run_child(ctx, "time_case", (case, [name], cfg), timeout)
        merged["providers"][name] = r.get("providers", {}).get(name, {"status": r.get("status", "not run")})
        if "gemm" in r and "gemm" not in merged:
            merged["gemm"], merged["gemm_flops"] = r["gemm"], r["gemm_flops"]
    return merged


def bench(
    cases: list[Case],
    providers: list[Provider],
    cfg: measure.Config,
    budget: float,
    memory: bool = True,
    timeout: float = 600.0,
    progress: Callable[..., Any] = tqdm,
) -> list[Result]:
    """Measure every case; returns one :class:`Result` per (case, provider) plus the GEMM floor."""
    ctx = mp.get_context("forkserver")
    # torch._inductor.compile_fx: inductor's own imports take seconds; pay them once, in the server
    # (a module that does not import, pykeops when absent, is skipped silently)
    ctx.set_forkserver_preload(
        [
            "torch",
            "rll_kernels",
            "pytorch_metric_learning.losses",
            "torch._inductor.compile_fx",
            "pykeops.torch",
            "bench.measure",
        ]
    )
    plans = plan_cases(cases, providers, budget)
    total = sum(1 + (len(p.run) if memory else 0) for p in plans)
    results: list[Result] = []
    by_key: dict[tuple, Result] = {}
    bar = progress(total=total, desc="bench", unit="task", dynamic_ncols=True)
    costs: dict[tuple, tuple[Case, float]] = {}  # (provider, series) -> (largest case timed, s/call)
    for plan in plans:
        case = plan.case
        for name in list(plan.run):  # drop a provider predicted too slow from a smaller case
            seen = costs.get((name, series(case)))
            # only a call long enough to be dominated by the N x M work is extrapolated
            if seen is not None and seen[1] >= MIN_EXTRAPOLATE_S:
                src, cost = seen
                pred = cost * (case.N * case.cols) / (src.N * src.cols)
                if pred > cfg.max_call_s:
                    plan.run.remove(name)
                    plan.status[name] = f"skipped: ~{pred:.0f} s per call predicted from {src.label}"
                    bar.update(1 if memory else 0)
        bar.set_postfix_str(f"{case.label}: time")
        timed = run_child(ctx, "time_case", (case, plan.run, cfg), timeout) if plan.run else {"providers": {}}
        if "status" in timed and len(plan.run) > 1:
            # one provider crashed the shared child (e.g. out of memory): time each alone instead
            bar.set_postfix_str(f"{case.label}: time, one child per provider ({timed['status']})")
            timed = time_alone(ctx, case, plan.run, cfg, timeout)
        bar.update(1)
        tstats = timed.get("providers", {})
        for name, st in tstats.items():
            if "cost_s" in st:
                costs[(name, series(case))] = (case, st["cost_s"])
        mem: dict[str, dict] = {}
        for name in plan.run:
            if not memory:
                break
            bar.set_postfix_str(f"{case.label}: memory {name}")
            if "status" in tstats.get(name, {"status": timed.get("status", "")}):
                mem[name] = {"status": "not run"}
            else:
                mem[name] = run_child(ctx, "memory_case", (case, name, cfg), timeout)
            bar.update(1)
        for p in providers:
            if p.name in plan.status:
                r = Result(case, p, status=plan.status[p.name])
            elif p.name in plan.reuse:
                src = by_key[(p.name, plan.reuse[p.name])]
                r = dataclasses.replace(src, case=case)
            else:
                t = tstats.get(p.name, {"status": timed.get("status", "not run")})
                m = mem.get(p.name, {})
                r = Result(
                    case,
                    p,
                    times=None if "status" in t else t,
                    status=t.get("status"),
                    mem_bytes=m.get("bytes"),
                    mem_status=m.get("status"),
                )
            r.note = p.note(case)
            by_key[(p.name, case)] = r
            results.append(r)
        if "gemm" in timed:
            rate = timed["gemm_flops"] / timed["gemm"][1]
            floor = [floor_flops(case) * t / timed["gemm_flops"] for t in timed["gemm"]]
            results.append(Result(case, None, times={"full": floor}, gemm_rate=rate))
    bar.close()
    return results


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a two-minute subset of the grid")
    ap.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        default=None,
        help="case grid (default: quick with --quick, else full; tiny = smoke test)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every child (default 2)")
    ap.add_argument("--providers", default="", help="comma-separated subset, e.g. cpp,pml")
    ap.add_argument(
        "--memory-frac",
        type=float,
        default=0.75,
        help="skip a provider predicted to need more than this fraction of RAM/GPU memory",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="timing seconds per provider and case (sets repetitions; default 0.5 quick, 4 full)",
    )
    ap.add_argument("--max-reps", type=int, default=None)
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument(
        "--max-call-s",
        type=float,
        default=30.0,
        help="drop a provider whose forward + full call takes (or is predicted to take) longer",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the per-provider memory children")
    ap.add_argument("--no-keops", action="store_true", help="leave pykeops out even if installed")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before a child is killed")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    # KeOps would print its CUDA probe and every JIT compile in each child, over the progress bar
    os.environ.setdefault("KEOPS_VERBOSE", "0")
    os.environ.setdefault("PYKEOPS_VERBOSE", "0")
    device = torch.device(args.device)
    cases = GRIDS[args.grid or ("quick" if args.quick else "full")]()
    cases.sort(key=lambda c: (not c.in_batch, c.N * c.cols, c.D, c.semantics))  # in-batch first
    providers = all_providers(device, with_keops=not args.no_keops)
    if args.providers:
        keep = set(args.providers.split(","))
        providers = [p for p in providers if p.name in keep]
    cfg = measure.Config(
        device=args.device,
        threads=args.threads,
        budget_s=args.budget_s if args.budget_s is not None else (0.5 if args.quick else 4.0),
        min_reps=args.min_reps,
        max_call_s=args.max_call_s,
        max_reps=args.max_reps if args.max_reps is not None else (10 if args.quick else 25),
    )
    budget = memory_budget(args.device, args.memory_frac)
    print(
        f"rll_kernels bench: {len(cases)} cases x {len(providers)} providers on {args.device}, "
        f"{args.threads} threads, memory budget {budget / GiB:.1f} GiB",
        flush=True,
    )
    results = bench(cases, providers, cfg, budget, memory=not args.no_memory, timeout=args.timeout)

    meta = {
        "device": device_name(args.device),
        "commit": git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = meta["timestamp"].replace(":", "").replace("-", "")
    csv_path = write_csv(results, meta, args.out / f"rll_{stamp}.csv", args.out / "latest.csv")
    wall = time.perf_counter() - t_start
    argv = sys.argv[1:] if argv is None else argv
    command = {(): "make bench", ("--quick",): "make bench QUICK=1"}.get(
        tuple(argv)
    ) or "python bench/run.py " + " ".join(argv)
    table = write_table(
        results,
        meta,
        args.out / "latest.md",
        command=command,
        wall_s=wall,
        threads=args.threads,
        cpu_s=CPU_SECONDS[0],
    )
    try:
        from bench.plot import plot_all

        pngs = plot_all(results, args.out)
    except Exception as e:
        pngs = []
        print(f"plots failed: {type(e).__name__}: {e}", file=sys.stderr)
    print()
    print(table)
    print(
        f"wrote {csv_path.relative_to(ROOT) if csv_path.is_relative_to(ROOT) else csv_path}, "
        f"latest.csv, latest.md" + (f", {len(pngs)} plots" if pngs else "") + f" in {args.out}"
    )
    print(f"total wall time {wall:.0f} s; CPU time of the measuring children {CPU_SECONDS[0]:.0f} s")
    return 0


def device_name(device: str) -> str:
    """A human name of the device: GPU name, or CPU model with the thread count used."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
