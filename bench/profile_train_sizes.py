"""Where the time of the fused RLL goes at training batch sizes: torch.profiler, grouped by component.

    python bench/profile_train_sizes.py [--shapes 256x512,64x512] [--iters 200] [--semantics paper,pml]

fp32, forward + backward of ``RLLFused`` (2 threads unless ``--threads``, K = 4, clustered data of
bench_train_sizes), ``--iters`` calls after a warm-up. Each op's self CPU time (the thread that
calls it; the kernels' parallel regions are inside their ops) is put in one component:
- GEMM: aten::mm / addmm / addmm_ / bmm (the tile GEMMs the C++ kernels call, and any other);
- kernel: the self time of the rll_kernels ops and of their autograd-key range, which holds the C++
  kernel's own work (masks, exp, online softmax, reductions, set-up; its GEMMs are GEMM);
- normalisation: ops named norm, clamp, div, expand: F.normalize forward and backward when the
  normalisation ran in PyTorch; since the op normalises its rows itself, the mean's div and its
  backward's expand;
- other ATen: everything else that is an ATen op (copies, casts, fills, sums);
- Python + autograd: the wall time per call minus the ops' self times (the Python wrapper, the
  checks, the autograd engine and the custom op's dispatch).
Also prints the floor per shape: the N x D x N GEMMs the fused step runs on this data
(bench_train_sizes.fused_gemms: the Gram tiles, of the unordered tile pairs only in the "pml"
forward and backward, plus the coefficient product where it is dense) at the torch.mm rate of that
GEMM timed here. The profiler's own cost per op call makes
every wall time here larger than bench_train_sizes' (use this for the split, that for the times).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from bench_train_sizes import MARGIN, TN, fused_gemms, fwd_bwd, make_batch, nontrivial_shares
from torch.profiler import ProfilerActivity, profile

import rll_kernels

GEMM = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::mm_out")
NORMALISATION = ("norm", "clamp", "div", "expand", "Norm", "Div", "Clamp", "Expand")


def component(name: str) -> str:
    if name.startswith("GeneratedBackwardFor_rll_kernels"):
        # the op's autograd-key range: it holds the C++ kernel's own time (the dispatcher records one
        # range per op call), its backward node the Python backward of ops/rll.py
        return "Python + autograd" if name.endswith("Backward") else "kernel"
    if name.startswith("autograd::"):
        return "Python + autograd"  # the engine's own time around each backward node
    if name in GEMM:
        return "GEMM"
    if name.startswith("rll_kernels::"):
        return "kernel"
    if any(tag in name for tag in NORMALISATION):
        return "normalisation"
    if name.startswith("aten::") or "Backward" in name:
        return "other ATen"
    return "Python + autograd"


def gemm_rate(n: int, d: int, reps: int = 50) -> float:
    """FLOP/s of torch.mm on the N x D x N Gram GEMM (median of reps)."""
    a, b, out = torch.randn(n, d), torch.randn(n, d), torch.empty(n, n)
    times = []
    for _ in range(reps + 5):
        t = time.perf_counter()
        torch.mm(a, b.t(), out=out)
        times.append(time.perf_counter() - t)
    return 2.0 * n * n * d / sorted(times[5:])[len(times[5:]) // 2]


def profile_shape(n: int, d: int, semantics: str, iters: int) -> dict:
    """ms per call of each component, the wall time per call and the floor."""
    emb, labels = make_batch(n, d, "clustered")
    run = fwd_bwd(rll_kernels.RLLFused(margin=MARGIN, Tn=TN, semantics=semantics), emb, labels)
    for _ in range(20):
        run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(iters):
            run()
        wall = (time.perf_counter() - t) / iters
    parts = defaultdict(float)
    for ev in prof.key_averages():
        parts[component(ev.key)] += ev.self_cpu_time_total / 1e3 / iters  # ms per call
    ops = sum(v for k, v in parts.items() if k != "Python + autograd")
    parts["Python + autograd"] += max(wall * 1e3 - ops - parts["Python + autograd"], 0.0)
    flops = 2.0 * fused_gemms(semantics, nontrivial_shares(emb, labels)[0], n, d) * n * n * d
    return {"wall": wall * 1e3, "parts": dict(parts), "floor": flops / gemm_rate(n, d) * 1e3, "prof": prof}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="256x512,64x512")
    ap.add_argument("--semantics", default="paper,pml")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=0, help="also print the profiler's top ops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = ["GEMM", "kernel", "normalisation", "other ATen", "Python + autograd"]
    print("| N | D | semantics | wall ms/call | " + " | ".join(names) + " | floor ms |")
    print("|---:|---:|---|---:|" + "---:|" * len(names) + "---:|")
    for shape in args.shapes.split(","):
        n, d = map(int, shape.split("x"))
        for semantics in args.semantics.split(","):
            r = profile_shape(n, d, semantics, args.iters)
            cells = " | ".join(f"{r['parts'].get(k, 0.0):.3f}" for k in names)
            print(f"| {n} | {d} | {semantics} | {r['wall']:.3f} | {cells} | {r['floor']:.3f} |", flush=True)
            if args.top:
                print(r["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
