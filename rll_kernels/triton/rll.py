r"""Triton backend of the Ranked List Loss: the launchers behind the ops ``rll_kernels::rll_triton_fwd``
and ``rll_triton_bwd`` (registered in rll_kernels/ops/rll.py with the schemas of
rll_kernels/ops/_schemas.py, the same contract as the C++ ``rll_fwd`` / ``rll_bwd``). They return:

* forward: (per-row losses (N,), the query gradient of each row's loss (N, D) when
  ``need_grad and not attached`` else (0,), row statistics (N, 4) = [log den_P, L_P, log den_N, L_N]);
* backward: (grad q (N, D) or (0,), grad k (M, D) or (0,)) from the saved statistics.

With :math:`G_{ij} = \partial L/\partial d_{ij} / d_{ij}`:

.. math::
    \partial L/\partial z_i = (G\mathbf{1})_i z_i - (G K)_i, \qquad
    \partial L/\partial k_j = (G^\top\mathbf{1})_j k_j - (G^\top Q)_j.

Inputs may be fp32, fp64, fp16 or bf16. Accumulation is fp32 (fp64 for fp64 inputs); for half
inputs the row losses, statistics and the forward's query gradient are fp32, the backward's
gradients have the input dtype. The ops are registered for CPU and CUDA tensors (CPU tensors run
through the Triton interpreter, ``TRITON_INTERPRET=1``); their fake kernels and autograd are the ones
of the C++ op (rll_kernels/ops/rll.py).

Environment: ``RLL_TRITON_FP32_PRECISION`` selects ``tl.dot``'s ``input_precision`` for fp32 operands
on GPU: ``tf32x3`` (default: three tf32 MMAs per product, about fp32 accuracy), ``ieee`` (fp32 FMA, no
tensor cores), ``tf32`` (one tf32 MMA: 3x fewer tensor-core operations but ~1e-3 relative error in the
Gram form, so distances near the set boundaries and duplicates move) or ``mixed`` (Gram tile in
tf32x3, the gradient GEMMs G Z in tf32: exact sets, gradients with ~5e-4 relative error).
The interpreter computes every fp32 ``tl.dot`` in fp32 whatever the setting.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton

from . import interpret_mode
from ._rll_kernels import rll_bwd_k_kernel, rll_bwd_q_kernel, rll_fwd_kernel

__all__ = ["INTERPRET", "rll_backward", "rll_forward"]

# TRITON_INTERPRET is read when @triton.jit decorates a kernel (at import of _rll_kernels)
INTERPRET = interpret_mode()
_HALF = (torch.float16, torch.bfloat16)
_DTYPES = (torch.float32, torch.float64) + _HALF
_FP32_PRECISIONS = ("tf32x3", "ieee", "tf32", "mixed")

_KERNELS = {"fwd": rll_fwd_kernel, "bwd_q": rll_bwd_q_kernel, "bwd_k": rll_bwd_k_kernel}

# Under the interpreter programs run serially in Python: few programs, large blocks.
# (BLOCK_M, BLOCK_N[, K_CHUNK]); K_CHUNK = 0 keeps the whole D of a tile resident.
_INTERP_BLOCKS = {"fwd": (32, 64), "bwd_q": (32, 64), "bwd_k": (64, 32)}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fp32_precision() -> str:
    p = os.environ.get("RLL_TRITON_FP32_PRECISION", "tf32x3")
    if p not in _FP32_PRECISIONS:
        raise ValueError(f"RLL_TRITON_FP32_PRECISION must be one of {_FP32_PRECISIONS}, got {p!r}")
    return p


def _dot_flags(dtype: torch.dtype) -> dict:
    """constexpr flags for the two kinds of tl.dot: the Gram tile (input dtype) and G @ Z (acc dtype)."""
    fp32 = _fp32_precision()
    fp32_gram, fp32_gz = ("tf32x3", "tf32") if fp32 == "mixed" else (fp32, fp32)
    # the interpreter's bf16 tl.dot is wrong (triton 3.9): upcast the operands there (bf16 x bf16
    # products are exact in fp32, so the result is the same as a GPU bf16 MMA with fp32 accumulation)
    upcast = INTERPRET and dtype == torch.bfloat16
    prec_qk = fp32_gram if (dtype == torch.float32 or upcast) else "ieee"
    prec_gz = "ieee" if dtype == torch.float64 else fp32_gz
    return {"UPCAST_QK": upcast, "PREC_QK": prec_qk, "PREC_GZ": prec_gz}


def _one_pass_max_d() -> int:
    """Largest D for which "paper" accumulates its query gradient in the forward pass itself.

    The one-pass kernel holds two BLOCK_M x BLOCK_D fp32 accumulators (positives and negatives have
    their own running max); past this D they no longer fit in registers at a tensor-core-friendly
    BLOCK_M, and the same gradient comes from a statistics pass plus one dq pass (rll_bwd_q_kernel
    with detached weights): the same GEMM FLOPs (Gram + Gram + G K vs Gram + G_P K + G_N K) with one
    accumulator. Env ``RLL_TRITON_PAPER_ONE_PASS_MAX_D`` (default 256) moves the switch.
    """
    v = os.environ.get("RLL_TRITON_PAPER_ONE_PASS_MAX_D", "256")
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"RLL_TRITON_PAPER_ONE_PASS_MAX_D must be an integer, got {v!r}") from None


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# ------------------------------------------------------------------ launch configurations (GPU)
# (BLOCK_M, BLOCK_N, num_warps, num_stages[, K_CHUNK]). sm_90 (H100: 228 KiB smem/SM) takes deeper pipelines
# and bigger tiles than sm_80 (A100: 164 KiB). Configs whose accumulators or staged tiles cannot fit
# are pruned per BLOCK_D and dtype before timing (see _prune); the shared-memory model was checked
# against Triton's AOT compile for sm_90 (python -m rll_kernels.triton._rll_aot): within +-50%, and a
# config that still runs out of resources is timed as inf by the autotuner. (16, 32, 4, 2) is the
# small-footprint fallback: 128 KiB at BLOCK_D = 512 fp32 (compiled for sm_90). Configs with a K_CHUNK
# accumulate the Gram tile over D in chunks, so only chunk tiles are staged: at large D these are the
# ones that fit tensor-core-sized (wgmma: BLOCK_M >= 64) tiles; they re-read the tiles from L2.
_CONFIGS = {
    90: [
        (128, 64, 8, 3),
        (64, 128, 8, 3),
        (64, 64, 4, 3),
        (64, 64, 8, 4),
        (128, 128, 8, 3),
        (32, 64, 4, 3),
        (32, 128, 8, 3),
        (16, 64, 4, 3),
        (16, 128, 8, 2),
        (32, 32, 4, 2),
        (16, 32, 4, 2),
        (64, 32, 8, 3, 64),
        (64, 64, 8, 3, 64),
        (128, 32, 8, 3, 64),
        (64, 32, 4, 3, 64),
    ],
    80: [
        (128, 64, 8, 2),
        (64, 128, 8, 2),
        (64, 64, 4, 3),
        (64, 32, 4, 4),
        (32, 64, 4, 3),
        (32, 128, 8, 2),
        (16, 64, 4, 3),
        (16, 128, 8, 2),
        (32, 32, 4, 2),
        (16, 32, 4, 2),
        (64, 32, 8, 3, 64),
        (64, 64, 8, 2, 64),
        (64, 32, 4, 3, 64),
        (32, 64, 8, 2, 64),
    ],
}
_SMEM = {90: 227 * 1024, 80: 163 * 1024}


def _prune(kind: str, cap: int):
    """early_config_prune: drop configs whose register accumulators or staged tiles overflow."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        bd = args["BLOCK_D"]
        elem = args["Q"].element_size()
        acc_bytes = args["PRM"].element_size()
        n_acc = 2 if (kind == "fwd" and args.get("PAPER_GRAD", False)) else 1
        has_gz = not (kind == "fwd" and not args.get("PAPER_GRAD", False))
        keep, cost = [], []
        for c in configs:
            bm, bn, kc = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs.get("K_CHUNK", 0)
            if kc > 0 and kc >= bd:
                continue  # same as K_CHUNK = 0
            rows = bn if kind == "bwd_k" else bm  # rows owned by the program (accumulator rows)
            inner = bm if kind == "bwd_k" else bn  # rows streamed per step
            threads = 32 * c.num_warps
            if kc == 0:
                # fp32 words per thread in registers: accumulators + the resident operand tile
                regs = ((n_acc * acc_bytes + elem) * rows * bd) / (4 * threads)
                smem = (inner * bd * elem) * c.num_stages + rows * bd * elem
            else:
                regs = (n_acc * acc_bytes * rows * bd) / (4 * threads)
                smem = (rows + inner) * kc * elem * c.num_stages + (inner * bd * acc_bytes if has_gz else 0)
            cost.append((regs, smem, c))
            if regs <= 160 and smem <= _SMEM[cap]:
                keep.append(c)
        if not keep:  # keep the smallest footprint so there is always one config
            keep = [min(cost, key=lambda t: (t[0], t[1]))[2]]
        return keep

    return prune


@functools.cache
def _tuned(kind: str, cap: int):
    fn = _KERNELS[kind]
    configs = _configs(cap)
    # BLOCK_D (D rounded up to a power of 2) rather than D: one tuning per size class, not per D
    key = ["BLOCK_D", "HAS_IDS"] + (["PAPER_GRAD", "HAS_BIAS"] if kind == "fwd" else ["ATTACHED"])
    return triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by={"early_config_prune": _prune(kind, 90 if cap >= 90 else 80)},
    )(fn)


def _configs(cap: int) -> list:
    table = _CONFIGS[90 if cap >= 90 else 80]
    return [
        triton.Config(
            {"BLOCK_M": t[0], "BLOCK_N": t[1], "K_CHUNK": t[4] if len(t) > 4 else 0},
            num_warps=t[2],
            num_stages=t[3],
        )
        for t in table
    ]


def pick_config(kind: str, cap: int, args: tuple, flags: dict):
    """The first launch configuration that survives pruning (no timing): RLL_TRITON_AUTOTUNE=0."""
    fn = _KERNELS[kind]
    named = dict(zip(fn.arg_names, args))
    return _prune(kind, 90 if cap >= 90 else 80)(_configs(cap), named, **flags)[0]


def _launch(kind: str, grid_rows: int, args: tuple, device: torch.device, **flags) -> None:
    """Launch one kernel: fixed blocks under the interpreter, autotuned on a GPU (RLL_TRITON_AUTOTUNE=0:
    the first configuration that fits, without timing; what the GPU test run uses)."""
    row_block = "BLOCK_N" if kind == "bwd_k" else "BLOCK_M"
    if INTERPRET or device.type != "cuda":
        bm, bn, *kc = _INTERP_BLOCKS[kind]
        fn = _KERNELS[kind]
        blk = {"BLOCK_M": bm, "BLOCK_N": bn, "K_CHUNK": kc[0] if kc else 0}
        fn[(triton.cdiv(grid_rows, blk[row_block]),)](*args, **flags, **blk, num_warps=4)
        return
    major, minor = torch.cuda.get_device_capability(device)
    cap = major * 10 + minor
    with torch.cuda.device(device):
        if os.environ.get("RLL_TRITON_AUTOTUNE", "1") == "0":
            c = pick_config(kind, cap, args, flags)
            _KERNELS[kind][(triton.cdiv(grid_rows, c.kwargs[row_block]),)](
                *args, **flags, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages
            )
            return
        fn = _tuned(kind, cap)
        fn[lambda meta: (triton.cdiv(grid_rows, meta[row_block]),)](*args, **flags)


# ------------------------------------------------------------------ argument checks
def _check_inputs(q, q_labels, q_ids, k, k_labels, k_ids) -> None:
    if q.dim() != 2:
        raise ValueError(f"rll_triton: q must be 2-D (N, D), got {q.dim()}-D")
    if k.dim() != 2:
        raise ValueError(f"rll_triton: k must be 2-D (M, D), got {k.dim()}-D")
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"rll_triton: q and k must have the same embedding size, got {q.shape[1]} and {k.shape[1]}"
        )
    if q.dtype != k.dtype:
        raise ValueError(f"rll_triton: q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"rll_triton: q must be one of {_DTYPES}, got {q.dtype}")
    for name, t, n in (("q_labels", q_labels, q.shape[0]), ("k_labels", k_labels, k.shape[0])):
        if t.dim() != 1 or t.shape[0] != n or t.dtype != torch.int64:
            raise ValueError(
                f"rll_triton: {name} must be int64 of shape ({n},), got {t.dtype} {tuple(t.shape)}"
            )
    if (q_ids is None) != (k_ids is None):
        raise ValueError("rll_triton: q_ids and k_ids must be given together")
    if q_ids is not None:
        for name, t, n in (("q_ids", q_ids, q.shape[0]), ("k_ids", k_ids, k.shape[0])):
            if t.dim() != 1 or t.shape[0] != n or t.dtype != torch.int64:
                raise ValueError(
                    f"rll_triton: {name} must be int64 of shape ({n},), got {t.dtype} {tuple(t.shape)}"
                )
    for t in (q, q_labels, k, k_labels) + ((q_ids, k_ids) if q_ids is not None else ()):
        if t.device != q.device:
            raise ValueError(f"rll_triton: all tensors must be on {q.device}, got {t.device}")
    if q.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "rll_triton: CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
            "importing rll_kernels"
        )


def _check_params(alpha: float, beta: float, imbalance: float, den_bias: float) -> None:
    # any finite boundaries (docs/semantics.md §2.2): beta >= alpha or beta <= 0 are valid
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise ValueError(f"rll_triton: alpha and beta must be finite, got alpha={alpha} beta={beta}")
    if not 0.0 <= imbalance <= 1.0:
        raise ValueError(f"rll_triton: imbalance must lie in [0, 1], got {imbalance}")
    if not den_bias >= 0.0:
        raise ValueError(f"rll_triton: den_bias must be >= 0, got {den_bias}")


def _params(q: torch.Tensor, alpha, beta, Tn, Tp, imbalance, den_bias) -> torch.Tensor:
    return _params_cached(
        str(q.device),
        _acc_dtype(q.dtype),
        float(alpha),
        float(beta),
        float(Tn),
        float(Tp),
        float(imbalance),
        float(den_bias),
    )


@functools.lru_cache(maxsize=64)
def _params_cached(device: str, acc: torch.dtype, alpha, beta, Tn, Tp, imbalance, den_bias) -> torch.Tensor:
    # cached: a host-to-device copy per call would synchronise the stream (pageable memory); the
    # kernels only read it
    rel = (
        64.0 * torch.finfo(acc).eps
    )  # duplicate threshold (docs/semantics.md §1.3): 64 eps of the accumulation type
    return torch.tensor([alpha, beta, Tn, Tp, imbalance, den_bias, rel], dtype=acc, device=device)


def _ids_args(q_ids, k_ids, q_labels, k_labels):
    # without ids the kernels never read QID/KID; pass the labels as typed placeholders
    if q_ids is None:
        return q_labels, k_labels, False
    return q_ids.contiguous(), k_ids.contiguous(), True


# ------------------------------------------------------------------ custom ops
def rll_forward(
    q: torch.Tensor,
    q_labels: torch.Tensor,
    q_ids: Optional[torch.Tensor],
    k: torch.Tensor,
    k_labels: torch.Tensor,
    k_ids: Optional[torch.Tensor],
    alpha: float,
    beta: float,
    Tn: float,
    Tp: float,
    imbalance: float,
    den_bias: float,
    attached: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused RLL forward on a Triton kernel (same arguments and outputs as ``rll_kernels::rll_fwd``)."""
    _check_inputs(q, q_labels, q_ids, k, k_labels, k_ids)
    _check_params(alpha, beta, imbalance, den_bias)
    paper_grad = need_grad and not attached
    n, d = q.shape
    acc = _acc_dtype(q.dtype)
    loss = torch.empty(n, dtype=acc, device=q.device)
    stats = torch.empty(n, 4, dtype=acc, device=q.device)
    gradq = (
        torch.empty(n, d, dtype=acc, device=q.device)
        if paper_grad
        else torch.empty(0, dtype=acc, device=q.device)
    )
    if n == 0:
        return loss, gradq, stats
    q, k = q.detach().contiguous(), k.detach().contiguous()
    ql, kl = q_labels.contiguous(), k_labels.contiguous()
    qid, kid, has_ids = _ids_args(q_ids, k_ids, ql, kl)
    prm = _params(q, alpha, beta, Tn, Tp, imbalance, den_bias)
    one_pass = paper_grad and d <= _one_pass_max_d()
    g_arg = gradq if one_pass else loss  # placeholder pointer when no gradient is written
    args = (
        q,
        k,
        ql,
        kl,
        qid,
        kid,
        prm,
        loss,
        stats,
        g_arg,
        n,
        k.shape[0],
        d,
        q.stride(0),
        k.stride(0),
        gradq.stride(0) if one_pass else d,
    )
    flags = dict(HAS_IDS=has_ids, BLOCK_D=_block_d(d), **_dot_flags(q.dtype))
    _launch("fwd", n, args, q.device, HAS_BIAS=den_bias > 0.0, PAPER_GRAD=one_pass, **flags)
    if paper_grad and not one_pass:
        # large D: the query gradient of every row (grad_rows = 1) from the saved statistics
        ones = torch.ones(n, dtype=acc, device=q.device)
        _launch(
            "bwd_q",
            n,
            (
                ones,
                q,
                k,
                ql,
                kl,
                qid,
                kid,
                stats,
                prm,
                gradq,
                n,
                k.shape[0],
                d,
                q.stride(0),
                k.stride(0),
                gradq.stride(0),
            ),
            q.device,
            ATTACHED=False,
            **flags,
        )
    return loss, gradq, stats


def rll_backward(
    grad_rows: torch.Tensor,
    q: torch.Tensor,
    q_labels: torch.Tensor,
    q_ids: Optional[torch.Tensor],
    k: torch.Tensor,
    k_labels: torch.Tensor,
    k_ids: Optional[torch.Tensor],
    stats: torch.Tensor,
    alpha: float,
    beta: float,
    Tn: float,
    Tp: float,
    imbalance: float,
    den_bias: float,
    attached: bool,
    need_gq: bool,
    need_gk: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused RLL backward from the saved row statistics (same contract as ``rll_kernels::rll_bwd``)."""
    _check_inputs(q, q_labels, q_ids, k, k_labels, k_ids)
    _check_params(alpha, beta, imbalance, den_bias)
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    if grad_rows.dim() != 1 or grad_rows.shape[0] != n:
        raise ValueError(f"rll_triton_bwd: grad_rows must have shape ({n},), got {tuple(grad_rows.shape)}")
    if stats.dim() != 2 or stats.shape[0] != n or stats.shape[1] != 4:
        raise ValueError(f"rll_triton_bwd: stats must have shape ({n}, 4), got {tuple(stats.shape)}")
    gq = torch.zeros_like(q) if need_gq else q.new_empty(0)
    gk = torch.zeros_like(k) if need_gk else k.new_empty(0)
    if n == 0 or m == 0 or (not need_gq and not need_gk):
        return gq, gk
    acc = _acc_dtype(q.dtype)
    g = grad_rows.detach().to(acc).contiguous()
    st = stats.detach().to(acc).contiguous()
    qc, kc = q.detach().contiguous(), k.detach().contiguous()
    ql, kl = q_labels.contiguous(), k_labels.contiguous()
    qid, kid, has_ids = _ids_args(q_ids, k_ids, ql, kl)
    prm = _params(q, alpha, beta, Tn, Tp, imbalance, den_bias)
    flags = dict(HAS_IDS=has_ids, ATTACHED=attached, BLOCK_D=_block_d(d), **_dot_flags(q.dtype))
    if need_gq:
        _launch(
            "bwd_q",
            n,
            (g, qc, kc, ql, kl, qid, kid, st, prm, gq, n, m, d, qc.stride(0), kc.stride(0), gq.stride(0)),
            q.device,
            **flags,
        )
    if need_gk:
        _launch(
            "bwd_k",
            m,
            (g, qc, kc, ql, kl, qid, kid, st, prm, gk, n, m, d, qc.stride(0), kc.stride(0), gk.stride(0)),
            q.device,
            **flags,
        )
    return gq, gk
