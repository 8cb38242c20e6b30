"""SoftTriple benchmark: fused C++ kernel vs PML 2.9.0 SoftTripleLoss (and the dense reference).

Speed: forward+backward wall time, all providers interleaved in one process on the same inputs,
median over --reps rounds. Memory: one subprocess per provider; the peak RSS growth of one
forward+backward (after one warm-up step) over the RSS measured just before it. The peak is
the process's VmHWM, reset (/proc/self/clear_refs) just before the step (ru_maxrss is not usable:
Linux carries the parent's high-water mark across fork+exec).

    python bench/bench_softtriple.py --n 256 --c 11318 --k 10 --d 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROVIDERS = ("pml", "fused", "reference")


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def make(provider: str, a):
    import torch

    torch.manual_seed(0)
    e = torch.randn(a.n, a.d, requires_grad=True)
    y = torch.randint(0, a.c, (a.n,))
    if provider == "pml":
        from pytorch_metric_learning.losses import SoftTripleLoss

        mod = SoftTripleLoss(a.c, a.d, centers_per_class=a.k)
    elif provider == "fused":
        from rll_kernels import SoftTripleFused

        mod = SoftTripleFused(a.c, a.d, centers_per_class=a.k, tau=a.tau, backend="cpp")
    else:
        from rll_kernels import SoftTripleFused

        mod = SoftTripleFused(a.c, a.d, centers_per_class=a.k, tau=a.tau, backend="reference")
    mod.fc.grad = torch.zeros_like(mod.fc)

    def step():
        e.grad = None
        loss = mod(e, y)
        loss.backward()
        return loss

    return step


def memory_child(provider: str, a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    step = make(provider, a)
    step()  # warm-up: one-time costs (code pages, thread pools, MKL buffers) are not the loss's memory
    base = _rss_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    step()
    peak = _hwm_kib()
    print(json.dumps({"provider": provider, "growth_mib": max(0, peak - base) / 1024}))


def op_ratios(a) -> None:
    """The C++ ops alone against one torch.mm of the same size (GEMM units), interleaved medians."""
    import torch
    import torch.nn.functional as F

    import rll_kernels  # noqa: F401  (loads the ops)

    torch.manual_seed(0)
    w = torch.empty(a.d, a.c * a.k)
    torch.nn.init.kaiming_uniform_(w, a=5**0.5)
    x = F.normalize(torch.randn(a.n, a.d), dim=1)
    y = torch.randint(0, a.c, (a.n,))
    g = torch.full((a.n,), 1.0 / a.n)
    ops = torch.ops.rll_kernels
    _, lse, z, nrm = ops.softtriple_fwd(x, y, w, a.k, 20.0, 0.1, 0.01, True)
    fns = {
        "torch.mm(x, W)": lambda: torch.mm(x, w),
        "softtriple_fwd": lambda: ops.softtriple_fwd(x, y, w, a.k, 20.0, 0.1, 0.01, True),
        "softtriple_bwd": lambda: ops.softtriple_bwd(
            g, x, y, w, lse, z, nrm, a.k, 20.0, 0.1, 0.01, True, True, True
        ),
    }
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(a.reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["torch.mm(x, W)"])
    for k, v in times.items():
        print(f"{k:<16} {1e3 * statistics.median(v):>9.1f} ms  {statistics.median(v) / base:.2f}x torch.mm")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--c", type=int, default=11318)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--tau", type=float, default=0.0, help="fused regulariser weight (PML's default is off)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--providers", default="pml,fused")
    p.add_argument("--ops", action="store_true", help="op-level times in units of one torch.mm")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        memory_child(a.memory_child, a)
        return
    import torch

    if a.ops:
        torch.set_num_threads(a.threads)
        op_ratios(a)
        return

    torch.set_num_threads(a.threads)
    provs = a.providers.split(",")
    steps = {pv: make(pv, a) for pv in provs}
    for pv in provs:  # warm-up
        steps[pv]()
    times = {pv: [] for pv in provs}
    for _ in range(a.reps):
        for pv in provs:
            t0 = time.perf_counter()
            steps[pv]()
            times[pv].append(time.perf_counter() - t0)
    del steps
    mem = {}
    for pv in provs:
        opts = (("n", a.n), ("c", a.c), ("k", a.k), ("d", a.d), ("tau", a.tau), ("threads", a.threads))
        cmd = [sys.executable, __file__, "--memory-child", pv] + [f"--{k}={v}" for k, v in opts]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        mem[pv] = json.loads(out)["growth_mib"]
    print(f"N={a.n} C={a.c} K={a.k} D={a.d} float32, {a.threads} threads, fwd+bwd, median of {a.reps}")
    print(f"{'provider':<10} {'median ms':>10} {'min ms':>8} {'peak RSS growth MiB':>20}")
    for pv in provs:
        med, best = 1e3 * statistics.median(times[pv]), 1e3 * min(times[pv])
        print(f"{pv:<10} {med:>10.1f} {best:>8.1f} {mem[pv]:>20.1f}")
    if "pml" in provs and "fused" in provs:
        sp = statistics.median(times["pml"]) / statistics.median(times["fused"])
        paired = statistics.median(p / f for p, f in zip(times["pml"], times["fused"]))
        print(
            f"speed-up fused vs pml: {sp:.2f}x (ratio of medians), {paired:.2f}x (median of per-round "
            f"ratios); memory growth fused/pml: {mem['fused'] / mem['pml']:.3f}"
        )


if __name__ == "__main__":
    main()
