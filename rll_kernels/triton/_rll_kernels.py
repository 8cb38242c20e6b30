"""Triton kernels of the fused Ranked List Loss (docs/semantics.md §2.6).

Three kernels, each one program per block of rows streaming the other side in tiles, so no
N x M matrix ever exists (memory O((N + M) D)):

* ``rll_fwd_kernel``: per block of BLOCK_M queries, loop over gallery tiles of BLOCK_N rows.
  ``tl.dot`` gives the Gram tile Q K^T; per-pair math follows csrc/rll_pair.h (Gram-form d^2
  clamped at 0, duplicate rule d^2 <= 64 eps (|q|^2 + |k|^2) -> d = 0 with zero direction, strict
  set inequalities, -inf logits for non-members). Per row and set an online state
  (max m, sum exp(s - m) = l, sum exp(s - m) v = a) in fp32 (fp64 for fp64 inputs). With
  ``PAPER_GRAD`` it also accumulates the query gradient in the same pass:
  sum_j c_ij (z_i - z_j) = (sum_j c_ij) z_i - (C K)_i, one ``tl.dot`` per tile and set, rescaled
  when the running max moves. Writes the row loss and the row statistics
  [log den_P, L_P, log den_N, L_N].
* ``rll_bwd_q_kernel``: recomputes each tile from the saved statistics and forms
  G_ij = dL/dd_ij / d_ij (weights attached or not); dq_i = (G 1)_i z_i - (G K)_i.
* ``rll_bwd_k_kernel``: the transposed pass, one program per block of gallery rows:
  dk_j = (G^T 1)_j k_j - (G^T Q)_j (FlashAttention's dK pass; no atomics).

Hyper-parameters arrive as a small tensor in the accumulation dtype (Triton passes Python floats
as fp32, which would break fp64 parity): [alpha, beta, Tn, Tp, lambda, den_bias, dup_rel].
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import interpret_mode
from ._compat import patch_interpreter_scalar_index

if interpret_mode():
    patch_interpreter_scalar_index()

NEG_INF = tl.constexpr(float("-inf"))  # a constexpr global: plain globals are refused by the compiler


@triton.jit
def _pair_dist(dot, nq, nk, rel):
    """d and 1/d of a tile from the Gram form; duplicates (and dead pairs) get d = 0, 1/d = 0."""
    d2 = tl.maximum(nq + nk - 2.0 * dot, 0.0)
    dup = d2 <= rel * (nq + nk)
    d = tl.where(dup, 0.0, tl.sqrt(tl.where(dup, 1.0, d2)))
    inv = tl.where(dup, 0.0, 1.0 / tl.maximum(d, 1e-30))
    return d, inv


@triton.jit
def _gram_chunked(
    A,
    B,
    offs_a,
    offs_b,
    a_ok,
    b_ok,
    stride_a,
    stride_b,
    D,
    PRM,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_CHUNK: tl.constexpr,
):
    """Gram tile A_I B_J^T accumulated over D in chunks of K_CHUNK (only chunk tiles are staged), and
    the squared norms of the B rows."""
    acc_t = PRM.dtype.element_ty
    dot = tl.zeros([BLOCK_A, BLOCK_B], acc_t)
    nb = tl.zeros([BLOCK_B], acc_t)
    for c0 in range(0, BLOCK_D, K_CHUNK):
        offs_c = c0 + tl.arange(0, K_CHUNK)
        c_ok = offs_c < D
        a = tl.load(
            A + offs_a[:, None] * stride_a + offs_c[None, :], mask=a_ok[:, None] & c_ok[None, :], other=0.0
        )
        b = tl.load(
            B + offs_b[:, None] * stride_b + offs_c[None, :], mask=b_ok[:, None] & c_ok[None, :], other=0.0
        )
        ba = b.to(acc_t)
        nb += tl.sum(ba * ba, 1)
        if UPCAST:
            a = a.to(acc_t)
            b = ba
        dot += tl.dot(a, tl.trans(b), input_precision=PREC, out_dtype=acc_t)
    return dot, nb


@triton.jit
def _row_norms(
    A, offs, ok, stride, D, PRM, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, K_CHUNK: tl.constexpr
):
    acc_t = PRM.dtype.element_ty
    n = tl.zeros([BLOCK_R], acc_t)
    for c0 in range(0, BLOCK_D, K_CHUNK):
        offs_c = c0 + tl.arange(0, K_CHUNK)
        a = tl.load(
            A + offs[:, None] * stride + offs_c[None, :], mask=ok[:, None] & (offs_c < D)[None, :], other=0.0
        ).to(acc_t)
        n += tl.sum(a * a, 1)
    return n


@triton.jit
def _online_update(m, l, a, s, v):
    """Fold a tile of logits s (-inf for non-members) and values v into the running state.

    Returns (new m, new l, new a, factor applied to the old accumulators, tile weights e^{s - m})."""
    m_new = tl.maximum(m, tl.max(s, 1))
    f = tl.where(m == NEG_INF, 0.0, tl.exp(m - tl.where(m_new == NEG_INF, 0.0, m_new)))
    w = tl.exp(s - tl.where(m_new == NEG_INF, 0.0, m_new)[:, None])
    l = l * f + tl.sum(w, 1)
    a = a * f + tl.sum(w * v, 1)
    return m_new, l, a, f, w


@triton.jit
def _online_finish(m, l, a, bias, HAS_BIAS: tl.constexpr):
    """(L, log den) of a set; log den = logaddexp(m + log l, log bias); empty: (0, -inf)."""
    nonempty = l > 0.0
    l_safe = tl.where(nonempty, l, 1.0)
    log_sum = tl.where(nonempty, m, 0.0) + tl.log(l_safe)
    if HAS_BIAS:
        lb = tl.log(bias)
        hi = tl.maximum(log_sum, lb)
        logden = hi + tl.log(1.0 + tl.exp(-tl.abs(log_sum - lb)))
    else:
        logden = log_sum
    L = tl.where(nonempty, (a / l_safe) * tl.exp(log_sum - logden), 0.0)
    logden = tl.where(nonempty, logden, NEG_INF)
    return L, logden


@triton.jit
def _tile_G(
    dot, nq, nk, same, diff, wq_p, wq_n, lgp, Lp, lgn, Ln, alpha, beta, Tn, Tp, rel, ATTACHED: tl.constexpr
):
    """G = dL/dd / d of a tile from the saved row statistics (arguments broadcast to the tile).

    same/diff already hold the validity; wq_p = (1 - lambda) g_i, wq_n = lambda g_i."""
    d, inv = _pair_dist(dot, nq, nk, rel)
    pos = same & (d > beta)
    neg = diff & (d < alpha)
    vp = d - beta
    vn = alpha - d
    pp = tl.exp(tl.where(pos, Tp * vp, NEG_INF) - tl.where(lgp == NEG_INF, 0.0, lgp))
    pn = tl.exp(tl.where(neg, Tn * vn, NEG_INF) - tl.where(lgn == NEG_INF, 0.0, lgn))
    if ATTACHED:
        cp = pp * (1.0 + Tp * (vp - Lp))
        cn = -pn * (1.0 + Tn * (vn - Ln))
    else:
        cp = pp
        cn = -pn
    return (wq_p * cp + wq_n * cn) * inv


@triton.jit
def rll_fwd_kernel(
    Q,
    K,
    QL,
    KL,
    QID,
    KID,
    PRM,
    LOSS,
    STATS,
    GQ,
    N,
    M,
    D,
    stride_q,
    stride_k,
    stride_g,
    HAS_IDS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PAPER_GRAD: tl.constexpr,
    UPCAST_QK: tl.constexpr,
    PREC_QK: tl.constexpr,
    PREC_GZ: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_CHUNK: tl.constexpr = 0,
):
    acc_t = PRM.dtype.element_ty
    alpha = tl.load(PRM + 0)
    beta = tl.load(PRM + 1)
    Tn = tl.load(PRM + 2)
    Tp = tl.load(PRM + 3)
    lam = tl.load(PRM + 4)
    bias = tl.load(PRM + 5)
    rel = tl.load(PRM + 6)

    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if K_CHUNK == 0:  # the whole BLOCK_M x D query tile stays resident
        q = tl.load(
            Q + offs_m[:, None] * stride_q + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
        )
        qa = q.to(acc_t)
        nq = tl.sum(qa * qa, 1)
        if UPCAST_QK:
            q = qa
    else:
        nq = _row_norms(Q, offs_m, row_ok, stride_q, D, PRM, BLOCK_M, BLOCK_D, K_CHUNK)
    ql = tl.load(QL + offs_m, mask=row_ok, other=0)
    qid = ql
    if HAS_IDS:
        qid = tl.load(QID + offs_m, mask=row_ok, other=0)

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
        if K_CHUNK == 0:
            k = tl.load(
                K + offs_n[:, None] * stride_k + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            ka = k.to(acc_t)
            nk = tl.sum(ka * ka, 1)
            if UPCAST_QK:
                k = ka
            dot = tl.dot(q, tl.trans(k), input_precision=PREC_QK, out_dtype=acc_t)
        else:
            dot, nk = _gram_chunked(
                Q,
                K,
                offs_m,
                offs_n,
                row_ok,
                col_ok,
                stride_q,
                stride_k,
                D,
                PRM,
                UPCAST_QK,
                PREC_QK,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
                K_CHUNK,
            )
            if PAPER_GRAD:  # the whole gallery tile, for the G K product
                ka = tl.load(
                    K + offs_n[:, None] * stride_k + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0,
                ).to(acc_t)
        kl = tl.load(KL + offs_n, mask=col_ok, other=0)
        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_IDS:
            kid = tl.load(KID + offs_n, mask=col_ok, other=0)
            valid = valid & (qid[:, None] != kid[None, :])
        same = valid & (ql[:, None] == kl[None, :])
        diff = valid & (ql[:, None] != kl[None, :])
        d, inv = _pair_dist(dot, nq[:, None], nk[None, :], rel)
        vp = d - beta
        vn = alpha - d
        sp = tl.where(same & (d > beta), Tp * vp, NEG_INF)
        sn = tl.where(diff & (d < alpha), Tn * vn, NEG_INF)
        m_p, l_p, a_p, f_p, w_p = _online_update(m_p, l_p, a_p, sp, vp)
        m_n, l_n, a_n, f_n, w_n = _online_update(m_n, l_n, a_n, sn, vn)
        if PAPER_GRAD:
            c_p = w_p * inv
            c_n = w_n * inv
            cs_p = cs_p * f_p + tl.sum(c_p, 1)
            cs_n = cs_n * f_n + tl.sum(c_n, 1)
            acc_p = acc_p * f_p[:, None] + tl.dot(c_p, ka, input_precision=PREC_GZ, out_dtype=acc_t)
            acc_n = acc_n * f_n[:, None] + tl.dot(c_n, ka, input_precision=PREC_GZ, out_dtype=acc_t)

    L_p, lg_p = _online_finish(m_p, l_p, a_p, bias, HAS_BIAS)
    L_n, lg_n = _online_finish(m_n, l_n, a_n, bias, HAS_BIAS)
    tl.store(LOSS + offs_m, (1.0 - lam) * L_p + lam * L_n, mask=row_ok)
    tl.store(STATS + offs_m * 4 + 0, lg_p, mask=row_ok)
    tl.store(STATS + offs_m * 4 + 1, L_p, mask=row_ok)
    tl.store(STATS + offs_m * 4 + 2, lg_n, mask=row_ok)
    tl.store(STATS + offs_m * 4 + 3, L_n, mask=row_ok)
    if PAPER_GRAD:
        # dL/dz_i = sum_set +-lambda_set e^{m - logden} (csum z_i - acc_i); the weights are in units of e^m
        fp = tl.where(lg_p == NEG_INF, 0.0, (1.0 - lam) * tl.exp(m_p - tl.where(lg_p == NEG_INF, 0.0, lg_p)))
        fn = tl.where(lg_n == NEG_INF, 0.0, -lam * tl.exp(m_n - tl.where(lg_n == NEG_INF, 0.0, lg_n)))
        if K_CHUNK > 0:
            qa = tl.load(
                Q + offs_m[:, None] * stride_q + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(acc_t)
        g = (fp * cs_p + fn * cs_n)[:, None] * qa - fp[:, None] * acc_p - fn[:, None] * acc_n
        tl.store(GQ + offs_m[:, None] * stride_g + offs_d[None, :], g, mask=row_ok[:, None] & d_ok[None, :])


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
    GQ,
    N,
    M,
    D,
    stride_q,
    stride_k,
    stride_g,
    HAS_IDS: tl.constexpr,
    ATTACHED: tl.constexpr,
    UPCAST_QK: tl.constexpr,
    PREC_QK: tl.constexpr,
    PREC_GZ: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_CHUNK: tl.constexpr = 0,
):
    acc_t = PRM.dtype.element_ty
    alpha = tl.load(PRM + 0)
    beta = tl.load(PRM + 1)
    Tn = tl.load(PRM + 2)
    Tp = tl.load(PRM + 3)
    lam = tl.load(PRM + 4)
    rel = tl.load(PRM + 6)

    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if K_CHUNK == 0:  # the whole BLOCK_M x D query tile stays resident
        q = tl.load(
            Q + offs_m[:, None] * stride_q + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
        )
        qa = q.to(acc_t)
        nq = tl.sum(qa * qa, 1)
        if UPCAST_QK:
            q = qa
    else:
        nq = _row_norms(Q, offs_m, row_ok, stride_q, D, PRM, BLOCK_M, BLOCK_D, K_CHUNK)
    ql = tl.load(QL + offs_m, mask=row_ok, other=0)
    qid = ql
    if HAS_IDS:
        qid = tl.load(QID + offs_m, mask=row_ok, other=0)
    g_row = tl.load(GR + offs_m, mask=row_ok, other=0.0).to(acc_t)
    lgp = tl.load(STATS + offs_m * 4 + 0, mask=row_ok, other=NEG_INF).to(acc_t)
    Lp = tl.load(STATS + offs_m * 4 + 1, mask=row_ok, other=0.0).to(acc_t)
    lgn = tl.load(STATS + offs_m * 4 + 2, mask=row_ok, other=NEG_INF).to(acc_t)
    Ln = tl.load(STATS + offs_m * 4 + 3, mask=row_ok, other=0.0).to(acc_t)
    wq_p = (1.0 - lam) * g_row
    wq_n = lam * g_row

    rs = tl.zeros([BLOCK_M], acc_t)
    acc = tl.zeros([BLOCK_M, BLOCK_D], acc_t)
    for j0 in range(0, M, BLOCK_N):
        offs_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = offs_n < M
        if K_CHUNK == 0:
            k = tl.load(
                K + offs_n[:, None] * stride_k + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            ka = k.to(acc_t)
            nk = tl.sum(ka * ka, 1)
            if UPCAST_QK:
                k = ka
            dot = tl.dot(q, tl.trans(k), input_precision=PREC_QK, out_dtype=acc_t)
        else:
            dot, nk = _gram_chunked(
                Q,
                K,
                offs_m,
                offs_n,
                row_ok,
                col_ok,
                stride_q,
                stride_k,
                D,
                PRM,
                UPCAST_QK,
                PREC_QK,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
                K_CHUNK,
            )
            ka = tl.load(
                K + offs_n[:, None] * stride_k + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(acc_t)
        kl = tl.load(KL + offs_n, mask=col_ok, other=0)
        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_IDS:
            kid = tl.load(KID + offs_n, mask=col_ok, other=0)
            valid = valid & (qid[:, None] != kid[None, :])
        same = valid & (ql[:, None] == kl[None, :])
        diff = valid & (ql[:, None] != kl[None, :])
        G = _tile_G(
            dot,
            nq[:, None],
            nk[None, :],
            same,
            diff,
            wq_p[:, None],
            wq_n[:, None],
            lgp[:, None],
            Lp[:, None],
            lgn[:, None],
            Ln[:, None],
            alpha,
            beta,
            Tn,
            Tp,
            rel,
            ATTACHED,
        )
        rs += tl.sum(G, 1)
        acc += tl.dot(G, ka, input_precision=PREC_GZ, out_dtype=acc_t)
    if K_CHUNK > 0:
        qa = tl.load(
            Q + offs_m[:, None] * stride_q + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
        ).to(acc_t)
    g = rs[:, None] * qa - acc
    tl.store(GQ + offs_m[:, None] * stride_g + offs_d[None, :], g, mask=row_ok[:, None] & d_ok[None, :])


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
    GK,
    N,
    M,
    D,
    stride_q,
    stride_k,
    stride_g,
    HAS_IDS: tl.constexpr,
    ATTACHED: tl.constexpr,
    UPCAST_QK: tl.constexpr,
    PREC_QK: tl.constexpr,
    PREC_GZ: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_CHUNK: tl.constexpr = 0,
):
    # one program per BLOCK_N gallery rows; loops over query tiles of BLOCK_M (tiles are gallery-major)
    acc_t = PRM.dtype.element_ty
    alpha = tl.load(PRM + 0)
    beta = tl.load(PRM + 1)
    Tn = tl.load(PRM + 2)
    Tp = tl.load(PRM + 3)
    lam = tl.load(PRM + 4)
    rel = tl.load(PRM + 6)

    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < M
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if K_CHUNK == 0:  # the whole BLOCK_N x D gallery tile stays resident
        k = tl.load(
            K + offs_n[:, None] * stride_k + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0
        )
        ka = k.to(acc_t)
        nk = tl.sum(ka * ka, 1)
        if UPCAST_QK:
            k = ka
    else:
        nk = _row_norms(K, offs_n, col_ok, stride_k, D, PRM, BLOCK_N, BLOCK_D, K_CHUNK)
    kl = tl.load(KL + offs_n, mask=col_ok, other=0)
    kid = kl
    if HAS_IDS:
        kid = tl.load(KID + offs_n, mask=col_ok, other=0)

    cs = tl.zeros([BLOCK_N], acc_t)
    acc = tl.zeros([BLOCK_N, BLOCK_D], acc_t)
    for i0 in range(0, N, BLOCK_M):
        offs_m = (i0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = offs_m < N
        if K_CHUNK == 0:
            q = tl.load(
                Q + offs_m[:, None] * stride_q + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            qa = q.to(acc_t)
            nq = tl.sum(qa * qa, 1)
            if UPCAST_QK:
                q = qa
            dot = tl.dot(k, tl.trans(q), input_precision=PREC_QK, out_dtype=acc_t)  # (BLOCK_N, BLOCK_M)
        else:
            dot, nq = _gram_chunked(
                K,
                Q,
                offs_n,
                offs_m,
                col_ok,
                row_ok,
                stride_k,
                stride_q,
                D,
                PRM,
                UPCAST_QK,
                PREC_QK,
                BLOCK_N,
                BLOCK_M,
                BLOCK_D,
                K_CHUNK,
            )
            qa = tl.load(
                Q + offs_m[:, None] * stride_q + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(acc_t)
        ql = tl.load(QL + offs_m, mask=row_ok, other=0)
        valid = col_ok[:, None] & row_ok[None, :]
        if HAS_IDS:
            qid = tl.load(QID + offs_m, mask=row_ok, other=0)
            valid = valid & (kid[:, None] != qid[None, :])
        same = valid & (kl[:, None] == ql[None, :])
        diff = valid & (kl[:, None] != ql[None, :])
        g_row = tl.load(GR + offs_m, mask=row_ok, other=0.0).to(acc_t)
        lgp = tl.load(STATS + offs_m * 4 + 0, mask=row_ok, other=NEG_INF).to(acc_t)
        Lp = tl.load(STATS + offs_m * 4 + 1, mask=row_ok, other=0.0).to(acc_t)
        lgn = tl.load(STATS + offs_m * 4 + 2, mask=row_ok, other=NEG_INF).to(acc_t)
        Ln = tl.load(STATS + offs_m * 4 + 3, mask=row_ok, other=0.0).to(acc_t)
        GT = _tile_G(
            dot,
            nq[None, :],
            nk[:, None],
            same,
            diff,
            ((1.0 - lam) * g_row)[None, :],
            (lam * g_row)[None, :],
            lgp[None, :],
            Lp[None, :],
            lgn[None, :],
            Ln[None, :],
            alpha,
            beta,
            Tn,
            Tp,
            rel,
            ATTACHED,
        )
        cs += tl.sum(GT, 1)
        acc += tl.dot(GT, qa, input_precision=PREC_GZ, out_dtype=acc_t)
    # dL/dk_j = sum_i G_ij (k_j - q_i)
    if K_CHUNK > 0:
        ka = tl.load(
            K + offs_n[:, None] * stride_k + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0
        ).to(acc_t)
    g = cs[:, None] * ka - acc
    tl.store(GK + offs_n[:, None] * stride_g + offs_d[None, :], g, mask=col_ok[:, None] & d_ok[None, :])
