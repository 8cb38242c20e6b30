"""Peak RSS growth of one fused RLL forward+backward (run in a fresh process per measurement).

    python bench/rll_memory.py --n 32768 --d 256 --semantics paper
prints one JSON line: {"n":..., "d":..., "semantics":..., "growth_mib":..., "seconds":...}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from rss import current_bytes, peak_bytes, reset_peak

import rll_kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--semantics", default="paper")
    ap.add_argument("--backend", default="cpp")
    a = ap.parse_args()
    torch.manual_seed(0)
    emb = torch.randn(a.n, a.d).requires_grad_()
    labels = torch.randperm(a.n) // 4
    # warm-up on a small batch so one-off allocations (thread pools, MKL buffers) are not counted
    rll_kernels.ranked_list_loss(
        torch.randn(64, a.d, requires_grad=True), labels[:64], semantics=a.semantics, backend=a.backend
    ).backward()
    base = current_bytes()
    reset_peak()
    t = time.perf_counter()
    loss = rll_kernels.ranked_list_loss(emb, labels, semantics=a.semantics, backend=a.backend)
    loss.backward()
    dt = time.perf_counter() - t
    growth = peak_bytes() - base
    print(
        json.dumps(
            {
                "n": a.n,
                "d": a.d,
                "semantics": a.semantics,
                "growth_mib": round(growth / 2**20, 1),
                "seconds": round(dt, 3),
                "loss": loss.item(),
                "finite_grad": bool(torch.isfinite(emb.grad).all()),
            }
        )
    )


if __name__ == "__main__":
    main()
