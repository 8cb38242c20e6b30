"""Fused SoftTriple and OSM at a training batch size against torch.compile of the dense reference.

``python bench/bench_siblings_small_n.py [--n 256] [--d 512] [--reps 30]``: fp32, forward + backward,
K = 4 rows per class (C = N / 4 classes; SoftTriple with 10 centers per class and its regulariser,
OSM with class-aware attention); per round each provider runs once, in turn, and the medians over
the rounds are reported with the ratio compile / fused (> 1: fused is faster). ``--pytorch-normalize``
adds the fused op fed by ``F.normalize`` in PyTorch (the op's own normalisation off), to measure the
normalisation inside the op against PyTorch's in one process. Run it under two checkouts' venvs to
compare them: the ratio is measured against the same compiled reference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import rll_kernels
from rll_kernels import reference


def _pytorch_normalized(n: int, centers: torch.Tensor, att: torch.Tensor):
    """loss name -> the fused op on rows normalised by F.normalize (the op's normalisation off)."""
    from rll_kernels._backends import fused_op
    from rll_kernels.ops.softtriple import sparse_centers_raw

    def softtriple(e, y):
        rows = fused_op("softtriple", "cpp")(F.normalize(e, dim=1), y, centers, 10, 20.0, 0.1, 0.01, False)[0]
        return rows.mean() + 0.2 * sparse_centers_raw(centers, 10)

    def osm(e, y):
        z = F.normalize(e, dim=1)
        return fused_op("osm", "cpp")(z, y, att, 1.2, 0.8, 0.5, False, True)[0]

    return {"softtriple": softtriple, "osm": osm}


def _losses(n: int, d: int, pytorch_normalize: bool):
    """loss name -> providers: name -> callable of (embeddings, labels)."""
    c = n // 4
    centers = torch.nn.Parameter(torch.empty(d, c * 10))
    torch.nn.init.kaiming_uniform_(centers, a=5**0.5)
    att = torch.rand(n).clamp_min(0.05)
    out = {
        "softtriple": {
            "fused": lambda e, y: rll_kernels.soft_triple_loss(e, y, centers, 10),
            "compile(reference)": torch.compile(lambda e, y: reference.soft_triple_loss(e, y, centers, 10)),
        },
        "osm": {
            "fused": lambda e, y: rll_kernels.weighted_contrastive_loss(e, y, att),
            "compile(reference)": torch.compile(lambda e, y: reference.weighted_contrastive_loss(e, y, att)),
        },
    }
    if pytorch_normalize:
        for name, fn in _pytorch_normalized(n, centers, att).items():
            out[name]["F.normalize + op"] = fn
    return out


def _step(fn, emb: torch.Tensor, labels: torch.Tensor) -> float:
    e = emb.detach().requires_grad_()
    t0 = time.perf_counter()
    fn(e, labels).backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--pytorch-normalize", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    emb = torch.randn(args.n, args.d)
    labels = torch.arange(args.n) // 4
    for name, providers in _losses(args.n, args.d, args.pytorch_normalize).items():
        for fn in providers.values():  # warm-up (compilation)
            for _ in range(3):
                _step(fn, emb, labels)
        times = {k: [] for k in providers}
        for _ in range(args.reps):
            for k, fn in providers.items():
                times[k].append(_step(fn, emb, labels))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        cells = ", ".join(f"{k} {v:.3f} ms" for k, v in med.items())
        ratio = med["compile(reference)"] / med["fused"]
        print(f"{name} N={args.n} D={args.d}: {cells}; ratio compile/fused {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
