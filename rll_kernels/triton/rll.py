r"""Triton backend of the Ranked List Loss (docs/semantics.md §2.6): the kernels and the launchers
behind the ops ``rll_kernels::rll_triton_fwd`` and ``rll_triton_bwd`` (registered in
rll_kernels/ops/rll.py with the schemas of rll_kernels/ops/_schemas.py, the same contract as the C++
``rll_fwd`` / ``rll_bwd``). They return:

* forward: (per-row losses (N,), the query gradient of each row's loss (N, D) when
  ``need_grad and not attached`` else (0,), row statistics (N, 4) = [log den_P, L_P, log den_N, L_N]);
* backward: (grad q (N, D) or (0,), grad k (M, D) or (0,)) from the saved statistics.

Three kernels, each one program per block of rows streaming the other side in tiles, so no N x M
matrix ever exists (memory O((N + M) D)):

* ``rll_fwd_kernel``: per block of BLOCK_M queries I, loop over gallery tiles J of BLOCK_N rows.
  ``tl.dot`` gives the Gram tile; d, the duplicate rule and the sets as in rll_kernels/triton/_tiles.py
  (strict set inequalities, -inf logits for non-members); per row and set an OnlineRow (m, l, a). With
  ``PAPER_GRAD`` it also accumulates the query gradient in the same pass: sum_j c_ij (z_i - z_j) =
  (sum_j c_ij) z_i - (C K)_i, one ``tl.dot`` per tile and set, rescaled when the running max moves.
* ``rll_bwd_q_kernel``: recomputes each tile from the saved statistics and forms G = dL/dd / d
  (weights attached or not); dq_i = (G 1)_i z_i - (G K)_i.
* ``rll_bwd_k_kernel``: the transposed pass, one program per block of gallery rows:
  dk_j = (G^T 1)_j k_j - (G^T Q)_j (FlashAttention's dK pass; no atomics).

Inputs may be fp32, fp64, fp16 or bf16. Accumulation is fp32 (fp64 for fp64 inputs); for half
inputs the row losses, statistics and the forward's query gradient are fp32, the backward's
gradients have the input dtype. Hyper-parameters reach the kernels as ``PRM`` = [alpha, beta, Tn, Tp,
lambda, den_bias, dup_rel] in the accumulation dtype (``hyper_params``).

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
from collections.abc import Callable
from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import compute_dtype, dup_rel_tol
from . import hyper_params, interpret_mode, raise_if, strict_checks
from ._tiles import (
    NEG_INF,
    gram_chunked,
    load_row4,
    load_rows,
    load_tile,
    normalize_backward,
    normalize_rows,
    online_finish,
    online_update,
    pair_distance,
    pair_sets,
    row_norms,
    store_row4,
    store_tile,
)

__all__ = ["INTERPRET", "rll_backward", "rll_forward"]


# ------------------------------------------------------------------ tile steps
@triton.jit
def _rll_params(PRM):
    """(alpha, beta, Tn, Tp, dup_rel) for the tiles, and (lambda, den_bias)."""
    hp = (tl.load(PRM + 0), tl.load(PRM + 1), tl.load(PRM + 2), tl.load(PRM + 3), tl.load(PRM + 6))
    return hp, tl.load(PRM + 4), tl.load(PRM + 5)


@triton.jit
def _labels_ids(L, ID, offs, ok, HAS_IDS: tl.constexpr):
    """Labels and ids of a block of rows. HAS_IDS: 0 no excluded pairs (the labels stand in for the
    ids), 1 ids from ID, 2 the row index (in-batch without ids: the pair i = i is excluded)."""
    lab = tl.load(L + offs, mask=ok, other=0)
    ids = lab
    if HAS_IDS == 1:
        ids = tl.load(ID + offs, mask=ok, other=0)
    if HAS_IDS == 2:
        ids = offs
    return lab, ids


@triton.jit
def _store_grad(rows, ok, offs_d, d_ok, row_sum, x, acc, NORMS, offs, NORMALIZE: tl.constexpr):
    """Store sum_j G_ij (x_i - y_j) = (G 1)_i x_i - (G Y)_i, w.r.t. the raw rows e_i when the rows x
    are z = e/|e| (NORMALIZE: through the normalisation's Jacobian, docs/semantics.md §1.4)."""
    g = row_sum[:, None] * x - acc
    if NORMALIZE:
        g = normalize_backward(g, x, tl.load(NORMS + offs, mask=ok, other=1.0).to(x.dtype))
    store_tile(rows, ok, offs_d, d_ok, g)


@triton.jit
def _nonfinite(n):
    """1 if a squared norm of ``n`` is Inf or NaN (masked rows hold 0), else 0."""
    return tl.max(((n - n) != 0.0).to(tl.int32), 0)


@triton.jit
def _own_rows(
    P, offs, ok, stride, D, PRM, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr, K_CHUNK: tl.constexpr
):
    """The program's block of rows: (row pointers, dot operand, rows in the accumulation dtype, squared
    norms); with K_CHUNK the tile is not kept (norms only; operand and copy are placeholders)."""
    rows = P + offs[:, None] * stride
    if K_CHUNK == 0:  # the whole block x D tile stays resident
        offs_d = tl.arange(0, BLOCK_D)
        x, xa, n = load_rows(rows, ok, offs_d, offs_d < D, PRM, UPCAST)
    else:
        n = row_norms(rows, ok, D, PRM, BLOCK_D, K_CHUNK)
        x = n
        xa = n
    return rows, x, xa, n


@triton.jit
def _acc_rows(xa, rows, ok, D, PRM, BLOCK_D: tl.constexpr, K_CHUNK: tl.constexpr):
    """The program's rows in the accumulation dtype: the resident copy, or read again with K_CHUNK."""
    if K_CHUNK > 0:
        offs_d = tl.arange(0, BLOCK_D)
        xa = load_tile(rows, ok, offs_d, offs_d < D).to(PRM.dtype.element_ty)
    return xa


@triton.jit
def _gram_tile(
    a,
    a_rows,
    a_ok,
    b_rows,
    b_ok,
    D,
    PRM,
    NEED_B: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_CHUNK: tl.constexpr,
    SWAP: tl.constexpr = False,
):
    """(Gram tile a b^T, squared norms of the streamed rows b, b in the accumulation dtype when
    ``NEED_B`` or resident). ``a`` is the resident operand; with K_CHUNK both sides are read in chunks.
    ``SWAP`` computes it as (b a^T)^T: the gallery-major key pass then gets each pair's dot product
    as the query-major passes round it, so the forward's statistics and the pair's hinge value agree
    to the last bit (at Tp = 1000 the "pml" weight derivative Tp (v - L_P) amplifies a one-ulp
    difference in v a thousandfold)."""
    if K_CHUNK == 0:
        offs_d = tl.arange(0, BLOCK_D)
        b, ba, nb = load_rows(b_rows, b_ok, offs_d, offs_d < D, PRM, UPCAST)
        if SWAP:
            dot = tl.trans(tl.dot(b, tl.trans(a), input_precision=PREC, out_dtype=PRM.dtype.element_ty))
        else:
            dot = tl.dot(a, tl.trans(b), input_precision=PREC, out_dtype=PRM.dtype.element_ty)
    else:
        dot, nb = gram_chunked(a_rows, a_ok, b_rows, b_ok, D, PRM, UPCAST, PREC, BLOCK_D, K_CHUNK, SWAP)
        ba = nb
        if NEED_B:  # the whole streamed tile, for the G Z product
            offs_d = tl.arange(0, BLOCK_D)
            ba = load_tile(b_rows, b_ok, offs_d, offs_d < D).to(PRM.dtype.element_ty)
    return dot, nb, ba


@triton.jit
def _hinge_logits(dot, nq, nk, same, diff, hp):
    """(sp, vp, sn, vn, 1/d) of a tile: vp = d - beta, vn = alpha - d, the logits sp = Tp vp on P_i
    (d > beta) and sn = Tn vn on N_i (d < alpha), -inf elsewhere (docs/semantics.md §2.1)."""
    alpha, beta, Tn, Tp, rel = hp
    d, inv = pair_distance(dot, nq, nk, rel)
    vp = d - beta
    vn = alpha - d
    sp = tl.where(same & (d > beta), Tp * vp, NEG_INF)
    sn = tl.where(diff & (d < alpha), Tn * vn, NEG_INF)
    return sp, vp, sn, vn, inv


@triton.jit
def _tile_G(dot, nq, nk, same, diff, wq_p, wq_n, stats, hp, ATTACHED: tl.constexpr):
    """G = dL/dd / d of a tile from the saved row statistics (docs/semantics.md §2.3; arguments
    broadcast to the tile): wq_p = (1 - lambda) g_i, wq_n = lambda g_i, stats = (log den_P, L_P,
    log den_N, L_N)."""
    lgp, Lp, lgn, Ln = stats
    alpha, beta, Tn, Tp, rel = hp
    sp, vp, sn, vn, inv = _hinge_logits(dot, nq, nk, same, diff, hp)
    pp = tl.exp(sp - tl.where(lgp == NEG_INF, 0.0, lgp))
    pn = tl.exp(sn - tl.where(lgn == NEG_INF, 0.0, lgn))
    if ATTACHED:
        cp = pp * (1.0 + Tp * (vp - Lp))
        cn = -pn * (1.0 + Tn * (vn - Ln))
    else:
        cp = pp
        cn = -pn
    return (wq_p * cp + wq_n * cn) * inv


@triton.jit
def _rescaled_gram_grad(cs, acc, f, c, y, PREC: tl.constexpr):
    """Running (sum_j c_ij, sum_j c_ij y_j) of a row block, the old sums rescaled by f (the running
    max moved)."""
    acc = acc * f[:, None] + tl.dot(c, y, input_precision=PREC, out_dtype=acc.dtype)
    return cs * f + tl.sum(c, 1), acc


@triton.jit
def _set_scale(m, logden, lam):
    """lam e^{m - log den}: the weight of a set's gradient sums, kept in units of e^m (0 if empty)."""
    return tl.where(logden == NEG_INF, 0.0, lam * tl.exp(m - tl.where(logden == NEG_INF, 0.0, logden)))


# ------------------------------------------------------------------ kernels
@triton.jit
def rll_fwd_kernel(
    Q,
    K,
    QL,
    KL,
    QID,
    KID,
    PRM,
    NORMS,
    LOSS,
    STATS,
    GQ,
    N,
    M,
    D,
    DEN_ROWS,
    stride_q,
    stride_k,
    stride_g,
    HAS_IDS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PAPER_GRAD: tl.constexpr,
    NORMALIZE: tl.constexpr,
    UPCAST_QK: tl.constexpr,
    PREC_QK: tl.constexpr,
    PREC_GZ: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_CHUNK: tl.constexpr = 0,
):
    acc_t = PRM.dtype.element_ty
    hp, lam, bias_per_row = _rll_params(PRM)
    bias = bias_per_row * DEN_ROWS  # PML's M * 1e-5 (docs/semantics.md §2.8)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    q_rows, q, qa, nq = _own_rows(Q, offs_m, row_ok, stride_q, D, PRM, UPCAST_QK, BLOCK_D, K_CHUNK)
    ql, qid = _labels_ids(QL, QID, offs_m, row_ok, HAS_IDS)
    bad = _nonfinite(nq)  # a non-finite row anywhere makes every loss NaN (docs/semantics.md §6)
    m_p = tl.full([BLOCK_M], NEG_INF, acc_t)
    l_p = tl.zeros([BLOCK_M], acc_t)
    a_p = tl.zeros([BLOCK_M], acc_t)
    m_n = tl.full([BLOCK_M], NEG_INF, acc_t)
    l_n = tl.zeros([BLOCK_M], acc_t)
    a_n = tl.zeros([BLOCK_M], acc_t)
    cs_p = tl.zeros([BLOCK_M], acc_t)
    cs_n = tl.zeros([BLOCK_M], acc_t)
    acc_p = tl.zeros([BLOCK_M, BLOCK_D], acc_t)
    acc_n = tl.zeros([BLOCK_M, BLOCK_D], acc_t)
    for j0 in range(0, M, BLOCK_N):
        offs_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = offs_n < M
        k_rows = K + offs_n[:, None] * stride_k
        dot, nk, ka = _gram_tile(
            q, q_rows, row_ok, k_rows, col_ok, D, PRM, PAPER_GRAD, UPCAST_QK, PREC_QK, BLOCK_D, K_CHUNK
        )
        kl, kid = _labels_ids(KL, KID, offs_n, col_ok, HAS_IDS)
        same, diff = pair_sets(ql, kl, qid, kid, row_ok, col_ok, HAS_IDS)
        bad = tl.maximum(bad, _nonfinite(nk))
        sp, vp, sn, vn, inv = _hinge_logits(dot, nq[:, None], nk[None, :], same, diff, hp)
        m_p, l_p, a_p, f_p, w_p = online_update(m_p, l_p, a_p, sp, vp)
        m_n, l_n, a_n, f_n, w_n = online_update(m_n, l_n, a_n, sn, vn)
        if PAPER_GRAD:
            cs_p, acc_p = _rescaled_gram_grad(cs_p, acc_p, f_p, w_p * inv, ka, PREC_GZ)
            cs_n, acc_n = _rescaled_gram_grad(cs_n, acc_n, f_n, w_n * inv, ka, PREC_GZ)
    L_p, lg_p = online_finish(m_p, l_p, a_p, bias, HAS_BIAS)
    L_n, lg_n = online_finish(m_n, l_n, a_n, bias, HAS_BIAS)
    loss = (1.0 - lam) * L_p + lam * L_n
    tl.store(LOSS + offs_m, tl.where(bad > 0, float("nan"), loss), mask=row_ok)
    store_row4(STATS, offs_m, row_ok, lg_p, L_p, lg_n, L_n)
    if PAPER_GRAD:
        # dL/dz_i = sum_set +-lambda_set e^{m - logden} (csum z_i - acc_i)
        fp = _set_scale(m_p, lg_p, 1.0 - lam)
        fn = _set_scale(m_n, lg_n, -lam)
        qa = _acc_rows(qa, q_rows, row_ok, D, PRM, BLOCK_D, K_CHUNK)
        acc = fp[:, None] * acc_p + fn[:, None] * acc_n
        offs_d = tl.arange(0, BLOCK_D)
        g_rows = GQ + offs_m[:, None] * stride_g
        _store_grad(
            g_rows, row_ok, offs_d, offs_d < D, fp * cs_p + fn * cs_n, qa, acc, NORMS, offs_m, NORMALIZE
        )


@triton.jit
def rll_bwd_q_kernel(
    GR,
    Q,
    K,
    QL,
    KL,
    QID,
    KID,
    STATS,
    PRM,
    NORMS,
    GQ,
    N,
    M,
    D,
    stride_q,
    stride_k,
    stride_g,
    HAS_IDS: tl.constexpr,
    ATTACHED: tl.constexpr,
    NORMALIZE: tl.constexpr,
    UPCAST_QK: tl.constexpr,
    PREC_QK: tl.constexpr,
    PREC_GZ: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_CHUNK: tl.constexpr = 0,
):
    acc_t = PRM.dtype.element_ty
    hp, lam, _ = _rll_params(PRM)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    q_rows, q, qa, nq = _own_rows(Q, offs_m, row_ok, stride_q, D, PRM, UPCAST_QK, BLOCK_D, K_CHUNK)
    ql, qid = _labels_ids(QL, QID, offs_m, row_ok, HAS_IDS)
    g_row = tl.load(GR + offs_m, mask=row_ok, other=0.0).to(acc_t)
    lgp, Lp, lgn, Ln = load_row4(STATS, offs_m, row_ok, PRM)
    stats = (lgp[:, None], Lp[:, None], lgn[:, None], Ln[:, None])
    wq_p = ((1.0 - lam) * g_row)[:, None]
    wq_n = (lam * g_row)[:, None]
    rs = tl.zeros([BLOCK_M], acc_t)
    acc = tl.zeros([BLOCK_M, BLOCK_D], acc_t)
    for j0 in range(0, M, BLOCK_N):
        offs_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = offs_n < M
        k_rows = K + offs_n[:, None] * stride_k
        dot, nk, ka = _gram_tile(
            q, q_rows, row_ok, k_rows, col_ok, D, PRM, True, UPCAST_QK, PREC_QK, BLOCK_D, K_CHUNK
        )
        kl, kid = _labels_ids(KL, KID, offs_n, col_ok, HAS_IDS)
        same, diff = pair_sets(ql, kl, qid, kid, row_ok, col_ok, HAS_IDS)
        G = _tile_G(dot, nq[:, None], nk[None, :], same, diff, wq_p, wq_n, stats, hp, ATTACHED)
        rs += tl.sum(G, 1)
        acc += tl.dot(G, ka, input_precision=PREC_GZ, out_dtype=acc_t)
    qa = _acc_rows(qa, q_rows, row_ok, D, PRM, BLOCK_D, K_CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    _store_grad(
        GQ + offs_m[:, None] * stride_g, row_ok, offs_d, offs_d < D, rs, qa, acc, NORMS, offs_m, NORMALIZE
    )


@triton.jit
def rll_bwd_k_kernel(
    GR,
    Q,
    K,
    QL,
    KL,
    QID,
    KID,
    STATS,
    PRM,
    NORMS,
    GK,
    N,
    M,
    D,
    stride_q,
    stride_k,
    stride_g,
    HAS_IDS: tl.constexpr,
    ATTACHED: tl.constexpr,
    NORMALIZE: tl.constexpr,
    UPCAST_QK: tl.constexpr,
    PREC_QK: tl.constexpr,
    PREC_GZ: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_CHUNK: tl.constexpr = 0,
):
    # one program per BLOCK_N gallery rows J; loops over query tiles I (tiles are gallery-major)
    acc_t = PRM.dtype.element_ty
    hp, lam, _ = _rll_params(PRM)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < M
    k_rows, k, ka, nk = _own_rows(K, offs_n, col_ok, stride_k, D, PRM, UPCAST_QK, BLOCK_D, K_CHUNK)
    kl, kid = _labels_ids(KL, KID, offs_n, col_ok, HAS_IDS)
    cs = tl.zeros([BLOCK_N], acc_t)
    acc = tl.zeros([BLOCK_N, BLOCK_D], acc_t)
    for i0 in range(0, N, BLOCK_M):
        offs_m = (i0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = offs_m < N
        q_rows = Q + offs_m[:, None] * stride_q
        dot, nq, qa = _gram_tile(
            k, k_rows, col_ok, q_rows, row_ok, D, PRM, True, UPCAST_QK, PREC_QK, BLOCK_D, K_CHUNK, True
        )  # (BLOCK_N, BLOCK_M), rounded as the query-major passes round it
        ql, qid = _labels_ids(QL, QID, offs_m, row_ok, HAS_IDS)
        same, diff = pair_sets(kl, ql, kid, qid, col_ok, row_ok, HAS_IDS)
        g_row = tl.load(GR + offs_m, mask=row_ok, other=0.0).to(acc_t)
        lgp, Lp, lgn, Ln = load_row4(STATS, offs_m, row_ok, PRM)
        stats = (lgp[None, :], Lp[None, :], lgn[None, :], Ln[None, :])
        wq_p = ((1.0 - lam) * g_row)[None, :]
        wq_n = (lam * g_row)[None, :]
        GT = _tile_G(dot, nq[None, :], nk[:, None], same, diff, wq_p, wq_n, stats, hp, ATTACHED)
        cs += tl.sum(GT, 1)
        acc += tl.dot(GT, qa, input_precision=PREC_GZ, out_dtype=acc_t)
    # dL/dk_j = sum_i G_ij (k_j - q_i)
    ka = _acc_rows(ka, k_rows, col_ok, D, PRM, BLOCK_D, K_CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    _store_grad(
        GK + offs_n[:, None] * stride_g, col_ok, offs_d, offs_d < D, cs, ka, acc, NORMS, offs_n, NORMALIZE
    )


# ------------------------------------------------------------------ launch settings
# TRITON_INTERPRET is read when @triton.jit decorates a kernel (at import of this module)
INTERPRET = interpret_mode()
_HALF = (torch.float16, torch.bfloat16)
_DTYPES = (torch.float32, torch.float64) + _HALF
_FP32_PRECISIONS = ("tf32x3", "ieee", "tf32", "mixed")

_KERNELS = {"fwd": rll_fwd_kernel, "bwd_q": rll_bwd_q_kernel, "bwd_k": rll_bwd_k_kernel}

# Under the interpreter programs run serially in Python: few programs, large blocks.
# (BLOCK_M, BLOCK_N[, K_CHUNK]); K_CHUNK = 0 keeps the whole D of a tile resident.
_INTERP_BLOCKS = {"fwd": (32, 64), "bwd_q": (32, 64), "bwd_k": (64, 32)}


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
# against Triton's AOT compile for sm_90 (python -m rll_kernels.triton._aot): within +-50%, and a
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


def _prune(kind: str, cap: int) -> Callable[..., list]:
    """early_config_prune: drop configs whose register accumulators or staged tiles overflow."""

    def prune(configs: list, named_args: dict, **kwargs) -> list:
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
def _tuned(kind: str, cap: int) -> triton.runtime.Autotuner:
    # BLOCK_D (D rounded up to a power of 2) rather than D: one tuning per size class, not per D
    key = ["BLOCK_D", "HAS_IDS", "NORMALIZE"] + (
        ["PAPER_GRAD", "HAS_BIAS"] if kind == "fwd" else ["ATTACHED"]
    )
    return triton.autotune(
        configs=_configs(cap),
        key=key,
        prune_configs_by={"early_config_prune": _prune(kind, 90 if cap >= 90 else 80)},
    )(_KERNELS[kind])


def _configs(cap: int) -> list[triton.Config]:
    table = _CONFIGS[90 if cap >= 90 else 80]
    return [
        triton.Config(
            {"BLOCK_M": t[0], "BLOCK_N": t[1], "K_CHUNK": t[4] if len(t) > 4 else 0},
            num_warps=t[2],
            num_stages=t[3],
        )
        for t in table
    ]


def pick_config(kind: str, cap: int, args: tuple, flags: dict) -> triton.Config:
    """The first launch configuration that survives pruning (no timing): RLL_TRITON_AUTOTUNE=0."""
    named = dict(zip(_KERNELS[kind].arg_names, args))
    return _prune(kind, 90 if cap >= 90 else 80)(_configs(cap), named, **flags)[0]


def _launch(kind: str, grid_rows: int, args: tuple, device: torch.device, **flags) -> None:
    """Launch one kernel: fixed blocks under the interpreter, autotuned on a GPU (RLL_TRITON_AUTOTUNE=0:
    the first configuration that fits, without timing; what the GPU test run uses)."""
    row_block = "BLOCK_N" if kind == "bwd_k" else "BLOCK_M"
    fn = _KERNELS[kind]
    if INTERPRET or device.type != "cuda":
        bm, bn, *kc = _INTERP_BLOCKS[kind]
        blk = {"BLOCK_M": bm, "BLOCK_N": bn, "K_CHUNK": kc[0] if kc else 0}
        fn[(triton.cdiv(grid_rows, blk[row_block]),)](*args, **flags, **blk, num_warps=4)
        return
    major, minor = torch.cuda.get_device_capability(device)
    cap = major * 10 + minor
    with torch.cuda.device(device):
        if os.environ.get("RLL_TRITON_AUTOTUNE", "1") == "0":
            c = pick_config(kind, cap, args, flags)
            grid = (triton.cdiv(grid_rows, c.kwargs[row_block]),)
            fn[grid](*args, **flags, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            return
        _tuned(kind, cap)[lambda meta: (triton.cdiv(grid_rows, meta[row_block]),)](*args, **flags)


# ------------------------------------------------------------------ argument checks
def _check_index(name: str, t: torch.Tensor, n: int) -> None:
    if t.dim() != 1 or t.shape[0] != n or t.dtype != torch.int64:
        raise ValueError(f"rll_triton: {name} must be int64 of shape ({n},), got {t.dtype} {tuple(t.shape)}")


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"rll_triton: {name} must be 2-D, got {x.dim()}-D")
    if x.dtype not in _DTYPES:
        raise ValueError(f"rll_triton: {name} must be one of {_DTYPES}, got {x.dtype}")


def _check_inputs(q, q_labels, q_ids, k, k_labels, k_ids) -> None:
    """In-batch (``k`` None): no gallery labels or ids; else k with the queries' D and dtype."""
    _check_rows("q", q)
    _check_index("q_labels", q_labels, q.shape[0])
    if q_ids is not None:
        _check_index("q_ids", q_ids, q.shape[0])
    tensors = [q, q_labels, q_ids]
    if k is None:
        if k_labels is not None or k_ids is not None:
            raise ValueError("rll_triton: k_labels and k_ids need k (in-batch: all three absent)")
    else:
        _check_rows("k", k)
        if q.shape[1] != k.shape[1]:
            raise ValueError(
                f"rll_triton: q and k must have the same embedding size, got {q.shape[1]} and {k.shape[1]}"
            )
        if q.dtype != k.dtype:
            raise ValueError(f"rll_triton: q and k must have the same dtype, got {q.dtype} and {k.dtype}")
        if k_labels is None:
            raise ValueError("rll_triton: k_labels must be given with k")
        _check_index("k_labels", k_labels, k.shape[0])
        if (q_ids is None) != (k_ids is None):
            raise ValueError("rll_triton: q_ids and k_ids must be given together")
        if k_ids is not None:
            _check_index("k_ids", k_ids, k.shape[0])
        tensors += [k, k_labels, k_ids]
    for t in tensors:
        if t is not None and t.device != q.device:
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


def _raise_nonfinite(x: torch.Tensor, norms: Optional[torch.Tensor], name: str) -> None:
    """The strict check on the rows (or their norms): a ValueError naming the tensor (a device sync)."""
    raise_if(~torch.isfinite(norms if norms is not None else x).all(), f"{name} contains NaN or Inf")


# ------------------------------------------------------------------ launchers
class _Operands:
    """The rows as the kernels read them (docs/semantics.md §1.4): with ``normalize`` z = e/|e| of the
    queries and (unless in-batch) the gallery in one contiguous tensor and their norms |e|; else the
    raw rows with unit column stride. In-batch, k is q."""

    def __init__(self, q, k, z, norms, normalize: bool):
        n = q.shape[0]
        self.normalize = normalize
        if normalize:
            self.q, self.k = z[:n], (z[:n] if k is None else z[n:])
            self.q_norms, self.k_norms = norms[:n], (norms[:n] if k is None else norms[n:])
            return
        self.q = _unit_column_stride(q.detach())
        self.k = self.q if k is None else _unit_column_stride(k.detach())
        self.q_norms = self.k_norms = self.q  # placeholder pointers, never read


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def _normalized(q, k, strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, norms) of the queries and, unless in-batch, the gallery: one pass over each input."""
    n, d = q.shape
    rows = n if k is None else n + k.shape[0]
    z = q.new_empty(rows, d)
    norms = q.new_empty(rows, dtype=compute_dtype(q.dtype))
    normalize_rows(q.detach(), z[:n], norms[:n])
    if k is not None:
        normalize_rows(k.detach(), z[n:], norms[n:])
    if strict:
        _raise_nonfinite(q, norms[:n], "embeddings")
        if k is not None:
            _raise_nonfinite(k, norms[n:], "ref_emb")
    return z, norms


def _ids(q_labels, q_ids, k_labels, k_ids, in_batch: bool) -> tuple[tuple[torch.Tensor, ...], int]:
    """(q_labels, k_labels, q_ids, k_ids) as the kernels read them and their HAS_IDS (0: no excluded
    pairs, 1: ids, 2: the row index in-batch); missing ids are typed placeholders, never read."""
    ql = q_labels.contiguous()
    kl = ql if in_batch else k_labels.contiguous()
    if q_ids is None:
        return (ql, kl, ql, kl), 2 if in_batch else 0
    qi = q_ids.contiguous()
    return (ql, kl, qi, qi if in_batch else k_ids.contiguous()), 1


def _bwd_args(g, op: _Operands, ids, stats, prm, norms, out) -> tuple:
    """The argument list of rll_bwd_q_kernel / rll_bwd_k_kernel."""
    n, m, d = op.q.shape[0], op.k.shape[0], op.q.shape[1]
    ql, kl, qid, kid = ids
    q, k = op.q, op.k
    return (
        g,
        q,
        k,
        ql,
        kl,
        qid,
        kid,
        stats,
        prm,
        norms,
        out,
        n,
        m,
        d,
        q.stride(0),
        k.stride(0),
        out.stride(0),
    )


def rll_forward(
    q: torch.Tensor,
    q_labels: torch.Tensor,
    q_ids: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    k_labels: Optional[torch.Tensor],
    k_ids: Optional[torch.Tensor],
    alpha: float,
    beta: float,
    Tn: float,
    Tp: float,
    imbalance: float,
    bias_per_row: float,
    den_rows: Optional[int],
    normalize: bool,
    attached: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, ...]:
    """Fused RLL forward on a Triton kernel (same arguments and outputs as ``rll_kernels::rll_fwd``)."""
    _check_inputs(q, q_labels, q_ids, k, k_labels, k_ids)
    n, d = q.shape
    m = n if k is None else k.shape[0]
    den = m if den_rows is None else den_rows
    _check_params(alpha, beta, imbalance, bias_per_row * den)
    paper_grad = need_grad and not attached
    acc = compute_dtype(q.dtype)
    loss = q.new_empty(n, dtype=acc)
    stats = q.new_empty(n, 4, dtype=acc)
    gradq = q.new_empty((n, d) if paper_grad else (0,), dtype=acc)
    strict = strict_checks()
    z, norms = _normalized(q, k, strict) if normalize else (q.new_empty(0), q.new_empty(0, dtype=acc))
    if strict and not normalize:
        _raise_nonfinite(q, None, "embeddings")
        if k is not None:
            _raise_nonfinite(k, None, "ref_emb")
    if n == 0:
        return loss, gradq, stats, z, norms
    op = _Operands(q, k, z, norms, normalize)
    ids, has_ids = _ids(q_labels, q_ids, k_labels, k_ids, k is None)
    prm = hyper_params(q, alpha, beta, Tn, Tp, imbalance, bias_per_row, dup_rel_tol(acc))
    one_pass = paper_grad and d <= _one_pass_max_d()
    g_arg = gradq if one_pass else loss  # placeholder pointer when no gradient is written
    ql, kl, qid, kid = ids
    dims = (n, m, d, den, op.q.stride(0), op.k.stride(0), g_arg.stride(0) if one_pass else d)
    flags = dict(HAS_IDS=has_ids, BLOCK_D=_block_d(d), NORMALIZE=normalize, **_dot_flags(q.dtype))
    args = (op.q, op.k, ql, kl, qid, kid, prm, op.q_norms, loss, stats, g_arg) + dims
    _launch("fwd", n, args, q.device, HAS_BIAS=bias_per_row > 0.0, PAPER_GRAD=one_pass, **flags)
    if paper_grad and not one_pass:
        # large D: the query gradient of every row (grad_rows = 1) from the saved statistics
        ones = q.new_ones(n, dtype=acc)
        _launch(
            "bwd_q",
            n,
            _bwd_args(ones, op, ids, stats, prm, op.q_norms, gradq),
            q.device,
            ATTACHED=False,
            **flags,
        )
    return loss, gradq, stats, z, norms


def rll_backward(
    grad_rows: torch.Tensor,
    q: torch.Tensor,
    q_labels: torch.Tensor,
    q_ids: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    k_labels: Optional[torch.Tensor],
    k_ids: Optional[torch.Tensor],
    stats: torch.Tensor,
    z: torch.Tensor,
    norms: torch.Tensor,
    alpha: float,
    beta: float,
    Tn: float,
    Tp: float,
    imbalance: float,
    bias_per_row: float,
    den_rows: Optional[int],
    normalize: bool,
    attached: bool,
    need_gq: bool,
    need_gk: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused RLL backward from the saved row statistics (same contract as ``rll_kernels::rll_bwd``);
    in-batch the whole gradient (both ends of every pair for "pml") is grad q."""
    _check_inputs(q, q_labels, q_ids, k, k_labels, k_ids)
    n, d = q.shape
    in_batch = k is None
    m = n if in_batch else k.shape[0]
    _check_params(alpha, beta, imbalance, bias_per_row * (m if den_rows is None else den_rows))
    if grad_rows.dim() != 1 or grad_rows.shape[0] != n:
        raise ValueError(f"rll_triton_bwd: grad_rows must have shape ({n},), got {tuple(grad_rows.shape)}")
    if stats.dim() != 2 or stats.shape[0] != n or stats.shape[1] != 4:
        raise ValueError(f"rll_triton_bwd: stats must have shape ({n}, 4), got {tuple(stats.shape)}")
    need_gk = need_gk and not in_batch
    gq = q.new_zeros(n, d) if need_gq else q.new_empty(0)
    gk = q.new_zeros(m, d) if need_gk else q.new_empty(0)
    if n == 0 or m == 0 or (not need_gq and not need_gk):
        return gq, gk
    acc = compute_dtype(q.dtype)
    g = grad_rows.detach().to(acc).contiguous()
    st = stats.detach().to(acc).contiguous()
    op = _Operands(q, k, z.detach(), norms.detach(), normalize)
    ids, has_ids = _ids(q_labels, q_ids, k_labels, k_ids, in_batch)
    prm = hyper_params(q, alpha, beta, Tn, Tp, imbalance, bias_per_row, dup_rel_tol(acc))
    flags = dict(
        HAS_IDS=has_ids, ATTACHED=attached, BLOCK_D=_block_d(d), NORMALIZE=normalize, **_dot_flags(q.dtype)
    )
    if need_gq:
        _launch("bwd_q", n, _bwd_args(g, op, ids, st, prm, op.q_norms, gq), q.device, **flags)
    if need_gk or (in_batch and attached and need_gq):
        # in-batch "pml": the gallery ends of the pairs go to the same rows
        out = gk if need_gk else torch.zeros_like(gq)
        _launch("bwd_k", m, _bwd_args(g, op, ids, st, prm, op.k_norms, out), q.device, **flags)
        if not need_gk:
            gq += out
    return gq, gk
