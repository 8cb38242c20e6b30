"""The FLOP and byte model of the fused RLL kernels, the floors the goal line divides by, the roofline.

The floor of a fused backend is its GEMM work at the GPU's dense tensor-core rate: the tile GEMMs
of the fused algorithm (``fused_flops``) divided by the tf32 peak (fp32 inputs; the default fp32
setting, tf32x3, does three tf32 products per product, so its own floor is three times higher).
Dense implementations (reference, PML) are bound by HBM traffic instead: their bytes per (i, j)
pair are measured on eager ATen ops (TorchDispatchMode) on a small CPU problem.
"""

from __future__ import annotations

import torch

# dense peak rates (no sparsity): tensor cores fp16/bf16, tf32; fp32 FMA; HBM bandwidth
PEAKS = {
    "H200": {"fp16_tc": 989e12, "tf32_tc": 494.7e12, "fp32": 67e12, "hbm": 4.8e12},
    "H100": {"fp16_tc": 989e12, "tf32_tc": 494.7e12, "fp32": 67e12, "hbm": 3.35e12},
}
GOAL = {"N": 8192, "D": 512, "speedup_vs_pml": 5.0, "floor_factor": 2.0}


def peaks(dev: str) -> tuple[dict, str]:
    """(peak rates, which GPU they are for): the H200's, or the H100 SXM's for an unknown GPU."""
    if dev != "cuda":
        return PEAKS["H200"], "H200 peaks (dry run)"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    for key, val in PEAKS.items():
        if key in name:
            return val, f"{key} peaks"
    return PEAKS["H100"], f"H100 SXM peaks assumed for {name}"


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
    each query block comes from L2: 8192 x 512 fp32 = 16 MiB fits in the 50 MiB L2), writes the
    gradients; O((N + M) D), no N x M term."""
    passes = 1 if semantics == "paper" else 3
    return passes * (n + m) * d * elem + 2 * (n + m) * d * elem


def dense_bytes_per_pair(fn, n: int = 192, d: int = 32) -> tuple[float, float]:
    """Bytes moved per (i, j) pair by an eager dense loss ``fn(x, y)``: (forward, forward+backward).

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

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).requires_grad_()
    y = torch.randint(0, n // 4, (n,), generator=g)
    with Count() as c_fwd:
        fn(x, y)
    with Count() as c_full:
        fn(x, y).backward()
    return c_fwd.bytes / (n * n), c_full.bytes / (n * n)


def rows(sizes, dense: dict, peak: dict) -> list[dict]:
    """One row per (N, D, semantics): fused GFLOP, MB and floors; dense bytes/pair and HBM times."""
    out = []
    for n, d in sizes:
        for sem in ("paper", "pml"):
            fl = fused_flops(n, n, d, sem, "full")
            row = dict(
                N=n, D=d, semantics=sem, gflop=fl / 1e9, fused_MB=fused_hbm_bytes(n, n, d, 4, sem) / 1e6
            )
            row.update(tf32_ms=1e3 * fl / peak["tf32_tc"], tf32x3_ms=3e3 * fl / peak["tf32_tc"])
            row.update(fp16_ms=1e3 * fl / peak["fp16_tc"])
            for name, per_pair in dense.items():
                if name.endswith(sem):
                    row[f"{name}_B_per_pair"] = per_pair
                    row[f"{name}_hbm_ms"] = 1e3 * per_pair * n * n / peak["hbm"]
            out.append(row)
    return out


def table(rows_: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows_ for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows_:
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(ctx) -> int:
    """The roofline table (no GPU needed): fused floors and dense HBM times per (N, D)."""
    from bench.device.losses import LOSSES, has_pml

    dense, n_probe = {}, 64 if ctx.dry else 192
    for sem in ("paper", "pml"):
        ref = LOSSES[f"rll-{sem}"].reference
        dense[f"reference_{sem}"] = dense_bytes_per_pair(lambda x, y, ref=ref: ref([x], y), n_probe)[1]
    if has_pml():
        pml = LOSSES["rll-pml"].pml(None, None)
        dense["pml_pml"] = dense_bytes_per_pair(lambda x, y: pml([x], y), n_probe)[1]
    peak, gpu = peaks(ctx.dev)
    sizes = [(n, d) for n in (1024, 4096, 8192, 16384) for d in (128, 512)]
    text = table(rows(sizes, dense, peak))
    ctx.write("roofline.md", f"Roofline ({gpu}), fp32 inputs, in-batch, forward+backward\n\n{text}\n")
    print(text)
    n, d = GOAL["N"], GOAL["D"]
    for sem in ("pml", "paper"):
        floor = 1e3 * fused_flops(n, n, d, sem, "full") / peak["tf32_tc"]
        ctx.note(f"roofline N={n} D={d} {sem}: tf32 tensor-core floor {floor:.3f} ms ({gpu})")
    if "pml_pml" not in dense:
        ctx.note("roofline: PML not importable, its column left out")
    return ctx.finish()
