"""`make gpu-check`: what a CUDA machine must confirm about the GPU backends of the Ranked List Loss.

1. Roofline (no GPU needed): FLOPs and bytes per (N, D); predicted H100 times of the fused kernels
   at the tensor-core rate and of the dense reference / PML over HBM bandwidth. The dense bytes per
   pair are *measured*: every ATen op the reference (or PML) runs in eager mode is counted with its
   inputs and outputs (TorchDispatchMode) on a small CPU problem.
2. Parity at large sizes (N up to 16384) of every usable CUDA backend ("triton", and "cuda" when the
   CUDA C++ kernels are built) against the dense reference: fp32 with the derived tolerance
   (|fused - ref64| <= 4 |ref32 - ref64| + 8 ulp), fp16/bf16 inputs against the fp32 reference on the
   same rounded points, and no NaN at Tn = 10 / 100 in fp16 (PML's NaN is reported beside it).
3. Timings (triton.testing.do_bench medians, ms) of fused vs reference vs PML vs torch.compile of the
   reference, for forward, backward and forward+backward, and the peak memory of forward+backward.
4. The issue's goal at N=8192, D=512, fp32: full >= 5x faster than PML and within 2x of the
   tensor-core floor.

Without CUDA it prints the roofline, says that the GPU part was skipped, and exits 0.
Exit status 1 if a parity check fails.

    python bench/gpu_check.py [--quick] [--no-compile] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

# H100 SXM5 peak rates (dense): tensor cores bf16/fp16, tf32, fp32 FMA (no tensor core), HBM3
H100 = {"fp16_tc": 989e12, "tf32_tc": 495e12, "fp32": 67e12, "hbm": 3.35e12}
GOAL = {"N": 8192, "D": 512, "speedup_vs_pml": 5.0, "floor_factor": 2.0}
DEV = "cuda"  # "cpu" for --dry-run: every GPU code path on tiny CPU problems under TRITON_INTERPRET=1


# ------------------------------------------------------------------ roofline
def fused_flops(n: int, m: int, d: int, semantics: str, mode: str) -> float:
    """GEMM FLOPs of the fused kernels (2 n m d per tile GEMM over the whole N x M).

    paper: one forward pass, Gram tile + G_P Z + G_N Z (3 GEMMs); backward scales the saved gradient.
    pml:   forward Gram tile (1); backward dq pass (Gram + G K) and dk pass (Gram + G^T Q) (4).
    """
    g = 2.0 * n * m * d
    per_mode = {"paper": {"fwd": 3, "bwd": 0, "full": 3}, "pml": {"fwd": 1, "bwd": 4, "full": 5}}
    return per_mode[semantics][mode] * g


def fused_hbm_bytes(n: int, m: int, d: int, elem: int, semantics: str) -> float:
    """Compulsory HBM traffic of the fused kernels: every pass reads Q and K once (the K stream of
    each query block comes from L2: 8192 x 512 fp32 = 16 MiB fits in H100's 50 MiB L2), writes the
    gradients; O((N + M) D), no N x M term."""
    passes = 1 if semantics == "paper" else 3
    return passes * (n + m) * d * elem + 2 * (n + m) * d * elem


def measure_dense_bytes_per_pair(semantics: str, provider: str = "reference", n: int = 192, d: int = 32):
    """Bytes moved per (i, j) pair by the eager dense implementation, forward and forward+backward.

    Counts the inputs and outputs of every ATen op that touches an N x M-sized tensor (the O(N D)
    ops are negligible at scale). Eager PyTorch does not fuse, so each op is one pass over HBM.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    big = n * n // 2

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ts = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            if any(t.numel() >= big for t in ts):
                self.bytes += sum(t.numel() * t.element_size() for t in ts)
            return out

    torch.manual_seed(0)
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randint(0, n // 4, (n,))
    fn = _dense_fn(provider, semantics)
    with Count() as c_fwd:
        loss = fn(x, y)
    with Count() as c_full:
        loss = fn(x, y)
        loss.backward()
    pairs = float(n * n)
    return c_fwd.bytes / pairs, c_full.bytes / pairs


def _dense_fn(provider: str, semantics: str):
    from rll_kernels import reference

    if provider == "pml":
        from pytorch_metric_learning.losses import RankedListLoss

        pml = RankedListLoss(margin=0.4, Tn=10.0)
        return lambda x, y: pml(x, y)
    return lambda x, y: reference.ranked_list_loss(x, y, semantics=semantics)


def roofline(sizes) -> list[dict]:
    rows = []
    bpp = {
        (p, s): measure_dense_bytes_per_pair(s, p)
        for p, s in (("reference", "paper"), ("reference", "pml"), ("pml", "pml"))
    }
    for n, d in sizes:
        for sem in ("paper", "pml"):
            fl = fused_flops(n, n, d, sem, "full")
            by = fused_hbm_bytes(n, n, d, 4, sem)
            t_tf32 = fl / H100["tf32_tc"]
            t_fp16 = fl / H100["fp16_tc"]
            t_tf32x3 = 3 * fl / H100["tf32_tc"]
            dense_ref = bpp[("reference", sem)][1] * n * n / H100["hbm"]
            row = dict(
                N=n,
                D=d,
                semantics=sem,
                gflop=fl / 1e9,
                fused_MB=by / 1e6,
                fused_tf32_ms=1e3 * t_tf32,
                fused_tf32x3_ms=1e3 * t_tf32x3,
                fused_fp16_ms=1e3 * t_fp16,
                fused_hbm_ms=1e3 * by / H100["hbm"],
                ref_bytes_per_pair=bpp[("reference", sem)][1],
                ref_dense_ms=1e3 * dense_ref,
            )
            if sem == "pml":
                row["pml_bytes_per_pair"] = bpp[("pml", "pml")][1]
                row["pml_dense_ms"] = 1e3 * bpp[("pml", "pml")][1] * n * n / H100["hbm"]
            rows.append(row)
    return rows


def print_roofline(rows) -> None:
    print("\n## Roofline (H100 SXM: 989 TFLOP/s fp16/bf16 tensor, 495 tf32, 67 fp32 FMA; HBM3 3.35 TB/s)")
    print(
        "full = forward + backward, in-batch (M = N), fp32 inputs; dense bytes/pair measured on eager ATen ops"
    )
    hdr = (
        "N",
        "D",
        "sem",
        "GFLOP",
        "fused MB",
        "fused@tf32 ms",
        "fused@tf32x3 ms",
        "fused@fp16 ms",
        "ref B/pair",
        "ref@HBM ms",
        "PML B/pair",
        "PML@HBM ms",
    )
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(
            f"| {r['N']} | {r['D']} | {r['semantics']} | {r['gflop']:.1f} | {r['fused_MB']:.1f} | "
            f"{r['fused_tf32_ms']:.3f} | {r['fused_tf32x3_ms']:.3f} | {r['fused_fp16_ms']:.3f} | "
            f"{r['ref_bytes_per_pair']:.0f} | {r['ref_dense_ms']:.2f} | "
            f"{r.get('pml_bytes_per_pair', float('nan')):.0f} | {r.get('pml_dense_ms', float('nan')):.2f} |"
        )


# ------------------------------------------------------------------ GPU part
def _inputs(n, d, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, d, device=DEV, dtype=torch.float64, generator=g)
    y = torch.randint(0, max(1, n // 4), (n,), device=DEV, generator=g)  # P x K batches, K = 4
    return x, y


def _grad(fn, x, y):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, y)
    (g,) = torch.autograd.grad(loss, [x])
    return loss.detach(), g


def _err_ok(name, kern, r32, r64, factor=4.0, ulps=8.0):
    ref_err = (r32.double() - r64.double()).abs().max().item()
    scale = r64.double().abs().max().item()
    err = (kern.double() - r64.double()).abs().max().item()
    bound = factor * ref_err + ulps * 1.1920929e-07 * scale
    ok = err <= bound and math.isfinite(err)
    print(f"  {'PASS' if ok else 'FAIL'} {name}: err {err:.3e}  bound {bound:.3e}  (ref32 err {ref_err:.3e})")
    return ok


def parity(backends, sizes, half_size) -> bool:
    import rll_kernels
    from rll_kernels import reference

    print("\n## Parity vs the dense reference (derived tolerance: 4 x |ref32 - ref64| + 8 ulp)")
    ok = True
    for n, d in sizes:
        x64, y = _inputs(n, d, torch.float64)
        for sem in ("paper", "pml"):
            try:
                r64 = _grad(lambda a, b: reference.ranked_list_loss(a, b, semantics=sem), x64, y)
                r32 = _grad(lambda a, b: reference.ranked_list_loss(a, b, semantics=sem), x64.float(), y)
            except torch.cuda.OutOfMemoryError:
                print(f"  N={n} D={d} {sem}: dense reference OOM, parity skipped at this size")
                torch.cuda.empty_cache()
                continue
            for b in backends:
                kern = _grad(
                    lambda a, c: rll_kernels.ranked_list_loss(a, c, semantics=sem, backend=b), x64.float(), y
                )
                ok &= _err_ok(f"{b} N={n} D={d} {sem} fp32 loss", kern[0], r32[0], r64[0])
                ok &= _err_ok(f"{b} N={n} D={d} {sem} fp32 grad", kern[1], r32[1], r64[1])
                if b == "triton":  # the faster fp32 settings: reported, not required
                    for prec in ("tf32", "mixed"):
                        kp = _with_fp32_precision(
                            prec,
                            lambda: _grad(
                                lambda a, c: rll_kernels.ranked_list_loss(a, c, semantics=sem, backend=b),
                                x64.float(),
                                y,
                            ),
                        )
                        rel = [
                            ((u.double() - v.double()).abs().max() / v.double().abs().max()).item()
                            for u, v in zip(kp, r64)
                        ]
                        print(
                            f"  INFO triton[{prec}] N={n} D={d} {sem}: rel. error loss {rel[0]:.2e}, grad {rel[1]:.2e}"
                        )
            del r64, r32
            torch.cuda.empty_cache()
    # half inputs: the Triton op reads them directly (fp32 accumulation); reference on the same points
    if "triton" in backends:
        n, d = half_size
        x64, y = _inputs(n, d, torch.float64, seed=1)
        ids = torch.arange(n, device=DEV)
        for dt in (torch.float16, torch.bfloat16):
            z = torch.nn.functional.normalize(x64, dim=1).to(dt)
            for Tn in (10.0, 100.0):
                rows = torch.ops.rll_kernels.rll_triton_fwd(
                    z, y, ids, z, y, ids, 1.2, 0.8, Tn, 0.0, 0.5, 0.0, False, False
                )[0]
                f = lambda t: reference.ranked_list_loss(t, y, 0.4, Tn, normalize=False, reduction="none")  # noqa
                ok &= _err_ok(f"triton {dt} Tn={Tn} rows", rows, f(z.float()), f(z.double()))
                finite = bool(torch.isfinite(rows).all())
                ok &= finite
                pml_nan = _pml_half_nan(z, y, Tn)
                print(
                    f"  {'PASS' if finite else 'FAIL'} triton {dt} Tn={Tn}: finite={finite}; PML {dt}: {pml_nan}"
                )
    return ok


def _pml_half_nan(z, y, Tn):
    try:
        from pytorch_metric_learning.losses import RankedListLoss

        v = RankedListLoss(margin=0.4, Tn=Tn)(z, y)
        return "NaN/Inf" if not torch.isfinite(v) else f"finite ({v.item():.4g})"
    except Exception as e:  # PML may raise on half inputs
        return f"error ({type(e).__name__})"


def _providers(backends, sem, use_compile, dtype):
    import rll_kernels
    from rll_kernels import reference

    out = {
        b: (lambda b: lambda x, y: rll_kernels.ranked_list_loss(x, y, semantics=sem, backend=b))(b)
        for b in backends
    }
    if "triton" in backends and dtype == torch.float32:
        for prec in ("tf32", "mixed"):
            out[f"triton[{prec}]"] = (
                lambda prec: (
                    lambda x, y: _with_fp32_precision(
                        prec, lambda: rll_kernels.ranked_list_loss(x, y, semantics=sem, backend="triton")
                    )
                )
            )(prec)
    out["reference"] = lambda x, y: reference.ranked_list_loss(x, y, semantics=sem)
    if use_compile:
        out["reference+compile"] = torch.compile(lambda x, y: reference.ranked_list_loss(x, y, semantics=sem))
    if sem == "pml":
        out["pml"] = _dense_fn("pml", "pml")
    return out


def _with_fp32_precision(prec: str, thunk):
    """Run ``thunk`` with RLL_TRITON_FP32_PRECISION=prec (read at each launch)."""
    old = os.environ.get("RLL_TRITON_FP32_PRECISION")
    os.environ["RLL_TRITON_FP32_PRECISION"] = prec
    try:
        return thunk()
    finally:
        if old is None:
            del os.environ["RLL_TRITON_FP32_PRECISION"]
        else:
            os.environ["RLL_TRITON_FP32_PRECISION"] = old


def _median_ms(fn, grad_to_none=(), return_mode="median", reps=3):
    """Wall-clock median (the --dry-run stand-in for do_bench on CPU)."""
    ts = []
    for _ in range(reps):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t0))
    return sorted(ts)[len(ts) // 2]


def _bench(fn, x, y):
    if DEV == "cuda":
        from triton.testing import do_bench
    else:
        do_bench = _median_ms
    res = {}
    xx = x.detach().clone().requires_grad_()
    res["fwd"] = do_bench(lambda: fn(xx, y), return_mode="median")
    out = fn(xx, y)
    res["bwd"] = do_bench(lambda: out.backward(retain_graph=True), grad_to_none=[xx], return_mode="median")
    del out
    res["full"] = do_bench(lambda: fn(xx, y).backward(), grad_to_none=[xx], return_mode="median")
    if DEV != "cuda":
        res["peak_MB"] = float("nan")
        return res
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(xx, y).backward()
    torch.cuda.synchronize()
    res["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return res


def timings(backends, sizes, dtypes, use_compile, writer) -> dict:
    print("\n## Timings (do_bench medians, ms; peak = extra memory of one forward+backward, MiB)")
    print("| N | D | dtype | semantics | provider | fwd | bwd | full | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for n, d in sizes:
        for dt in dtypes:
            x64, y = _inputs(n, d, torch.float64)
            x = x64.to(dt)
            for sem in ("paper", "pml"):
                for name, fn in _providers(backends, sem, use_compile, dt).items():
                    try:
                        r = _bench(fn, x, y)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        r = None
                    except Exception as e:  # a provider that cannot run this case (PML half) is reported
                        print(f"| {n} | {d} | {dt} | {sem} | {name} | error: {type(e).__name__} | | | |")
                        continue
                    results[(n, d, str(dt), sem, name)] = r
                    if r is None:
                        print(f"| {n} | {d} | {dt} | {sem} | {name} | OOM | OOM | OOM | OOM |")
                        continue
                    print(
                        f"| {n} | {d} | {dt} | {sem} | {name} | {r['fwd']:.3f} | {r['bwd']:.3f} | "
                        f"{r['full']:.3f} | {r['peak_MB']:.0f} |",
                        flush=True,
                    )
                    if writer:
                        writer.writerow(
                            dict(
                                N=n,
                                D=d,
                                dtype=str(dt),
                                semantics=sem,
                                provider=name,
                                device=_device_name(),
                                **r,
                            )
                        )
    return results


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEV == "cuda" else "cpu (Triton interpreter dry run)"


def goal_check(results, backends) -> None:
    n, d = GOAL["N"], GOAL["D"]
    print(f"\n## Goal (N={n}, D={d}, fp32, forward+backward)")
    pml = results.get((n, d, str(torch.float32), "pml", "pml"))
    for b in list(backends) + (["triton[tf32]", "triton[mixed]"] if "triton" in backends else []):
        for sem in ("pml", "paper"):
            r = results.get((n, d, str(torch.float32), sem, b))
            if not r:
                print(f"  {b} {sem}: not measured")
                continue
            floor = fused_flops(n, n, d, sem, "full") / H100["tf32_tc"] * 1e3
            line = (
                f"  {b} {sem}: full {r['full']:.3f} ms; tf32 tensor-core floor {floor:.3f} ms "
                f"-> {r['full'] / floor:.2f}x the floor (goal <= {GOAL['floor_factor']}x)"
            )
            if pml:
                sp = pml["full"] / r["full"]
                line += (
                    f"; PML full {pml['full']:.3f} ms -> {sp:.1f}x faster (goal >= {GOAL['speedup_vs_pml']}x)"
                )
            print(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes (a few minutes)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--roofline-only", action="store_true")
    ap.add_argument("--csv", default=None, help="write the timing rows to this CSV")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="run every GPU code path on tiny CPU problems under TRITON_INTERPRET=1 (no GPU needed)",
    )
    ap.add_argument(
        "--pytest",
        action="store_true",
        help="first run tests/test_triton_rll.py on the GPU (what `make gpu-check` does)",
    )
    args = ap.parse_args(argv)

    global DEV
    roof_sizes = [(n, d) for n in (1024, 4096, 8192, 16384) for d in (128, 512)]
    print_roofline(roofline(roof_sizes))
    if args.roofline_only:
        return 0
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print(
            "\nno CUDA device: parity at large sizes, timings and the goal check were skipped "
            "(run `make gpu-check` on a CUDA machine)"
        )
        return 0
    DEV = "cuda"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: unset it for GPU runs")
        return 1
    import rll_kernels

    avail = rll_kernels.available_backends("cuda", "rll")
    backends = [b for b in ("triton", "cuda") if avail.get(b) is None]
    for b in ("triton", "cuda"):
        print(f"backend {b}: {'usable' if avail.get(b) is None else avail.get(b)}")
    print(
        f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}); "
        f"torch {torch.__version__}; RLL_TRITON_FP32_PRECISION="
        f"{os.environ.get('RLL_TRITON_FP32_PRECISION', 'tf32x3')}"
    )
    if not backends:
        print("no fused CUDA backend usable: nothing to check")
        return 1
    t0 = time.time()
    ok = True
    if args.pytest:
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        files = ["tests/test_triton_rll.py"] + (["tests/test_cuda_backend.py"] if "cuda" in backends else [])
        print(f"\n## {' '.join(files)} on the GPU", flush=True)
        # no autotuning in the tests (many small D): the first configuration that fits
        env = dict(os.environ, RLL_TRITON_AUTOTUNE="0")
        ok = subprocess.run([sys.executable, "-m", "pytest", "-q", *files], cwd=root, env=env).returncode == 0
    par_sizes = (
        [(1024, 128), (4096, 512)] if args.quick else [(1024, 128), (4096, 512), (8192, 512), (16384, 128)]
    )
    ok &= parity(backends, par_sizes, (2048, 256) if args.quick else (4096, 256))
    time_sizes = (
        [(4096, 128), (8192, 512)]
        if args.quick
        else [(1024, 128), (4096, 128), (4096, 512), (8192, 512), (16384, 128), (16384, 512)]
    )
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.float16, torch.bfloat16]
    writer = None
    fh = None
    if args.csv:
        fh = open(args.csv, "w", newline="")
        writer = csv.DictWriter(
            fh,
            fieldnames=[
                "N",
                "D",
                "dtype",
                "semantics",
                "provider",
                "device",
                "fwd",
                "bwd",
                "full",
                "peak_MB",
            ],
        )
        writer.writeheader()
    results = timings(backends, time_sizes, dtypes, not args.no_compile, writer)
    if fh:
        fh.close()
    goal_check(results, backends)
    print(f"\ngpu-check {'PASSED' if ok else 'FAILED'}: tests and parity ({time.time() - t0:.0f} s)")
    return 0 if ok else 1


def dry_run(args) -> int:
    """The GPU part on CPU tensors (Triton interpreter), tiny sizes: checks this script, not speed."""
    global DEV
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        print("--dry-run needs TRITON_INTERPRET=1 (set before rll_kernels is imported)")
        return 1
    import rll_kernels

    DEV = "cpu"
    backends = [b for b in ("triton",) if rll_kernels.available_backends("cpu", "rll").get(b) is None]
    ok = parity(backends, [(40, 16)], (48, 16))
    dtypes = [torch.float32, torch.float16]
    results = timings(backends, [(40, 16)], dtypes, not args.no_compile, None)
    goal_check(results, backends)
    print(f"\ndry run {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
