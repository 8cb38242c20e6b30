"""Ahead-of-time compilation of the Triton kernels for a GPU target, on a machine without a GPU.

``python -m rll_kernels.triton._aot [--cap 90] [--dtype fp32] [--block-d 128] [--config 64,64,4,3]``
compiles every kernel variant (forward with and without the one-pass gradient, backward dq and dk)
with Triton's own compiler and ptxas for sm_80 / sm_90 and prints the shared memory each launch
configuration needs and its tensor-core instruction count. It needs triton (with its bundled ptxas),
no GPU and no CUDA driver, and it must run with ``TRITON_INTERPRET`` unset: under the interpreter the
kernels are Python functions, not compilable ones. A GPU run must still confirm the speed.
``compile_sibling`` compiles the SoftTriple and OSM kernels (``SIBLINGS``) with the block sizes their
launchers use on a GPU, so the GPU compiler checks them too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from triton.compiler import CompiledKernel

KINDS = ("fwd_paper", "fwd_stats", "bwd_q", "bwd_k")
_TRITON_DT = {
    "fp32": ("fp32", "fp32"),
    "fp16": ("fp16", "fp32"),
    "bf16": ("bf16", "fp32"),
    "fp64": ("fp64", "fp64"),
}


def compile_kernel(
    kind: str,
    dtype: str,
    cap: int,
    block_m: int,
    block_n: int,
    block_d: int,
    num_warps: int,
    num_stages: int,
    fp32_precision: str = "tf32x3",
    k_chunk: int = 0,
) -> CompiledKernel:
    """Compile one RLL kernel variant for ``sm_<cap>``; returns the CompiledKernel (``.asm``,
    ``.metadata``)."""
    from .rll import rll_bwd_k_kernel, rll_bwd_q_kernel, rll_fwd_kernel

    elem, acc = _TRITON_DT[dtype]
    fn = {
        "fwd_paper": rll_fwd_kernel,
        "fwd_stats": rll_fwd_kernel,
        "bwd_q": rll_bwd_q_kernel,
        "bwd_k": rll_bwd_k_kernel,
    }[kind]
    gram, gz = ("tf32x3", "tf32") if fp32_precision == "mixed" else (fp32_precision, fp32_precision)
    consts = dict(
        HAS_IDS=1,
        NORMALIZE=True,
        UPCAST_QK=False,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        K_CHUNK=k_chunk,
        PREC_QK=gram if dtype == "fp32" else "ieee",
        PREC_GZ="ieee" if dtype == "fp64" else gz,
    )
    if kind.startswith("fwd"):
        consts.update(HAS_BIAS=kind == "fwd_stats", PAPER_GRAD=kind == "fwd_paper")
    else:
        consts.update(ATTACHED=True)
    ptr = {
        "Q": elem,
        "K": elem,
        "QL": "i64",
        "KL": "i64",
        "QID": "i64",
        "KID": "i64",
        "PRM": acc,
        "NORMS": acc,
        "LOSS": acc,
        "STATS": acc,
        "GR": acc,
        "GQ": acc if kind.startswith("fwd") else elem,
        "GK": elem,
    }
    return _compile(fn, consts, ptr, cap, num_warps, num_stages)


def _compile(fn, consts: dict, ptr: dict, cap: int, num_warps: int, num_stages: int) -> CompiledKernel:
    """triton.compile of ``fn`` for sm_<cap>: pointer arguments typed by ``ptr``, the rest i32."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (kernels are interpreted otherwise)")
    import triton
    from triton.backends.compiler import GPUTarget

    sig = {a: ("constexpr" if a in consts else f"*{ptr[a]}" if a in ptr else "i32") for a in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(
        src, target=GPUTarget("cuda", cap, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


# the SoftTriple kernels at K = 10 centers per class (KP = 16, BC = 4) and D >= 64, the OSM kernel at
# D = 128 with attention and gradient: the GPU block sizes of softtriple._blocks and osm._blocks
SIBLINGS = ("softtriple_fwd", "softtriple_dx", "softtriple_dw", "osm")


def compile_sibling(kernel: str, dtype: str = "fp32", cap: int = 90) -> CompiledKernel:
    """Compile a SoftTriple or OSM kernel for ``sm_<cap>`` (dtype fp32 or fp64)."""
    from . import osm, softtriple

    if kernel == "osm":
        consts = dict(HAS_ATT=True, NEED_GRAD=True, BM=64, BN=32, BK=32, BD=64, BLOCK_D=128)
        ptr = dict.fromkeys(("Z", "ATT", "PRM", "ROWS", "GP", "GN"), dtype) | {"LAB": "i64"}
        return _compile(osm._osm_rows_kernel, consts, ptr, cap, 4, 2)
    fn = {
        "softtriple_fwd": softtriple._st_fwd_kernel,
        "softtriple_dx": softtriple._st_bwd_dx_kernel,
        "softtriple_dw": softtriple._st_bwd_dw_kernel,
    }[kernel]
    names = ("x_ptr", "w_ptr", "rn_ptr", "loss_ptr", "lse_ptr", "g_ptr", "gxp_ptr", "gw_ptr", "PRM")
    ptr = dict.fromkeys(names, dtype) | {"y_ptr": "i64"}
    return _compile(fn, dict(BM=64, BC=4, KP=16, BD=64), ptr, cap, 4, 2)


def summary(k: CompiledKernel) -> dict:
    ptx = k.asm["ptx"]
    return {"shared": k.metadata.shared, "mma": ptx.count("mma.sync"), "wgmma": ptx.count("wgmma.mma_async")}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(_TRITON_DT))
    ap.add_argument("--kind", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--block-d", type=int, default=128)
    ap.add_argument(
        "--config", nargs="+", default=["64,64,4,3"], help="BLOCK_M,BLOCK_N,num_warps,num_stages[,K_CHUNK]"
    )
    args = ap.parse_args(argv)
    ok = True
    print(
        "| sm | dtype | kernel | BLOCK_M,BLOCK_N,warps,stages[,K_CHUNK] | BLOCK_D | shared KiB "
        "| mma.sync | wgmma | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for cap in args.cap:
        for dt in args.dtype:
            for kind in args.kind:
                for cfg in args.config:
                    bm, bn, w, s, *kc = (int(v) for v in cfg.split(","))
                    t0 = time.time()
                    try:
                        info = summary(
                            compile_kernel(
                                kind, dt, cap, bm, bn, args.block_d, w, s, k_chunk=kc[0] if kc else 0
                            )
                        )
                        print(
                            f"| {cap} | {dt} | {kind} | {cfg} | {args.block_d} "
                            f"| {info['shared'] / 1024:.0f} | "
                            f"{info['mma']} | {info['wgmma']} | {time.time() - t0:.0f} |",
                            flush=True,
                        )
                    except Exception as e:  # report and go on: the table is the product
                        ok = False
                        msg = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
                        print(
                            f"| {cap} | {dt} | {kind} | {cfg} | {args.block_d} | FAILED: {type(e).__name__} "
                            f"{msg} | | | |",
                            flush=True,
                        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
