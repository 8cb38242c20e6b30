"""The exact PML drop-in against PML's own class and the fused functional call it wraps.

``rll_kernels.pml.RankedListLoss()`` (PML's base class, reducer and bookkeeping around the fused op)
vs PML 2.9.0's ``RankedListLoss`` and vs ``rll_kernels.ranked_list_loss(..., semantics="pml")`` (the
same fused op without the base class), float32, forward + backward, every provider interleaved in
one process on the same inputs, each round in a fresh random order. Reported: the median time of
each provider and the median of the per-round ratios (robust to the machine's load drifting between
rounds). The base-class bookkeeping is the drop-in / functional ratio at N = 256; ``--tiny-n`` also
times both at a size where the kernel costs next to nothing, which gives the bookkeeping per call in
microseconds (less exposed to the load than a ratio of two larger times).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_pml_dropins.py --sizes 256 4096 --d 512
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

MARGIN, TN = 0.4, 10.0  # PML's RankedListLoss has no defaults for these two


def providers(skip_pml_above: int, n: int) -> dict:
    from pytorch_metric_learning.losses import RankedListLoss as PMLRankedListLoss

    import rll_kernels
    from rll_kernels.pml import RankedListLoss

    out = {
        "drop-in": RankedListLoss(MARGIN, TN),
        "functional": lambda e, y: rll_kernels.ranked_list_loss(e, y, MARGIN, TN, semantics="pml"),
    }
    if n <= skip_pml_above:
        out["PML 2.9.0"] = PMLRankedListLoss(MARGIN, TN)
    return out


def step_time(fn, e: torch.Tensor, y: torch.Tensor) -> float:
    e.grad = None
    t0 = time.perf_counter()
    fn(e, y).backward()
    return time.perf_counter() - t0


def bench_size(n: int, d: int, reps: int, warmup: int, skip_pml_above: int) -> dict:
    torch.manual_seed(0)
    e = torch.randn(n, d, requires_grad=True)
    y = torch.randperm(n) // 4  # about 4 samples per class
    fns = providers(skip_pml_above, n)
    for fn in fns.values():
        for _ in range(warmup):
            step_time(fn, e, y)
    times: dict[str, list[float]] = {k: [] for k in fns}
    rng = random.Random(0)
    for _ in range(reps):
        order = list(fns)
        rng.shuffle(order)
        for k in order:
            times[k].append(step_time(fns[k], e, y))
    return times


def report(n: int, d: int, times: dict) -> list[str]:
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    base = times["drop-in"]
    rows = []
    for k, v in times.items():
        ratio = "-" if k == "drop-in" else f"{statistics.median(a / b for a, b in zip(base, v)):.3f}"
        rows.append(f"| N={n} D={d} | {k} | {med[k]:.2f} | {ratio} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--reps", type=int, nargs="+", default=[61, 9], help="rounds per size (last repeats)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny-n", type=int, default=8, help="0: skip the bookkeeping-per-call timing")
    p.add_argument("--tiny-reps", type=int, default=301)
    p.add_argument("--skip-pml-above", type=int, default=1 << 30, help="leave PML out above this N")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, forward + backward")
    print("| case | provider | median ms | median of per-round drop-in / provider |")
    print("|---|---|---|---|")
    for i, n in enumerate(a.sizes):
        reps = a.reps[min(i, len(a.reps) - 1)]
        for row in report(n, a.d, bench_size(n, a.d, reps, a.warmup, a.skip_pml_above)):
            print(row, flush=True)
    if a.tiny_n:
        times = bench_size(a.tiny_n, a.d, a.tiny_reps, a.warmup, 0)
        extra = statistics.median(x - y for x, y in zip(times["drop-in"], times["functional"]))
        print(f"bookkeeping per call at N={a.tiny_n}: median(drop-in - functional) = {extra * 1e6:.0f} us")


if __name__ == "__main__":
    main()
