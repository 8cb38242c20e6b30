"""One memory bank across ranks: CrossBatchMemory(distributed=True) vs one process on the global batch.

W gloo processes on this machine, each with N rows per step and ``--threads`` threads, against a
full memory of M rows (D wide, float32, CPU); forward + backward per step, the memory enqueued
as in training. The baseline is one process running CrossBatchMemory on the same global batch
(W x N rows) against the same memory with W x ``--threads`` threads, i.e. the same cores. Both
are timed interleaved in one run (a distributed step on every rank, then the baseline step on
rank 0 while the others wait at a barrier), medians over ``--reps`` steps after one warm-up; the
distributed step's time is the slowest rank's. Peak memory: the growth of rank 0's peak RSS
(VmHWM, reset through /proc/self/clear_refs) over one step, next to the sizes it is made of.

    python bench/bench_xbm_distributed.py                   # W=2, N=256, M=65536, D=128 and 512
    python bench/bench_xbm_distributed.py --d 128 --reps 3  # shorter
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rss import current_bytes, peak_bytes, reset_peak

from rll_kernels import CrossBatchMemory, RLLFused

N_CLASSES = 1000  # labels of the batch and the memory: about N/1000 positives per query in a batch


def full_memory(d: int, m: int, semantics: str, distributed: bool) -> CrossBatchMemory:
    """A CrossBatchMemory whose M rows are filled (the same random rows on every rank)."""
    gen = torch.Generator().manual_seed(1)
    xbm = CrossBatchMemory(RLLFused(semantics=semantics), d, m, distributed=distributed)
    with torch.no_grad():
        xbm.embedding_memory.copy_(torch.randn(m, d, generator=gen))
        xbm.label_memory.copy_(torch.randint(0, N_CLASSES, (m,), generator=gen))
        xbm.index_memory.copy_(torch.arange(m))
        xbm.num_filled.fill_(m)
    return xbm


def global_batch(step: int, rows: int, d: int):
    gen = torch.Generator().manual_seed(100 + step)
    e = torch.randn(rows, d, generator=gen)
    return (
        e,
        torch.randint(0, N_CLASSES, (rows,), generator=gen),
        torch.randint(0, 10**6, (rows,), generator=gen),
    )


def timed_step(xbm, e, y, idx) -> float:
    e = e.clone().requires_grad_()
    t0 = time.perf_counter()
    xbm(e, y, indices=idx).backward()
    return time.perf_counter() - t0


def peak_growth(fn) -> int:
    base = current_bytes()
    if not reset_peak():
        return -1
    fn()
    return peak_bytes() - base


def run_config(rank, world, args, d, semantics) -> dict:
    n = args.n
    xbm = full_memory(d, args.memory, semantics, True)
    single = full_memory(d, args.memory, semantics, False) if rank == 0 else None
    local = slice(rank * n, (rank + 1) * n)
    dist_s, base_s = [], []
    for step in range(args.reps + 1):
        e, y, idx = global_batch(step, world * n, d)
        dist.barrier()
        torch.set_num_threads(args.threads)
        elapsed = torch.tensor([timed_step(xbm, e[local], y[local], idx[local])], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if rank == 0:
            torch.set_num_threads(world * args.threads)
            b = timed_step(single, e, y, idx)
        dist.barrier()
        if step:  # the first step warms up
            dist_s.append(float(elapsed))
            if rank == 0:
                base_s.append(b)
    e, y, idx = global_batch(10**4, world * n, d)
    torch.set_num_threads(args.threads)
    dist_peak = peak_growth(lambda: timed_step(xbm, e[local], y[local], idx[local]))
    dist.barrier()
    base_peak = -1
    if rank == 0:
        torch.set_num_threads(world * args.threads)
        base_peak = peak_growth(lambda: timed_step(single, e, y, idx))
    dist.barrier()
    return dict(
        d=d, semantics=semantics, dist_s=dist_s, base_s=base_s, dist_peak=dist_peak, base_peak=base_peak
    )


def worker(rank, world, args, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(out_dir, "store"),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=1800),
    )
    try:
        results = [run_config(rank, world, args, d, sem) for d in args.d for sem in args.semantics]
        if rank == 0:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def table(results, args) -> str:
    mib = 2.0**20
    w, n, m = args.world, args.n, args.memory
    lines = [
        f"W={w} gloo processes x {args.threads} thread(s), N={n} rows per rank, M={m} memory rows, float32, "
        f"forward + backward, medians of {args.reps} steps; baseline: one process, {w * args.threads} "
        f"threads, the global batch of {w * n} rows",
        "",
        "| D | semantics | distributed step | one process | distributed / one process "
        "| peak RSS growth, rank 0 | one process | (n+M) x D x 4 B | n_r x (n+M) x 4 B |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ds, bs = statistics.median(r["dist_s"]), statistics.median(r["base_s"])
        gallery = (w * n + m) * r["d"] * 4 / mib
        matrix = n * (w * n + m) * 4 / mib
        lines.append(
            f"| {r['d']} | {r['semantics']} | {ds * 1e3:.0f} ms | {bs * 1e3:.0f} ms | {ds / bs:.2f} "
            f"| {max(r['dist_peak'], 0) / mib:.0f} MiB | {max(r['base_peak'], 0) / mib:.0f} MiB "
            f"| {gallery:.0f} MiB | {matrix:.0f} MiB |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n", type=int, default=256, help="rows per rank and step")
    ap.add_argument("--memory", type=int, default=65536)
    ap.add_argument("--d", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--semantics", nargs="+", default=["paper", "pml"], choices=["paper", "pml"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="threads per rank")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(worker, args=(args.world, args, out_dir), nprocs=args.world, start_method="spawn")
        with open(os.path.join(out_dir, "results.json")) as f:
            results = json.load(f)
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}, {time.perf_counter() - t0:.0f} s"
    )
    print(table(results, args))


if __name__ == "__main__":
    main()
