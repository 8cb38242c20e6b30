"""Fused SoftTriple loss in Triton (docs/semantics.md §3): the launchers behind the ops
``rll_kernels::softtriple_triton_fwd`` and ``softtriple_triton_bwd`` (registered in
rll_kernels/ops/softtriple.py; the same contract as the C++ ``softtriple_fwd`` / ``softtriple_bwd``).

x (N, D) are the raw embeddings (any strides): with ``normalize`` they are normalised first
(``_tiles.normalize_rows``: scale-safe norms, docs/semantics.md §1.4) into the z the forward returns,
and the backward applies the normalisation's Jacobian to dL/dz (``_tiles.normalize_rows_backward``).
w (D, C*K) is the raw center parameter, normalised per column on the fly (r_ck = 1 / |w_ck|, scale-safe,
0 for a zero column). No host sync: a non-finite row or column, or a label outside [0, C), gives a
NaN loss and gradient (``RLL_STRICT_FINITE=1``: a ValueError, at the cost of a sync;
docs/semantics.md §6). A tile holds BC classes x KP center slots (KP = next power of 2 of
K, the slots k >= K masked), so the logits tile of a row block is one GEMM (loop over D chunks),
reshaped to (BM, BC, KP) for the segmented K-softmax.

- forward, one program per row block: streams all class tiles with an online log-sum-exp and writes
  l_i = LSE_i - z_{i, y_i} and LSE_i; nothing N x C*K is stored.
- backward, two kernels that recompute the tiles: dX (one program per row block and class split,
  partial sums per split, reduced in PyTorch: deterministic, no atomics) and dW (one program per
  class tile, which owns its columns of dW over all row blocks, then applies F.normalize's
  projection dW_ck -= (r_ck sum_i G_ick s_ick) (r_ck w_ck)).

The ops are registered for CPU and CUDA tensors, so they also run on CPU tensors under
``TRITON_INTERPRET=1`` (tests). GEMMs use ``input_precision="ieee"`` (no TF32) so float32 matches
the reference to the derived tolerance.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import hyper_params, raise_if, strict_checks
from ._tiles import (
    load_tile,
    normalize_rows,
    normalize_rows_backward,
    online_rescale,
    safe_row_norms,
    store_tile,
)

__all__ = ["softtriple_backward", "softtriple_forward"]


@triton.jit
def _softtriple_params(PRM):
    """(1/gamma, la, la * margin) (docs/semantics.md §3.1)."""
    return tl.load(PRM + 0), tl.load(PRM + 1), tl.load(PRM + 2)


@triton.jit
def _logits_tile(x_rows, mask_m, w_ptr, col, valid_j, rn_ptr, D, stride_wd, BD: tl.constexpr):
    """s[m, j] = x_m . w_col(j) / |w_col(j)| for a row block and a class tile (0 where masked)."""
    acc = tl.zeros((mask_m.shape[0], col.shape[0]), dtype=x_rows.dtype.element_ty)  # float32 or float64
    for d0 in range(0, D, BD):
        offs_d = (d0 + tl.arange(0, BD)).to(tl.int64)
        mask_d = offs_d < D
        xb = load_tile(x_rows, mask_m, offs_d, mask_d)
        wb = load_tile(w_ptr + offs_d[:, None] * stride_wd, mask_d, col, valid_j)
        acc += tl.dot(xb, wb, input_precision="ieee")
    rn = tl.load(rn_ptr + col, mask=valid_j, other=0.0)
    return acc * rn[None, :]


@triton.jit
def _add_to_tile(rows, ok, offs_c, c_ok, value):
    """rows[:, offs_c] += value (a tile this program owns: no atomics)."""
    store_tile(rows, ok, offs_c, c_ok, load_tile(rows, ok, offs_c, c_ok) + value)


@triton.jit
def _class_sims(s, valid_j, inv_gamma, BM: tl.constexpr, BC: tl.constexpr, KP: tl.constexpr):
    """Segmented K-softmax of a logits tile: (S (BM, BC), e (BM, BC, KP), den (BM, BC))."""
    s3 = tl.reshape(s, (BM, BC, KP))
    v3 = tl.reshape(valid_j, (1, BC, KP))
    t = tl.where(v3, s3 * inv_gamma, -1.0e30)
    mx = tl.max(t, axis=2)
    e = tl.where(v3, tl.exp(t - mx[:, :, None]), 0.0)
    den = tl.sum(e, axis=2)
    den = tl.where(den > 0, den, 1.0)  # classes past C: no valid slot
    num = tl.sum(e * s3, axis=2)
    return num / den, e, den


@triton.jit
def _grad_tile(
    s, y, lse, g_row, mask_m, c0, C, valid_j, hp, BM: tl.constexpr, BC: tl.constexpr, KP: tl.constexpr
):
    """G[m, j] = dL/ds for a tile: g_i la (P_ic - [c = y_i]) q_ick (1 + (s_ick - S_ic)/gamma)."""
    inv_gamma, la, la_margin = hp
    S, e, den = _class_sims(s, valid_j, inv_gamma, BM, BC, KP)
    cls = c0 + tl.arange(0, BC)
    is_y = (cls[None, :] == y[:, None]).to(S.dtype)
    z = la * S - la_margin * is_y
    p = tl.exp(z - lse[:, None])
    # rows past N and classes past C get exactly 0 (a select: an overflowed p there cannot leak);
    # a row whose label is outside [0, C) gets NaN (docs/semantics.md §6)
    a = tl.where(mask_m[:, None] & (cls[None, :] < C), g_row[:, None] * la * (p - is_y) / den, 0.0)
    a = tl.where((mask_m & ((y < 0) | (y >= C)))[:, None], float("nan"), a)
    s3 = tl.reshape(s, (BM, BC, KP))
    g3 = a[:, :, None] * e * (1.0 + (s3 - S[:, :, None]) * inv_gamma)
    return tl.reshape(g3, (BM, BC * KP))


@triton.jit
def _tile_columns(c0, C, K, BC: tl.constexpr, KP: tl.constexpr):
    j = tl.arange(0, BC * KP)
    cls = c0 + j // KP
    kk = j % KP
    valid_j = (kk < K) & (cls < C)
    col = tl.where(valid_j, cls.to(tl.int64) * K + kk, 0)
    return col, valid_j


@triton.jit
def _row_inputs(y_ptr, lse_ptr, g_ptr, offs_m, mask_m):
    """Labels, saved log-sum-exp and upstream gradient of a block of rows."""
    y = tl.load(y_ptr + offs_m, mask=mask_m, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    return y, lse, tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)


@triton.jit
def _st_fwd_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    rn_ptr,
    loss_ptr,
    lse_ptr,
    PRM,
    N,
    D,
    C,
    K,
    stride_xn,
    stride_wd,
    BM: tl.constexpr,
    BC: tl.constexpr,
    KP: tl.constexpr,
    BD: tl.constexpr,
):
    inv_gamma, la, la_margin = _softtriple_params(PRM)
    offs_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    mask_m = offs_m < N
    x_rows = x_ptr + offs_m[:, None] * stride_xn
    y = tl.load(y_ptr + offs_m, mask=mask_m, other=-1)
    dt = loss_ptr.dtype.element_ty
    m_i = tl.full((BM,), -1.0e30, dtype=dt)
    l_i = tl.zeros((BM,), dtype=dt)
    zt = tl.zeros((BM,), dtype=dt)
    for c0 in range(0, C, BC):
        col, valid_j = _tile_columns(c0, C, K, BC, KP)
        s = _logits_tile(x_rows, mask_m, w_ptr, col, valid_j, rn_ptr, D, stride_wd, BD)
        S, e, den = _class_sims(s, valid_j, inv_gamma, BM, BC, KP)
        cls = c0 + tl.arange(0, BC)
        is_y = cls[None, :] == y[:, None]
        z = la * S - la_margin * is_y.to(S.dtype)
        z = tl.where(cls[None, :] < C, z, -1.0e30)
        zt += tl.sum(tl.where(is_y, z, 0.0), axis=1)
        m_i, f, w = online_rescale(m_i, z)
        l_i = l_i * f + tl.sum(w, axis=1)
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + offs_m, lse, mask=mask_m)
    # a label outside [0, C) has no target logit: NaN, never a finite wrong loss (docs/semantics.md §6)
    tl.store(loss_ptr + offs_m, tl.where((y < 0) | (y >= C), float("nan"), lse - zt), mask=mask_m)


@triton.jit
def _st_bwd_dx_kernel(
    g_ptr,
    x_ptr,
    y_ptr,
    w_ptr,
    rn_ptr,
    lse_ptr,
    gxp_ptr,
    PRM,
    N,
    D,
    C,
    K,
    stride_xn,
    stride_wd,
    SPLIT,
    BM: tl.constexpr,
    BC: tl.constexpr,
    KP: tl.constexpr,
    BD: tl.constexpr,
):
    hp = _softtriple_params(PRM)
    split = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    mask_m = offs_m < N
    x_rows = x_ptr + offs_m[:, None] * stride_xn
    y, lse, g_row = _row_inputs(y_ptr, lse_ptr, g_ptr, offs_m, mask_m)
    part_rows = gxp_ptr + split * N * D + offs_m[:, None] * D  # this split's rows: owned, no atomics
    for c0 in range(split * BC, C, SPLIT * BC):
        col, valid_j = _tile_columns(c0, C, K, BC, KP)
        s = _logits_tile(x_rows, mask_m, w_ptr, col, valid_j, rn_ptr, D, stride_wd, BD)
        g = _grad_tile(s, y, lse, g_row, mask_m, c0, C, valid_j, hp, BM, BC, KP)
        g = g * tl.load(rn_ptr + col, mask=valid_j, other=0.0)[None, :]
        for d0 in range(0, D, BD):
            offs_d = (d0 + tl.arange(0, BD)).to(tl.int64)
            mask_d = offs_d < D
            wb = load_tile(w_ptr + offs_d[:, None] * stride_wd, mask_d, col, valid_j)
            gx = tl.dot(g, tl.trans(wb), input_precision="ieee")
            _add_to_tile(part_rows, mask_m, offs_d, mask_d, gx)


@triton.jit
def _st_bwd_dw_kernel(
    g_ptr,
    x_ptr,
    y_ptr,
    w_ptr,
    rn_ptr,
    lse_ptr,
    gw_ptr,
    PRM,
    N,
    D,
    C,
    K,
    stride_xn,
    stride_wd,
    BM: tl.constexpr,
    BC: tl.constexpr,
    KP: tl.constexpr,
    BD: tl.constexpr,
):
    hp = _softtriple_params(PRM)
    c0 = tl.program_id(0).to(tl.int64) * BC
    col, valid_j = _tile_columns(c0, C, K, BC, KP)
    rn = tl.load(rn_ptr + col, mask=valid_j, other=0.0)
    cs = tl.zeros((BC * KP,), dtype=gw_ptr.dtype.element_ty)
    for i0 in range(0, N, BM):
        offs_m = (i0 + tl.arange(0, BM)).to(tl.int64)
        mask_m = offs_m < N
        x_rows = x_ptr + offs_m[:, None] * stride_xn
        y, lse, g_row = _row_inputs(y_ptr, lse_ptr, g_ptr, offs_m, mask_m)
        s = _logits_tile(x_rows, mask_m, w_ptr, col, valid_j, rn_ptr, D, stride_wd, BD)
        g = _grad_tile(s, y, lse, g_row, mask_m, c0, C, valid_j, hp, BM, BC, KP)
        cs += tl.sum(g * s, axis=0)
        g = g * rn[None, :]
        for d0 in range(0, D, BD):
            offs_d = (d0 + tl.arange(0, BD)).to(tl.int64)
            mask_d = offs_d < D
            xb = load_tile(x_rows, mask_m, offs_d, mask_d)
            gw = tl.dot(tl.trans(xb), g, input_precision="ieee")
            _add_to_tile(gw_ptr + offs_d[:, None] * stride_wd, mask_d, col, valid_j, gw)
    # the center normalisation's projection on this tile's columns (owned by this program), as two
    # factors of r (r^2 alone underflows for large columns)
    coef = rn * cs
    for d0 in range(0, D, BD):
        offs_d = (d0 + tl.arange(0, BD)).to(tl.int64)
        mask_d = offs_d < D
        wb = load_tile(w_ptr + offs_d[:, None] * stride_wd, mask_d, col, valid_j)
        _add_to_tile(
            gw_ptr + offs_d[:, None] * stride_wd, mask_d, col, valid_j, -coef[None, :] * (rn[None, :] * wb)
        )


@triton.jit
def _column_scales_kernel(W, RN, D, CK, stride_wd, BC: tl.constexpr, BLOCK_D: tl.constexpr):
    """r = 1/|w_col| of BC center columns from the scale-safe norms of ``safe_row_norms`` on the
    transposed tile: 0 for a zero column, NaN for a non-finite one."""
    col = tl.program_id(0).to(tl.int64) * BC + tl.arange(0, BC)
    ok = col < CK
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    wt = load_tile(W + col[:, None], ok, offs_d * stride_wd, offs_d < D)  # (BC, BLOCK_D) = w[:, col]^T
    norm, _, _ = safe_row_norms(wt.to(RN.dtype.element_ty))
    tl.store(RN + col, tl.where(norm > 0.0, 1.0 / tl.where(norm > 0.0, norm, 1.0), norm), mask=ok)


# ---------------------------------------------------------------- launch helpers
def _blocks(n: int, d: int, k: int) -> tuple[int, int, int, int]:
    kp = triton.next_power_of_2(k)
    bc = max(1, 64 // kp)  # BC * KP >= 64 columns per tile (>= 16 for tl.dot)
    bm = 16 if n <= 16 else (32 if n <= 64 else 64)
    bd = min(64, max(16, triton.next_power_of_2(d)))
    return bm, bc, kp, bd


def _column_scales(w: torch.Tensor, strict: bool) -> torch.Tensor:
    """1/|w_col| per center column (``_column_scales_kernel``); strict: non-finite centers raise."""
    d, ck = w.shape
    rn = w.new_empty(ck)
    bc = 16
    _column_scales_kernel[(triton.cdiv(ck, bc),)](
        w, rn, d, ck, w.stride(0), BC=bc, BLOCK_D=max(16, triton.next_power_of_2(d))
    )
    if strict:
        raise_if(~torch.isfinite(rn).all(), "centers contains NaN or Inf")
    return rn


def _rows(x: torch.Tensor, normalize: bool, strict: bool) -> tuple[torch.Tensor, ...]:
    """(the rows the kernels read, z, norms): z = x/|x| and |x| with ``normalize`` (the rows are z),
    else the contiguous x and (0,) placeholders; strict: non-finite rows raise."""
    if not normalize:
        x = x.detach().contiguous()
        if strict:
            raise_if(~torch.isfinite(x).all(), "embeddings contains NaN or Inf")
        return x, x.new_empty(0), x.new_empty(0)
    z, norms = torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(x.shape[0])
    normalize_rows(x.detach(), z, norms)
    if strict:
        raise_if(~torch.isfinite(norms).all(), "embeddings contains NaN or Inf")
    return z, z, norms


def _check(x: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, k: int) -> None:
    torch._check(x.dim() == 2 and w.dim() == 2, lambda: "softtriple_triton: x and w must be 2-D")
    torch._check(x.shape[1] == w.shape[0], lambda: "softtriple_triton: x and w embedding sizes differ")
    torch._check(k >= 1 and w.shape[1] % k == 0, lambda: "softtriple_triton: w columns not a multiple of K")
    torch._check(
        x.dtype == w.dtype and x.dtype in (torch.float32, torch.float64),
        lambda: f"softtriple_triton: x and w must both be float32 or float64, got {x.dtype}, {w.dtype}",
    )
    torch._check(
        labels.dtype == torch.int64 and labels.shape == (x.shape[0],),
        lambda: "softtriple_triton: labels must be int64 of shape (N,)",
    )


def softtriple_forward(
    x: torch.Tensor,
    labels: torch.Tensor,
    w: torch.Tensor,
    centers_per_class: int,
    la: float,
    gamma: float,
    margin: float,
    normalize: bool,
) -> tuple[torch.Tensor, ...]:
    """(per-row cross-entropy l_i (N,), LSE_i (N,), z, norms) of SoftTriple on the raw x and centers w."""
    _check(x, labels, w, centers_per_class)
    strict = strict_checks()
    rows, z, norms = _rows(x, normalize, strict)
    w, labels = w.detach().contiguous(), labels.contiguous()
    n, d = x.shape
    k = centers_per_class
    c = w.shape[1] // k
    if strict:
        raise_if(((labels < 0) | (labels >= c)).any(), f"labels must lie in [0, num_classes={c})")
    loss = torch.empty(n, device=x.device, dtype=x.dtype)
    lse = torch.empty_like(loss)
    if n == 0:
        return loss, lse, z, norms
    rn = _column_scales(w, strict)
    prm = hyper_params(x, 1.0 / gamma, la, la * margin)
    bm, bc, kp, bd = _blocks(n, d, k)
    args = (rows, labels, w, rn, loss, lse, prm, n, d, c, k, rows.stride(0), w.stride(0))
    _st_fwd_kernel[(triton.cdiv(n, bm),)](*args, BM=bm, BC=bc, KP=kp, BD=bd)
    return loss, lse, z, norms


def softtriple_backward(
    grad_rows: torch.Tensor,
    x: torch.Tensor,
    labels: torch.Tensor,
    w: torch.Tensor,
    lse: torch.Tensor,
    z: torch.Tensor,
    norms: torch.Tensor,
    centers_per_class: int,
    la: float,
    gamma: float,
    margin: float,
    normalize: bool,
    need_gx: bool,
    need_gw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad x (N, D) or (0,), grad of the raw centers w (D, C*K) or (0,)) from the saved LSE (and z,
    norms with ``normalize``)."""
    _check(x, labels, w, centers_per_class)
    rows = z if normalize else x.detach().contiguous()
    w, labels = w.detach().contiguous(), labels.contiguous()
    g, lse = grad_rows.contiguous().to(x.dtype), lse.contiguous()
    n, d = x.shape
    k = centers_per_class
    c = w.shape[1] // k
    gx = x.new_zeros(0)
    gw = w.new_zeros(0)
    if n == 0:
        return (x.new_zeros(x.shape) if need_gx else gx), (w.new_zeros(w.shape) if need_gw else gw)
    rn = _column_scales(w, False)
    bm, bc, kp, bd = _blocks(n, d, k)
    args = (hyper_params(x, 1.0 / gamma, la, la * margin), n, d, c, k, rows.stride(0), w.stride(0))
    if need_gx:
        ntiles = triton.cdiv(c, bc)
        nblk = triton.cdiv(n, bm)
        # enough programs to fill a GPU; one split under the interpreter (CPU tensors)
        split = 1 if x.device.type == "cpu" else max(1, min(ntiles, 264 // nblk))
        parts = x.new_zeros(split, n, d)
        _st_bwd_dx_kernel[(nblk, split)](
            g, rows, labels, w, rn, lse, parts, *args, split, BM=bm, BC=bc, KP=kp, BD=bd
        )
        gx = parts.sum(0) if split > 1 else parts[0]
        if normalize:  # dL/dx from dL/dz (docs/semantics.md §1.4)
            normalize_rows_backward(gx, z, norms)
    if need_gw:
        gw = torch.zeros_like(w)
        _st_bwd_dw_kernel[(triton.cdiv(c, bc),)](
            g, rows, labels, w, rn, lse, gw, *args, BM=bm, BC=bc, KP=kp, BD=bd
        )
    return gx, gw
