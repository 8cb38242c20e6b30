"""The AVX-512 build of the CPU kernels against the AVX2 build (or one build against another),
fused RLL forward + backward.

    python bench/bench_cpu_capability.py [--rounds 4] [--reps 9] [--threads 2]
    python bench/bench_cpu_capability.py --packages /tmp/before,/tmp/after [--sizes 64,128,256,512]

The build is chosen when the extension loads (RLL_KERNELS_CPU_CAPABILITY, docs/architecture.md
"SIMD builds of the CPU kernels"), so each variant runs in child processes: the rounds alternate
one child per variant (the order flips every round), each timing every case (``--reps`` calls
after two warm-up calls, median), one child at a time. Variants: the AVX2 and the AVX-512 build;
or, with ``--packages``, the rll_kernels package found in each folder (put first on PYTHONPATH, the
child running outside the checkout): a build before and after a kernel change. Cases: N in
``--sizes`` (default 64, 256, 512, 4096) x D in {128, 512} x semantics in {paper, pml}, fp32,
K = 4 per class, clustered data (bench_train_sizes.make_batch). Reported: the median over rounds of
each variant's time and of the per-round ratio first / second variant (above 1: the second is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VAR = "RLL_KERNELS_CPU_CAPABILITY"


def child(cases: list, reps: int, threads: int) -> None:
    """Time every case in this process's build; print {case: seconds} as one JSON line."""
    sys.path.insert(1, HERE)  # bench_train_sizes (the child may run outside the checkout)
    import torch
    from bench_train_sizes import MARGIN, TN, fwd_bwd, make_batch

    import rll_kernels

    torch.set_num_threads(threads)
    out = {
        "build": rll_kernels._extension.cpu_capability()[0],
        "package": os.path.dirname(rll_kernels.__file__),
    }
    for n, d, s in cases:
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


def run_child(variant: dict, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **variant["env"]}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--reps", str(args.reps)]
    cmd += ["--threads", str(args.threads), "--sizes", args.sizes]
    cwd = tempfile.gettempdir() if "PYTHONPATH" in variant["env"] else HERE
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=cwd)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    build, package = res.pop("build"), res.pop("package")
    assert variant.get("build", build) == build and package.startswith(variant.get("package", "")), (
        variant,
        res,
    )
    return res


def variants(packages: str | None) -> list[dict]:
    if not packages:
        return [{"label": b.upper(), "env": {VAR: b}, "build": b} for b in ("avx2", "avx512")]
    dirs = [os.path.abspath(p) for p in packages.split(",")]
    return [{"label": os.path.basename(d), "env": {"PYTHONPATH": d}, "package": d} for d in dirs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="64,256,512,4096")
    ap.add_argument("--packages", help="two folders, each holding an rll_kernels package: compare them")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cases = [(n, d, s) for s in ("paper", "pml") for d in (128, 512) for n in map(int, args.sizes.split(","))]
    if args.child:
        child(cases, args.reps, args.threads)
        return
    vs = variants(args.packages)
    runs = {v["label"]: [] for v in vs}
    for r in range(args.rounds):
        for v in vs if r % 2 == 0 else vs[::-1]:
            runs[v["label"]].append(run_child(v, args))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    a, b = (v["label"] for v in vs)
    print(f"| N | D | semantics | {a} ms | {b} ms | {a} / {b} (median of rounds) |")
    print("|---:|---:|---|---:|---:|---:|")
    for n, d, s in cases:
        key = f"{n},{d},{s}"
        ta, tb = [run[key] for run in runs[a]], [run[key] for run in runs[b]]
        ratio = statistics.median(x / y for x, y in zip(ta, tb))
        ms_a, ms_b = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
        print(f"| {n} | {d} | {s} | {ms_a:.2f} | {ms_b:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
