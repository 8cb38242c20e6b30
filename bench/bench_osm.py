"""Benchmark: OSM + CAA weighted contrastive loss, forward + backward (docs/semantics.md §4).

Providers, timed on the same inputs, interleaved round by round in one process (medians):
  fused     rll_kernels.weighted_contrastive_loss (auto backend: cpp on CPU, triton on CUDA)
  reference rll_kernels.reference.weighted_contrastive_loss (dense N x N)
  compiled  torch.compile of the dense reference
  mm        torch.mm(z, z.T) of the same shape: a floor (one Gram GEMM, forward only)

Inputs: N embeddings of a P x K batch (K = 8 per class), float32, random attention in (0.2, 1].
``--data clustered`` (default) puts classes around a shared direction so that ~40% of the negative
pairs fall inside the margin alpha = 1.2 (dense weight tiles); ``--data iid`` uses i.i.d. Gaussian
embeddings, where d ~ sqrt(2) > alpha for almost every negative (sparse weight tiles).

    python bench/bench_osm.py                       # N = 4096, D = 128 and 512
    python bench/bench_osm.py --n 2048 --dims 128 --rounds 3 --no-compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import rll_kernels
from rll_kernels import reference


def make_inputs(n: int, d: int, data: str, device: str, k: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) // k
    if data == "iid":
        x = torch.randn(n, d, generator=g)
    else:
        # class centres near a shared direction: pair distances spread over [0, ~1.6]
        shared = torch.randn(1, d, generator=g)
        centres = torch.randn((n + k - 1) // k, d, generator=g)
        x = 0.8 * F.normalize(shared, dim=1) * d**0.5 + centres[labels] + 0.9 * torch.randn(n, d, generator=g)
    att = 0.2 + 0.8 * torch.rand(n, generator=g)
    return x.to(device), labels.to(device), att.to(device)


def neg_in_margin_fraction(x, labels, alpha=1.2, sample=1024):
    z = F.normalize(x[:sample].double(), dim=1)
    d = torch.cdist(z, z)
    y = labels[:sample]
    neg = y[:, None] != y[None, :]
    return ((d < alpha) & neg).sum().item() / max(neg.sum().item(), 1)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def bench_shape(n: int, d: int, args) -> dict:
    x0, labels, att = make_inputs(n, d, args.data, args.device)

    def fwd_bwd(loss_fn):
        def step():
            x = x0.detach().requires_grad_(True)
            loss = loss_fn(x, labels, att)
            loss.backward()
            return loss

        return step

    ref_fn = lambda x, y, a: reference.weighted_contrastive_loss(x, y, a)  # noqa: E731
    providers = {
        "fused": fwd_bwd(lambda x, y, a: rll_kernels.weighted_contrastive_loss(x, y, a)),
        "reference": fwd_bwd(ref_fn),
    }
    if not args.no_compile:
        providers["compiled"] = fwd_bwd(torch.compile(ref_fn, dynamic=False))
    z = F.normalize(x0, dim=1)
    providers["mm"] = lambda: torch.mm(z, z.t())

    # correctness of what is timed: fused vs reference on these inputs
    xs = [x0.detach().requires_grad_(True) for _ in range(2)]
    lf = rll_kernels.weighted_contrastive_loss(xs[0], labels, att)
    lr = reference.weighted_contrastive_loss(xs[1], labels, att)
    lf.backward()
    lr.backward()
    rel_loss = abs(lf.item() - lr.item()) / abs(lr.item())
    rel_grad = ((xs[0].grad - xs[1].grad).abs().max() / xs[1].grad.abs().max()).item()

    t_first = {}
    for name, fn in providers.items():  # warm-up (and compilation)
        t_first[name] = timed(fn, args.device)
    times = {name: [] for name in providers}
    for _ in range(args.rounds):
        for name, fn in providers.items():
            times[name].append(timed(fn, args.device))
    med = {name: statistics.median(v) for name, v in times.items()}
    return dict(
        n=n,
        d=d,
        med=med,
        first=t_first,
        rel_loss=rel_loss,
        rel_grad=rel_grad,
        frac=neg_in_margin_fraction(x0.cpu(), labels.cpu()),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data", choices=("clustered", "iid"), default="clustered")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    args = p.parse_args(argv)
    print(
        f"# torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
        f"data {args.data}, rounds {args.rounds} (medians, interleaved)"
    )
    print(
        "| N | D | neg. in margin | fused ms | reference ms | compiled ms | mm ms | ref / fused "
        "| compiled / fused | fused / mm | rel. err loss, grad |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d in args.dims:
        r = bench_shape(args.n, d, args)
        m = r["med"]
        comp = m.get("compiled")
        comp_ms = "-" if comp is None else f"{1e3 * comp:.1f}"
        comp_x = "-" if comp is None else f"{comp / m['fused']:.1f}x"
        print(
            f"| {r['n']} | {d} | {r['frac']:.0%} | {1e3 * m['fused']:.1f} | {1e3 * m['reference']:.1f} | "
            f"{comp_ms} | {1e3 * m['mm']:.1f} | {m['reference'] / m['fused']:.1f}x | {comp_x} | "
            f"{m['fused'] / m['mm']:.1f} | {r['rel_loss']:.1e}, {r['rel_grad']:.1e} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
