"""Triton kernel of the OSM + CAA weighted contrastive loss (docs/semantics.md §4), behind the op
``rll_kernels::osm_triton_fwd`` (registered in rll_kernels/ops/osm.py).

One pass over the pair tiles, FlashAttention-forward style: program (row block I, feature chunk
c) streams every column block J, computes the distance tile from a ``tl.dot`` over D, the
constant pair weights, and accumulates per row the unnormalised sums [S+, T+, S-, T-] and the
unnormalised gradients sum_j C_ij (z_i - z_j) of each set on its feature chunk (a second and
third ``tl.dot``). Each row sees every column, so both ends of a pair get their gradient without
atomics (row sums count each unordered pair twice and are halved). The global normalisers
S+ = sum w+, S- = sum w- rescale the two gradients at the end, in PyTorch. Memory O(N D).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests). ``tl.dot`` uses
``input_precision="ieee"``: TF32 distances would break the duplicate rule and the fp32 accuracy.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import dup_rel_tol
from . import interpret_mode
from ._compat import patch_interpreter_scalar_index

if interpret_mode():
    patch_interpreter_scalar_index()


@triton.jit
def _osm_rows_kernel(
    Z,
    NRM,
    LAB,
    ATT,
    PRM,
    ROWS,
    GP,
    GN,
    N,
    D,
    HAS_ATT: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < N
    rows = offs_m.to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mask_d = offs_d < D
    # hyper-parameters in the value type (fp64 runs need them exact): [alpha, -1/(2 sigma^2), rel]
    alpha = tl.load(PRM)
    neg_inv_2s2 = tl.load(PRM + 1)
    rel = tl.load(PRM + 2)
    zero = alpha * 0
    nq = tl.load(NRM + offs_m, mask=mask_m, other=0.0)
    li = tl.load(LAB + offs_m, mask=mask_m, other=-1)
    if HAS_ATT:
        ai = tl.load(ATT + offs_m, mask=mask_m, other=1.0)
    sp = tl.zeros([BM], dtype=alpha.dtype)
    tp = tl.zeros([BM], dtype=alpha.dtype)
    sn = tl.zeros([BM], dtype=alpha.dtype)
    tn = tl.zeros([BM], dtype=alpha.dtype)
    rsp = tl.zeros([BM], dtype=alpha.dtype)
    rsn = tl.zeros([BM], dtype=alpha.dtype)
    accp = tl.zeros([BM, BD], dtype=alpha.dtype)
    accn = tl.zeros([BM, BD], dtype=alpha.dtype)
    for j0 in range(0, N, BN):
        offs_n = j0 + tl.arange(0, BN)
        mask_n = offs_n < N
        cols = offs_n.to(tl.int64)
        dot = tl.zeros([BM, BN], dtype=alpha.dtype)
        for k0 in range(0, D, BK):
            kk = k0 + offs_k
            mk = kk < D
            a = tl.load(Z + rows[:, None] * D + kk[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
            b = tl.load(Z + cols[None, :] * D + kk[:, None], mask=mk[:, None] & mask_n[None, :], other=0.0)
            dot = tl.dot(a, b, dot, input_precision="ieee", out_dtype=alpha.dtype)
        nk = tl.load(NRM + offs_n, mask=mask_n, other=0.0)
        lj = tl.load(LAB + offs_n, mask=mask_n, other=-2)
        tot = nq[:, None] + nk[None, :]
        d2 = tl.maximum(tot - 2.0 * dot, zero)
        dup = d2 <= rel * tot  # Gram-form duplicate: d = 0, no direction (csrc/rll_pair.h)
        d = tl.where(dup, zero, tl.sqrt(d2))
        valid = mask_m[:, None] & mask_n[None, :] & (offs_m[:, None] != offs_n[None, :])
        same = valid & (li[:, None] == lj[None, :])
        diff = valid & (li[:, None] != lj[None, :])
        dd = d * d
        wp = tl.exp(dd * neg_inv_2s2)
        h = tl.maximum(alpha - d, zero)
        wn = h
        if HAS_ATT:
            aj = tl.load(ATT + offs_n, mask=mask_n, other=1.0)
            aij = tl.minimum(ai[:, None], aj[None, :])
            wp = wp * aij
            wn = wn * aij
        wp = tl.where(same, wp, zero)
        wn = tl.where(diff, wn, zero)
        sp += tl.sum(wp, axis=1)
        tp += tl.sum(wp * dd, axis=1)
        sn += tl.sum(wn, axis=1)
        tn += tl.sum(wn * h * h, axis=1)
        if NEED_GRAD:
            # C+ = w+ (dL/dd = w+ d, direction (z_i - z_j)/d); C- = w- h / d; 0 for duplicates
            cp = tl.where(dup, zero, wp)
            cn = tl.where(dup, zero, wn * h / tl.maximum(d, 1e-30))
            rsp += tl.sum(cp, axis=1)
            rsn += tl.sum(cn, axis=1)
            zj = tl.load(
                Z + cols[:, None] * D + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
            )
            accp = tl.dot(cp, zj, accp, input_precision="ieee", out_dtype=alpha.dtype)
            accn = tl.dot(cn, zj, accn, input_precision="ieee", out_dtype=alpha.dtype)
    if pid_d == 0:
        tl.store(ROWS + rows * 4 + 0, sp, mask=mask_m)
        tl.store(ROWS + rows * 4 + 1, tp, mask=mask_m)
        tl.store(ROWS + rows * 4 + 2, sn, mask=mask_m)
        tl.store(ROWS + rows * 4 + 3, tn, mask=mask_m)
    if NEED_GRAD:
        md = mask_m[:, None] & mask_d[None, :]
        ptr = rows[:, None] * D + offs_d[None, :]
        zi = tl.load(Z + ptr, mask=md, other=0.0)
        tl.store(GP + ptr, rsp[:, None] * zi - accp, mask=md)
        tl.store(GN + ptr, rsn[:, None] * zi - accn, mask=md)


def _blocks(d: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, BD, num_warps). Small blocks under the interpreter so tests cross tiles."""
    if interpret_mode():
        return 16, 16, 16, 16, 1
    bd = min(64, max(16, triton.next_power_of_2(d)))
    return 64, 32, 32, bd, 4


def osm_forward(
    z: torch.Tensor,
    labels: torch.Tensor,
    attention: Optional[torch.Tensor],
    alpha: float,
    sigma: float,
    imbalance: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``rll_kernels::osm_fwd``: (loss (), dL/dz (N, D) or (0,), sums (4,) float64)."""
    if z.dim() != 2 or z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"osm_triton_fwd: z must be 2-D float32/float64, got {tuple(z.shape)} {z.dtype}")
    z = z.detach().contiguous()
    n, d = z.shape
    nrm = (z * z).sum(1).contiguous()
    prm = torch.tensor([alpha, -0.5 / (sigma * sigma), dup_rel_tol(z.dtype)], dtype=z.dtype, device=z.device)
    rows = torch.empty(n, 4, dtype=z.dtype, device=z.device)
    gp = torch.empty_like(z) if need_grad else z.new_empty(1)
    gn = torch.empty_like(z) if need_grad else z.new_empty(1)
    att = attention.detach().to(z.dtype).contiguous() if attention is not None else z.new_empty(1)
    bm, bn, bk, bd, nw = _blocks(d)
    grid = (triton.cdiv(n, bm), triton.cdiv(d, bd) if need_grad else 1)
    _osm_rows_kernel[grid](
        z,
        nrm,
        labels.contiguous(),
        att,
        prm,
        rows,
        gp,
        gn,
        n,
        d,
        HAS_ATT=attention is not None,
        NEED_GRAD=need_grad,
        BM=bm,
        BN=bn,
        BK=bk,
        BD=bd,
        num_warps=nw,
    )
    sums = rows.to(torch.float64).sum(0) * 0.5  # ordered pairs: every unordered pair counted twice
    s_p, t_p, s_n, t_n = (float(v) for v in sums.tolist())
    lp = 0.5 * t_p / s_p if s_p > 0 else 0.0
    ln = 0.5 * t_n / s_n if s_n > 0 else 0.0
    loss = torch.tensor((1.0 - imbalance) * lp + imbalance * ln, dtype=z.dtype, device=z.device)
    if need_grad:
        fp = (1.0 - imbalance) / s_p if s_p > 0 else 0.0
        fn = -imbalance / s_n if s_n > 0 else 0.0
        grad = gp.mul_(fp).add_(gn, alpha=fn)
    else:
        grad = z.new_empty(0)
    return loss, grad, sums
