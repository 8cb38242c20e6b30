"""Queries against a memory bank: fused RLL vs the dense and the chunked reference, and the GEMM floor.

Forward + backward of N queries against an M-row bank (the bank a constant, as in XBM), D wide,
float32 on CPU. Providers are timed interleaved in one process (medians over ``--reps`` rounds,
after one warm-up each) so that load on a shared machine hits them alike; peak memory is the
growth of the peak RSS over one call, each provider in a fresh subprocess (VmHWM reset through
/proc/self/clear_refs), since freed memory stays resident and would hide later providers' peaks.

    python bench/bench_bank.py                       # N=256, M=131072, D=512
    python bench/bench_bank.py --m 32768 --out -     # smaller, print the table only

The GEMM floor is the two GEMMs any exact method needs, Q K^T (N x M) and then (N x M) K, i.e.
4 N M D flops; "x floor" is each provider's median time over the floor's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import rll_kernels
from rll_kernels import reference


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def peak_growth(fn) -> tuple[int, bool]:
    """Growth of the peak RSS over one call of ``fn`` (bytes) and whether the peak could be reset."""
    base = status("VmRSS:")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    fn()
    return status("VmHWM:") - base, reset


def make_providers(q, ql, bank, bl, semantics: str, chunk: int):
    n = q.shape[0]

    def fused():
        qq = q.detach().requires_grad_()
        rll_kernels.ranked_list_loss(qq, ql, semantics=semantics, ref_emb=bank, ref_labels=bl).backward()
        return qq.grad

    def dense():
        qq = q.detach().requires_grad_()
        reference.ranked_list_loss(qq, ql, semantics=semantics, ref_emb=bank, ref_labels=bl).backward()
        return qq.grad

    def chunked():
        # the dense reference on query chunks against the full bank; exact because a query's loss
        # and (with a constant bank) its gradient depend on that query alone
        grads = []
        for s in range(0, n, chunk):
            qq = q[s : s + chunk].detach().requires_grad_()
            rows = reference.ranked_list_loss(
                qq, ql[s : s + chunk], semantics=semantics, ref_emb=bank, ref_labels=bl, reduction="sum"
            )
            (rows / n).backward()
            grads.append(qq.grad)
        return torch.cat(grads)

    def kernel_only():
        # diagnostic: the fused op alone on a pre-normalised contiguous bank (normalize=False), no
        # input checks (the difference to "fused" is the op's O(M D) normalisation of the bank)
        qq = q.detach().requires_grad_()
        z = torch.nn.functional.normalize(qq, dim=1)
        hp = (alpha, alpha - 0.4, 10.0, 0.0, 0.5, 0.0, None, False, False)
        rows, gq = torch.ops.rll_kernels.rll_fwd(z, ql, None, bank_n, bl, None, *hp, True)[:2]
        z.backward(gq / n)
        return qq.grad

    def floor():
        s = q @ bank.t()
        return s @ bank

    alpha = 1.0 + 0.4 / 2
    bank_n = torch.nn.functional.normalize(bank, dim=1).contiguous()
    provs = {"fused": fused, "fused kernel alone (diagnostic)": kernel_only}
    if semantics != "paper":
        del provs["fused kernel alone (diagnostic)"]  # the diagnostic covers the one-pass "paper" path
    return {
        **provs,
        "dense reference": dense,
        f"chunked reference ({chunk} rows)": chunked,
        "GEMM floor (2 GEMMs)": floor,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--m", type=int, default=131072)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--semantics", default="paper", choices=("paper", "pml"))
    ap.add_argument("--mem-only", default=None, help=argparse.SUPPRESS)  # child: peak growth of one provider
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "sections", "bank.md"),
        help="markdown file to append the table to, or - for stdout only",
    )
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    n, m, d = args.n, args.m, args.d
    bank = torch.randn(m, d)
    bl = torch.randint(0, 1000, (m,))
    q = torch.randn(n, d)
    ql = bl[torch.randint(0, m, (n,))]
    provs = make_providers(q, ql, bank, bl, args.semantics, args.chunk)
    if args.mem_only is not None:
        print(json.dumps(peak_growth(provs[args.mem_only])))
        return 0

    # agreement (a wrong fast kernel is no result): every provider's query gradient vs the chunked reference
    g_c = provs[f"chunked reference ({args.chunk} rows)"]()
    agree = max(
        ((fn() - g_c).abs().max() / g_c.abs().max()).item()
        for name, fn in provs.items()
        if not name.startswith(("GEMM", "chunked"))
    )

    base_argv = list(sys.argv[1:] if argv is None else argv)
    mem = {}
    for name in provs:
        res = subprocess.run(
            [sys.executable, __file__, *base_argv, "--mem-only", name, "--out", "-"],
            capture_output=True,
            text=True,
            check=True,
        )
        mem[name] = tuple(json.loads(res.stdout.strip().splitlines()[-1]))
    times: dict[str, list[float]] = {name: [] for name in provs}
    cpu: dict[str, list[float]] = {name: [] for name in provs}
    for fn in provs.values():  # warm-up
        fn()
    for _ in range(args.reps):  # interleaved rounds
        for name, fn in provs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    floor = med["GEMM floor (2 GEMMs)"]
    floor_cpu = med_cpu["GEMM floor (2 GEMMs)"]
    gflop = 4 * n * m * d / 1e9

    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    cmd = f"{env} python bench/bench_bank.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"### Bank: N={n} queries vs M={m} bank rows, D={d}, float32, semantics={args.semantics!r}, "
        f"forward + backward",
        "",
        f"`{cmd.strip()}` — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.reps} interleaved rounds (wall clock and "
        f"process CPU time), machine shared with other jobs (load average {os.getloadavg()[0]:.0f}); "
        f"query gradients of fused / kernel alone / dense vs the chunked reference agree to {agree:.1e} "
        f"(max rel.).",
        "",
        "| provider | wall s | x floor (wall) | CPU s | x floor (CPU) | GFLOP/s (4NMD, CPU) "
        "| peak RSS growth MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in provs:
        growth, reset = mem[name]
        lines.append(
            f"| {name} | {med[name]:.3f} | {med[name] / floor:.2f} | {med_cpu[name]:.3f} | "
            f"{med_cpu[name] / floor_cpu:.2f} | {gflop / med_cpu[name]:.1f} | "
            f"{growth / 2**20:.0f}{'' if reset else ' (peak not reset: upper bound)'} |"
        )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out != "-":
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
