"""Triton kernel of the OSM + CAA weighted contrastive loss (docs/semantics.md §4), behind the op
``rll_kernels::osm_triton_fwd`` (registered in rll_kernels/ops/osm.py).

One pass over the pair tiles, FlashAttention-forward style: program (row block I, feature chunk
c) streams every column block J, computes the distance tile from a ``tl.dot`` over D (the Gram
form and the duplicate rule of rll_kernels/triton/_tiles.py, shared with RLL), the constant pair
weights, and accumulates per row the unnormalised sums [S+, T+, S-, T-] and the unnormalised
gradients sum_j C_ij (z_i - z_j) of each set on its feature chunk (a second and third
``tl.dot``). Each row sees every column, so both ends of a pair get their gradient without atomics
(row sums count each unordered pair twice and are halved). The global normalisers S+ = sum w+,
S- = sum w- rescale the two gradients at the end, in torch ops on the device (no host sync).
Memory O(N D).

The op takes the raw embeddings (any strides): with ``normalize`` they are normalised first
(``_tiles.normalize_rows``: scale-safe norms, docs/semantics.md §1.4) and the gradient goes back
through the normalisation's Jacobian at the end (``_tiles.normalize_rows_backward``). A non-finite
row or an attention value outside (0, 1] gives a NaN loss and gradient without a host sync
(``RLL_STRICT_FINITE=1``: a ValueError, at the cost of a sync; docs/semantics.md §6).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests). ``tl.dot`` uses
``input_precision="ieee"``: TF32 distances would break the duplicate rule and the fp32 accuracy.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import dup_rel_tol
from . import hyper_params, interpret_mode, raise_if, strict_checks
from ._tiles import (
    gram_chunked,
    load_tile,
    normalize_rows,
    normalize_rows_backward,
    pair_distance,
    pair_sets,
    row_norms,
    store_gram_grad,
    store_row4,
)


@triton.jit
def _caa_weights(d, same, diff, ai, ATT, offs_n, mask_n, alpha, neg_inv_2s2, HAS_ATT: tl.constexpr):
    """(w+, w-, h = [alpha - d]_+, d^2) of a tile: w+ = a_ij e^{-d^2 / (2 sigma^2)} on positive pairs,
    w- = a_ij h on negative pairs, 0 elsewhere, a_ij = min(a_i, a_j) or 1 (docs/semantics.md §4.1)."""
    dd = d * d
    wp = tl.exp(dd * neg_inv_2s2)
    h = tl.maximum(alpha - d, 0.0)
    wn = h
    if HAS_ATT:
        aj = tl.load(ATT + offs_n, mask=mask_n, other=1.0)
        aij = tl.minimum(ai[:, None], aj[None, :])
        wp = wp * aij
        wn = wn * aij
    return tl.where(same, wp, 0.0), tl.where(diff, wn, 0.0), h, dd


@triton.jit
def _osm_rows_kernel(
    Z,
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
    BLOCK_D: tl.constexpr,
):
    # hyper-parameters in the value type (fp64 runs need them exact): [alpha, -1/(2 sigma^2), rel]
    alpha = tl.load(PRM)
    neg_inv_2s2 = tl.load(PRM + 1)
    rel = tl.load(PRM + 2)
    acc_t = PRM.dtype.element_ty
    pid_d = tl.program_id(1)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    mask_m = offs_m < N
    z_rows = Z + offs_m.to(tl.int64)[:, None] * D
    offs_d = pid_d * BD + tl.arange(0, BD)
    mask_d = offs_d < D
    nq = row_norms(z_rows, mask_m, D, PRM, BLOCK_D, BK)
    li = tl.load(LAB + offs_m, mask=mask_m, other=-1)
    ai = nq
    if HAS_ATT:
        ai = tl.load(ATT + offs_m, mask=mask_m, other=1.0)
    sp = tl.zeros([BM], dtype=acc_t)
    tp = tl.zeros([BM], dtype=acc_t)
    sn = tl.zeros([BM], dtype=acc_t)
    tn = tl.zeros([BM], dtype=acc_t)
    rsp = tl.zeros([BM], dtype=acc_t)
    rsn = tl.zeros([BM], dtype=acc_t)
    accp = tl.zeros([BM, BD], dtype=acc_t)
    accn = tl.zeros([BM, BD], dtype=acc_t)
    for j0 in range(0, N, BN):
        offs_n = j0 + tl.arange(0, BN)
        mask_n = offs_n < N
        zj_rows = Z + offs_n.to(tl.int64)[:, None] * D
        dot, nk = gram_chunked(z_rows, mask_m, zj_rows, mask_n, D, PRM, False, "ieee", BLOCK_D, BK)
        lj = tl.load(LAB + offs_n, mask=mask_n, other=-2)
        # a row is never paired with itself (docs/semantics.md §4.1): the positions act as ids
        same, diff = pair_sets(li, lj, offs_m, offs_n, mask_m, mask_n, True)
        d, inv = pair_distance(dot, nq[:, None], nk[None, :], rel)
        wp, wn, h, dd = _caa_weights(d, same, diff, ai, ATT, offs_n, mask_n, alpha, neg_inv_2s2, HAS_ATT)
        sp += tl.sum(wp, axis=1)
        tp += tl.sum(wp * dd, axis=1)
        sn += tl.sum(wn, axis=1)
        tn += tl.sum(wn * h * h, axis=1)
        if NEED_GRAD:
            # C+ = w+ (dL/dd = w+ d, direction (z_i - z_j)/d); C- = w- h / d; 0 for duplicates (1/d = 0)
            cp = tl.where(inv > 0.0, wp, 0.0)
            cn = wn * h * inv
            rsp += tl.sum(cp, axis=1)
            rsn += tl.sum(cn, axis=1)
            zj = load_tile(zj_rows, mask_n, offs_d, mask_d)
            accp = tl.dot(cp, zj, accp, input_precision="ieee", out_dtype=acc_t)
            accn = tl.dot(cn, zj, accn, input_precision="ieee", out_dtype=acc_t)
    if pid_d == 0:
        store_row4(ROWS, offs_m.to(tl.int64), mask_m, sp, tp, sn, tn)
    if NEED_GRAD:
        zi = load_tile(z_rows, mask_m, offs_d, mask_d)
        store_gram_grad(GP + offs_m.to(tl.int64)[:, None] * D, mask_m, offs_d, mask_d, rsp, zi, accp)
        store_gram_grad(GN + offs_m.to(tl.int64)[:, None] * D, mask_m, offs_d, mask_d, rsn, zi, accn)


def _blocks(d: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, BD, num_warps). Small blocks under the interpreter so tests cross tiles."""
    if interpret_mode():
        return 16, 16, 16, 16, 1
    bd = min(64, max(16, triton.next_power_of_2(d)))
    return 64, 32, 32, bd, 4


def _loss_and_set_scales(sums: torch.Tensor, imbalance: float, ok: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(loss, dL/dS+-weighted sum scale of each set) from the sums [S+, T+, S-, T-], on the device.

    L = (1 - lambda) T+ / (2 S+) + lambda T- / (2 S-) with an empty set contributing 0
    (docs/semantics.md §4.1, §4.5); the unnormalised set gradients scale by (1 - lambda) / S+ and
    -lambda / S- (§4.4). All three are NaN unless the 0-dim bool ``ok`` is true and the sums are
    finite (a non-finite row or a bad attention value: never a finite wrong loss). Torch ops on the
    (4,) tensor: no value reaches the host, so a CUDA call never synchronises."""
    sums = torch.where(ok & torch.isfinite(sums).all(), sums, float("nan"))
    s_p, t_p, s_n, t_n = sums.unbind()
    has_p, has_n = (s_p > 0) | s_p.isnan(), (s_n > 0) | s_n.isnan()
    s_p, s_n = torch.where(has_p, s_p, 1.0), torch.where(has_n, s_n, 1.0)
    loss = (1.0 - imbalance) * torch.where(has_p, 0.5 * t_p / s_p, 0.0) + imbalance * torch.where(
        has_n, 0.5 * t_n / s_n, 0.0
    )
    return loss, torch.where(has_p, (1.0 - imbalance) / s_p, 0.0), torch.where(has_n, -imbalance / s_n, 0.0)


def _inputs(x, attention, normalize: bool, strict: bool) -> tuple[torch.Tensor, ...]:
    """(rows the kernel reads, norms, attention, ok): z = x/|x| and |x| with ``normalize``, else the
    contiguous x; ``ok`` is a 0-dim device bool, false for a non-finite row or an attention value
    outside (0, 1]; strict: these raise instead (a sync)."""
    x = x.detach()
    if normalize:
        z, norms = torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(x.shape[0])
        normalize_rows(x, z, norms)
    else:
        z, norms = x.contiguous(), x.new_empty(0)
    finite = torch.isfinite(norms if normalize else z).all()
    att = attention.detach().to(x.dtype).contiguous() if attention is not None else x.new_empty(1)
    att_ok = ((att > 0) & (att <= 1)).all() if attention is not None else torch.ones_like(finite)
    if strict:
        raise_if(~finite, "embeddings contains NaN or Inf")
        raise_if(~att_ok, "attention values must lie in (0, 1]")
    return z, norms, att, finite & att_ok


def osm_forward(
    x: torch.Tensor,
    labels: torch.Tensor,
    attention: Optional[torch.Tensor],
    alpha: float,
    sigma: float,
    imbalance: float,
    normalize: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``rll_kernels::osm_fwd``: (loss (), dL/dx (N, D) or (0,), sums (4,) float64)."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"osm_triton_fwd: x must be 2-D float32/float64, got {tuple(x.shape)} {x.dtype}")
    z, norms, att, ok = _inputs(x, attention, normalize, strict_checks())
    n, d = z.shape
    prm = hyper_params(z, alpha, -0.5 / (sigma * sigma), dup_rel_tol(z.dtype))
    rows = z.new_empty(n, 4)
    gp = torch.empty_like(z) if need_grad else z.new_empty(1)
    gn = torch.empty_like(z) if need_grad else z.new_empty(1)
    bm, bn, bk, bd, nw = _blocks(d)
    grid = (triton.cdiv(n, bm), triton.cdiv(d, bd) if need_grad else 1)
    flags = dict(
        HAS_ATT=attention is not None, NEED_GRAD=need_grad, BLOCK_D=max(bk, triton.next_power_of_2(d))
    )
    args = (z, labels.contiguous(), att, prm, rows, gp, gn, n, d)
    if n > 0:
        _osm_rows_kernel[grid](*args, **flags, BM=bm, BN=bn, BK=bk, BD=bd, num_warps=nw)
    sums = rows.to(torch.float64).sum(0) * 0.5  # ordered pairs: every unordered pair counted twice
    loss, scale_p, scale_n = _loss_and_set_scales(sums, imbalance, ok)
    if not need_grad:
        return loss.to(z.dtype), z.new_empty(0), sums
    grad = gp.mul_(scale_p.to(z.dtype)).addcmul_(gn, scale_n.to(z.dtype))
    if normalize:  # dL/dx from dL/dz (docs/semantics.md §1.4)
        normalize_rows_backward(grad, z, norms)
    return loss.to(z.dtype), grad, sums
