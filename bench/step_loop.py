"""A loop of one fused RLL training step, for `perf record` and for A/Bs that alternate processes.

    python bench/step_loop.py [--shape 256x512] [--semantics pml] [--data clustered] [--iters 150]
    python bench/step_loop.py --gc-ab          # the same step with Python's gc on and off, round by round
    perf record -F 20000 -D 3000 -o step.data python bench/step_loop.py --iters 2000
    perf script -i step.data -F tid,time,ip,sym,dso | python bench/step_loop.py --idle-split

fp32, forward + backward of ``RLLFused`` (2 threads, K = 4, the data of bench_train_sizes), after 30
warm-up steps; prints the mean step in us. ``--idle-split`` reads `perf script` lines of such a run
and prints what the main thread ran while OpenMP's worker sat in libgomp's wait (bench/RESULTS.md §17).
"""

from __future__ import annotations

import argparse
import bisect
import gc
import statistics
import sys
import time
from collections import Counter

import torch
from bench_train_sizes import MARGIN, TN, fwd_bwd, make_batch

import rll_kernels


def step_us(step, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t) / iters * 1e6


def gc_ab(step, rounds: int = 40, iters: int = 25) -> None:
    """Median step with the garbage collector on and off, alternating round by round."""
    res: dict[str, list[float]] = {"on": [], "off": []}
    collections = [0]
    gc.callbacks.append(lambda phase, _info: collections.__setitem__(0, collections[0] + (phase == "start")))
    for _ in range(rounds):
        for k in res:
            gc.enable() if k == "on" else gc.disable()
            res[k].append(step_us(step, iters))
    gc.enable()
    cells = ", ".join(f"gc {k} {statistics.median(v):.1f} us" for k, v in res.items())
    print(cells, f"collections {collections[0]}")


def component(sym: str) -> str:
    """The part of a sample's symbol that the idle split groups by."""
    for key, name in (("libgomp", "OpenMP wait / fork-join"), ("sgemm", "MKL GEMM"), ("libpython", "Python")):
        if key in sym:
            return name
    if "_C.cpython" in sym:
        return "extension"
    if any(k in sym for k in ("libtorch", "libc10")):
        return "ATen, dispatch, autograd"
    return sym.rsplit("(", 1)[-1].rstrip(")").rsplit("/", 1)[-1]


def idle_split(lines, tail_s: float = 0.4) -> None:
    """What the busiest thread ran while the second-busiest waited in libgomp (the exit's tail dropped)."""
    rows = []
    for line in lines:
        p = line.split(maxsplit=3)
        if len(p) == 4:
            rows.append((int(p[0]), float(p[1].rstrip(":")), p[3].rstrip()))
    end = max(t for _, t, _ in rows) - tail_s
    rows = [r for r in rows if r[1] < end]
    main, worker = (tid for tid, _ in Counter(r[0] for r in rows).most_common(2))
    w = [(t, s) for tid, t, s in rows if tid == worker]
    wt = [t for t, _ in w]
    idle, n_main = Counter(), 0
    for tid, t, s in rows:
        if tid == main:
            n_main += 1
            i = bisect.bisect_left(wt, t)
            if i < len(w) and "libgomp" in w[i][1]:
                idle[component(s)] += 1
    print(f"main-thread samples {n_main}; while the worker waits {sum(idle.values())}")
    for name, n in idle.most_common(12):
        print(f"{n:8d}  {n / n_main:6.1%}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="256x512")
    ap.add_argument("--semantics", default="pml")
    ap.add_argument("--data", default="clustered")
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--gc-ab", action="store_true")
    ap.add_argument("--idle-split", action="store_true")
    a = ap.parse_args()
    if a.idle_split:
        idle_split(sys.stdin)
        return
    torch.set_num_threads(2)
    n, d = map(int, a.shape.split("x"))
    emb, labels = make_batch(n, d, a.data)
    step = fwd_bwd(rll_kernels.RLLFused(margin=MARGIN, Tn=TN, semantics=a.semantics), emb, labels)
    step_us(step, 30)
    if a.gc_ab:
        gc_ab(step)
    else:
        print(f"{n} x {d} {a.semantics} {a.data}: step {step_us(step, a.iters):.1f} us")


if __name__ == "__main__":
    main()
