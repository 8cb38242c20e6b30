"""Where one fused RLL training step's time goes: the ops against the framework around them, and what
a second thread buys (bench/RESULTS.md §19).

    .venv/bin/python bench/probes/step_split.py [--shape 256x512] [--semantics pml] [--rounds 30]

fp32, K = 4, the clustered data of bench_train_sizes. Every comparison alternates its variants round
by round in this one process (rounds of 30 calls, the order flipped every round) and prints medians:

* threads: the module's step (forward + backward) and the forward and backward ops called directly
  (no Python wrapper, no autograd) at 1 and at 2 threads ("pml": the statistics-only forward,
  the backward op, and the forward op with both passes, which the module's mean reduction calls);
  with T1 = S + P and T2 = S + P / 2, 2 T2 - T1 estimates the part that does not run in parallel;
* per call, at 8 rows (next to no pair work): the module's step, the same step with the op called
  directly, the forward alone under no_grad (module and op), the backward through the autograd engine
  (``retain_graph``) against the backward op called directly, and a trivial autograd step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_train_sizes import make_batch
from step_loop import step_us

import rll_kernels

FWD = torch.ops.rll_kernels.rll_fwd.default
BWD = torch.ops.rll_kernels.rll_bwd.default


def alternate(fns: dict, rounds: int, calls: int = 30, threads: dict | None = None) -> dict:
    """Median us per call of each fn, the fns alternating round by round (order flipped each round);
    threads: the thread count each fn runs at (default 2)."""
    threads = threads or {}
    res: dict[str, list[float]] = {k: [] for k in fns}

    def once(k: str, n: int) -> float:
        torch.set_num_threads(threads.get(k, 2))
        return step_us(fns[k], n)

    for k in fns:
        once(k, 50)
    keys = list(fns)
    for r in range(rounds):
        for k in keys if r % 2 == 0 else keys[::-1]:
            res[k].append(once(k, calls))
    torch.set_num_threads(2)
    return {k: statistics.median(v) for k, v in res.items()}


def problem(n: int, d: int, semantics: str):
    """(module, x (leaf), labels, op arguments after the six tensors)."""
    x, y = make_batch(n, d, "clustered", 0)
    mod = rll_kernels.RLLFused(semantics=semantics)
    bias = 1e-5 if semantics == "pml" else 0.0
    hp = (mod.alpha, mod.alpha - mod.margin, mod.Tn, mod.Tp, mod.imbalance, bias, None)
    return mod, x.clone().requires_grad_(True), y, hp


def thread_split(n: int, d: int, semantics: str, rounds: int) -> None:
    mod, x, y, hp = problem(n, d, semantics)
    xd, attached = x.detach(), semantics == "pml"
    _, _, stats, z, norms = FWD(xd, y, None, None, None, None, *hp, True, attached, True)
    g = torch.full((n,), 1.0 / n)

    def step():
        x.grad = None
        mod(x, y).backward()

    # "pml": need_grad=False gives the statistics pass alone, True both passes (the module's mean)
    stats_only = not attached
    parts = {
        "step": step,
        "fwd op": lambda: FWD(xd, y, None, None, None, None, *hp, True, attached, stats_only),
    }
    if attached:
        saved = (stats, z, norms)
        parts["bwd op"] = lambda: BWD(g, xd, y, None, None, None, None, *saved, *hp, True, True, True, False)
        parts["fwd op, both passes"] = lambda: FWD(xd, y, None, None, None, None, *hp, True, True, True)
    for name, fn in parts.items():
        t = alternate({"1": fn, "2": fn}, rounds, threads={"1": 1, "2": 2})
        print(
            f"{n}x{d} {semantics} {name}: 1 thread {t['1']:.0f} us, 2 threads {t['2']:.0f} us, "
            f"speed-up {t['1'] / t['2']:.2f}x, not parallel (2 T2 - T1) {2 * t['2'] - t['1']:.0f} us"
        )


def per_call(d: int, semantics: str, rounds: int) -> None:
    mod, x, y, hp = problem(8, d, semantics)
    attached = semantics == "pml"
    g = torch.full((8,), 1.0 / 8)
    rows = FWD(x, y, None, None, None, None, *hp, True, attached, True)[0]
    _, _, stats, z, norms = FWD(x.detach(), y, None, None, None, None, *hp, True, attached, True)
    leaf = torch.randn(8, d, requires_grad=True)

    def module_step():
        x.grad = None
        mod(x, y).backward()

    def op_step():
        x.grad = None
        FWD(x, y, None, None, None, None, *hp, True, attached, True)[0].mean().backward()

    def module_fwd():
        with torch.no_grad():
            mod(x, y)

    def op_fwd():
        with torch.no_grad():
            FWD(x, y, None, None, None, None, *hp, True, attached, False)

    def trivial_step():
        leaf.grad = None
        (leaf * leaf).sum().backward()

    fns = {
        "module step": module_step,
        "op step (no wrapper)": op_step,
        "module forward, no_grad": module_fwd,
        "op forward, no_grad": op_fwd,
        "backward through the engine": lambda: rows.backward(g, retain_graph=True),
        "trivial autograd step": trivial_step,
    }
    if attached:
        fns["backward op alone"] = lambda: BWD(
            g, x.detach(), y, None, None, None, None, stats, z, norms, *hp, True, True, True, False
        )
    t = alternate(fns, rounds)
    print(f"8x{d} {semantics}, per call: " + ", ".join(f"{k} {v:.0f} us" for k, v in t.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="256x512")
    ap.add_argument("--semantics", default="pml", choices=("pml", "paper"))
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    n, d = map(int, a.shape.split("x"))
    thread_split(n, d, a.semantics, a.rounds)
    per_call(d, a.semantics, a.rounds)


if __name__ == "__main__":
    main()
