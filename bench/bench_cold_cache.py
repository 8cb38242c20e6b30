"""What a cold cache costs the fused RLL step at training batch sizes.

    python bench/bench_cold_cache.py [--shapes 256x512,512x512] [--semantics pml,paper] [--reps 80]

fp32, forward + backward of ``RLLFused`` (2 threads, K = 4, the clustered data of bench_train_sizes).
The step alone (``hot``: it follows itself, its data and code stay in the caches), then interleaved
with a step that evicts the caches: a parallel fill of 1, 4, 16 or 64 MiB (L2 is 1-2 MiB per core
and L3 32 MiB on the machines of bench/RESULTS.md), or one PML 2.9.0 ``RankedListLoss`` step on the
same batch, as in bench_train_sizes' grid. Medians of shuffled round-robin rounds
(bench_rll_targets.interleaved); only the fused step's time is printed, in ms.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from bench_rll_targets import interleaved
from bench_train_sizes import MARGIN, TN, fwd_bwd, make_batch

import rll_kernels

EVICT_MIB = (1, 4, 16, 64)


def evict(mib: int):
    """A step that writes mib MiB (every thread of the pool takes a share)."""
    buf = torch.empty(mib << 20, dtype=torch.uint8)
    return lambda: buf.fill_(1)


def cold_row(n: int, d: int, semantics: str, reps: int, pml_loss) -> dict:
    emb, labels = make_batch(n, d, "clustered")
    fused = fwd_bwd(rll_kernels.RLLFused(margin=MARGIN, Tn=TN, semantics=semantics), emb, labels)
    row = {"hot": interleaved({"fused": fused}, reps)["fused"]}
    for mib in EVICT_MIB:
        row[f"after {mib} MiB"] = interleaved({"fused": fused, "evict": evict(mib)}, reps)["fused"]
    if pml_loss is not None and semantics == "pml":
        row["after PML"] = interleaved({"fused": fused, "pml": fwd_bwd(pml_loss, emb, labels)}, reps)["fused"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="256x512,512x512")
    ap.add_argument("--semantics", default="pml,paper")
    ap.add_argument("--reps", type=int, default=80)
    a = ap.parse_args()
    torch.set_num_threads(2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pytorch_metric_learning.losses import RankedListLoss

        pml_loss = RankedListLoss(margin=MARGIN, Tn=TN)
    except ImportError:
        pml_loss = None
    for shape in a.shapes.split(","):
        n, d = map(int, shape.split("x"))
        for semantics in a.semantics.split(","):
            row = cold_row(n, d, semantics, a.reps, pml_loss)
            cells = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in row.items())
            print(f"{n} x {d} {semantics}: {cells}", flush=True)


if __name__ == "__main__":
    main()
