"""Fused RLL at a training batch size against torch.compile of the dense reference, interleaved.

``python bench/bench_rll_small_n.py [--n 256] [--d 512] [--reps 30]``: fp32, forward + backward,
in-batch, K = 4 rows per class, both semantics; per round each provider runs once, in turn, and the
medians (and minima, steadier on a shared machine) over the rounds are reported with the ratios
compile / fused (> 1: fused is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rll_kernels
from rll_kernels import reference


def _step(fn, emb, labels):
    e = emb.detach().requires_grad_()
    t0 = time.perf_counter()
    fn(e, labels).backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    emb = torch.randn(args.n, args.d)
    labels = torch.arange(args.n) // 4
    for sem in ("paper", "pml"):
        fused = rll_kernels.RLLFused(semantics=sem)
        compiled = torch.compile(lambda e, y, s=sem: reference.ranked_list_loss(e, y, semantics=s))
        providers = {"fused": fused, "compile(reference)": compiled}
        for fn in providers.values():  # warm-up (compilation)
            for _ in range(3):
                _step(fn, emb, labels)
        times = {k: [] for k in providers}
        for _ in range(args.reps):
            for k, fn in providers.items():
                times[k].append(_step(fn, emb, labels))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        low = {k: min(v) * 1e3 for k, v in times.items()}
        ref = "compile(reference)"
        print(
            f"N={args.n} D={args.d} {sem}: median fused {med['fused']:.3f} ms, {ref} {med[ref]:.3f} ms "
            f"(compile/fused {med[ref] / med['fused']:.2f}x); min fused {low['fused']:.3f} ms, "
            f"{ref} {low[ref]:.3f} ms (compile/fused {low[ref] / low['fused']:.2f}x)"
        )


if __name__ == "__main__":
    main()
