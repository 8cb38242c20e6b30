"""The AVX-512 build of the CPU kernels against the AVX2 build, fused RLL forward + backward.

    python bench/bench_cpu_capability.py [--rounds 4] [--reps 5]

The build is chosen when the extension loads (RLL_KERNELS_CPU_CAPABILITY, docs/architecture.md
"SIMD builds of the CPU kernels"), so each build runs in child processes: the rounds alternate an
AVX2 child and an AVX-512 child (the order flips every round), each timing every case (``--reps``
calls after two warm-up calls, median), one child at a time. Cases: N in {64, 256, 512, 4096} x
D in {128, 512} x semantics in {paper, pml}, fp32, 2 threads (``--threads``), K = 4 per class, clustered data
(bench_train_sizes.make_batch). Reported: the median over rounds of each build's time and of the
per-round ratio AVX2 / AVX-512 (above 1: AVX-512 is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VAR = "RLL_KERNELS_CPU_CAPABILITY"
BUILDS = ("avx2", "avx512")
CASES = [(n, d, s) for s in ("paper", "pml") for d in (128, 512) for n in (64, 256, 512, 4096)]


def child(reps: int, threads: int) -> None:
    """Time every case in this process's build; print {case: seconds} as one JSON line."""
    import torch
    from bench_train_sizes import MARGIN, TN, fwd_bwd, make_batch

    import rll_kernels

    torch.set_num_threads(threads)
    out = {"build": rll_kernels._extension.cpu_capability()[0]}
    for n, d, s in CASES:
        emb, labels = make_batch(n, d, "clustered")
        run = fwd_bwd(rll_kernels.RLLFused(margin=MARGIN, Tn=TN, semantics=s), emb, labels)
        run()
        run()
        times = []
        for _ in range(reps if n < 4096 else max(3, reps // 2)):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        out[f"{n},{d},{s}"] = statistics.median(times)
    print(json.dumps(out))


def run_child(build: str, reps: int, threads: int) -> dict:
    env = {**os.environ, VAR: build, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--reps",
        str(reps),
        "--threads",
        str(threads),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=HERE)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res.pop("build") == build, res
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.reps, args.threads)
        return
    runs = {b: [] for b in BUILDS}
    for r in range(args.rounds):
        for build in BUILDS if r % 2 == 0 else BUILDS[::-1]:
            runs[build].append(run_child(build, args.reps, args.threads))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    lines = [
        "| N | D | semantics | AVX2 ms | AVX-512 ms | AVX2 / AVX-512 (median of rounds) |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for n, d, s in CASES:
        key = f"{n},{d},{s}"
        t2 = [run[key] for run in runs["avx2"]]
        t5 = [run[key] for run in runs["avx512"]]
        ratio = statistics.median(a / b for a, b in zip(t2, t5))
        ms2, ms5 = statistics.median(t2) * 1e3, statistics.median(t5) * 1e3
        lines.append(f"| {n} | {d} | {s} | {ms2:.2f} | {ms5:.2f} | {ratio:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
