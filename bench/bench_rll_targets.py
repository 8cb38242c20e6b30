"""Performance targets of the fused C++ CPU RLL kernel, measured in one process.

    python bench/bench_rll_targets.py [--reps 7] [--skip-memory]

1. N=4096, D=128, both semantics: fused vs PML 2.9.0 vs torch.compile(reference), fwd+bwd,
   interleaved round-robin repetitions, medians.
2. N=4096, D=512: fused time over the floor 4 N^2 D FLOPs at the torch.mm rate measured in the
   same run (same-shape GEMM, preallocated output, interleaved with the fused runs).
3. N=32768, D=256: peak RSS growth of a forward+backward (fresh subprocess per semantics).
Prints a markdown table (and writes it to bench/results/targets_latest.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings

import torch

import rll_kernels
from rll_kernels import reference

HERE = os.path.dirname(os.path.abspath(__file__))


def _fwd_bwd(fn, emb, labels):
    def run():
        e = emb.detach().requires_grad_()
        fn(e, labels).backward()

    return run


def interleaved(fns: dict, reps: int) -> dict:
    for f in fns.values():  # warm-up (compiles torch.compile graphs too)
        f()
        f()
    times = {k: [] for k in fns}
    keys, order = list(fns), random.Random(0)
    for _ in range(reps):
        # a fresh order each round: the call after another provider's (a PML step leaves the caches
        # cold) costs up to ~0.2 ms more at N = 128, and a fixed (or rotated) order would give
        # every provider the same predecessor in every round
        order.shuffle(keys)
        for k in keys:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from pytorch_metric_learning.losses import RankedListLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pml = RankedListLoss(margin=0.4, Tn=10.0)
    lines = ["| case | provider | median fwd+bwd (ms) | ratio |", "|---|---|---|---|"]
    n = 4096
    labels = torch.randperm(n) // 4
    results = {}
    emb = torch.randn(n, 128)
    compiled = {
        s: torch.compile(lambda e, lab, s=s: reference.ranked_list_loss(e, lab, semantics=s))
        for s in ("paper", "pml")
    }
    fns = {"pml2.9": _fwd_bwd(pml, emb, labels)}
    for s in ("paper", "pml"):
        fns[f"fused-{s}"] = _fwd_bwd(
            lambda e, lab, s=s: rll_kernels.ranked_list_loss(e, lab, semantics=s), emb, labels
        )
        fns[f"compile-{s}"] = _fwd_bwd(compiled[s], emb, labels)
    t = interleaved(fns, a.reps)
    results["d128"] = t
    for s in ("paper", "pml"):
        f = t[f"fused-{s}"]
        lines.append(f"| N=4096 D=128 {s} | fused cpp | {f * 1e3:.1f} | - |")
        lines.append(f"| | PML 2.9.0 | {t['pml2.9'] * 1e3:.1f} | PML / fused = {t['pml2.9'] / f:.1f}x |")
        lines.append(
            f"| | torch.compile(reference) | {t[f'compile-{s}'] * 1e3:.1f} | "
            f"compile / fused = {t[f'compile-{s}'] / f:.1f}x |"
        )

    emb = torch.randn(n, 512)
    a_m, b_m, out = torch.randn(n, 512), torch.randn(n, 512), torch.empty(n, n)

    def floor():  # 4 N^2 D FLOPs = two N x N x D GEMMs
        torch.mm(a_m, b_m.t(), out=out)
        torch.mm(a_m, b_m.t(), out=out)

    fns = {"floor": floor}
    for s in ("paper", "pml"):
        fns[f"fused-{s}"] = _fwd_bwd(
            lambda e, lab, s=s: rll_kernels.ranked_list_loss(e, lab, semantics=s), emb, labels
        )
    t = interleaved(fns, a.reps)
    results["d512"] = t
    gflops = 4 * n * n * 512 / t["floor"] / 1e9
    for s in ("paper", "pml"):
        f = t[f"fused-{s}"]
        lines.append(
            f"| N=4096 D=512 {s} | fused cpp | {f * 1e3:.1f} | fused / floor = {f / t['floor']:.2f} "
            f"(floor {t['floor'] * 1e3:.1f} ms at {gflops:.0f} GFLOP/s torch.mm) |"
        )

    if not a.skip_memory:
        for s in ("paper", "pml"):
            out_s = subprocess.run(
                [
                    sys.executable,
                    os.path.join(HERE, "rll_memory.py"),
                    "--n",
                    "32768",
                    "--d",
                    "256",
                    "--semantics",
                    s,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(out_s.strip().splitlines()[-1])
            results[f"mem-{s}"] = r
            lines.append(
                f"| N=32768 D=256 {s} | fused cpp | {r['seconds'] * 1e3:.0f} | peak RSS growth "
                f"{r['growth_mib']:.0f} MiB |"
            )
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "targets_latest.md"), "w") as f:
        f.write(table + "\n")
        f.write("\n```json\n" + json.dumps(results, indent=1, default=str) + "\n```\n")


if __name__ == "__main__":
    main()
