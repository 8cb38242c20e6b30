"""``@triton.jit`` tile helpers shared by the Triton kernels of every loss.

Names follow the convention of docs/architecture.md: a program owns a block of rows and streams
the other side in tiles; ``rows`` is the pointer column ``P + offs[:, None] * stride`` of a block
of rows of a row-major matrix and ``ok`` its 1-D row mask, so a tile of columns ``offs_c`` is
``rows + offs_c[None, :]``. Accumulation is in the dtype of the kernel's hyper-parameter tensor
``PRM`` (fp32, fp64 for fp64 inputs; docs/semantics.md §1.2).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import interpret_mode
from ._compat import patch_interpreter_scalar_index

if interpret_mode():
    patch_interpreter_scalar_index()

NEG_INF = tl.constexpr(float("-inf"))  # a constexpr global: plain globals are refused by the compiler


# ------------------------------------------------------------------ masked tiles
@triton.jit
def load_tile(rows, ok, offs_c, c_ok):
    """The tile rows[:, offs_c], 0 where a row or a column is masked."""
    return tl.load(rows + offs_c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)


@triton.jit
def store_tile(rows, ok, offs_c, c_ok, value):
    tl.store(rows + offs_c[None, :], value, mask=ok[:, None] & c_ok[None, :])


@triton.jit
def load_rows(rows, ok, offs_d, d_ok, PRM, UPCAST: tl.constexpr):
    """A resident block of rows: (the ``tl.dot`` operand, upcast to the accumulation dtype when
    ``UPCAST``; the rows in the accumulation dtype; their squared norms)."""
    x = load_tile(rows, ok, offs_d, d_ok)
    xa = x.to(PRM.dtype.element_ty)
    if UPCAST:
        x = xa
    return x, xa, tl.sum(xa * xa, 1)


@triton.jit
def row_norms(rows, ok, D, PRM, BLOCK_D: tl.constexpr, K_CHUNK: tl.constexpr):
    """Squared norms of a block of rows, read in chunks of K_CHUNK columns."""
    n = tl.zeros([ok.shape[0]], PRM.dtype.element_ty)
    for c0 in range(0, BLOCK_D, K_CHUNK):
        offs_c = c0 + tl.arange(0, K_CHUNK)
        x = load_tile(rows, ok, offs_c, offs_c < D).to(PRM.dtype.element_ty)
        n += tl.sum(x * x, 1)
    return n


@triton.jit
def store_row4(P, offs, ok, c0, c1, c2, c3):
    """Store four values per row as the rows of an (N, 4) matrix."""
    tl.store(P + offs * 4 + 0, c0, mask=ok)
    tl.store(P + offs * 4 + 1, c1, mask=ok)
    tl.store(P + offs * 4 + 2, c2, mask=ok)
    tl.store(P + offs * 4 + 3, c3, mask=ok)


@triton.jit
def load_row4(P, offs, ok, PRM):
    """The four values per row of an (N, 4) matrix, in the accumulation dtype (0 where masked)."""
    acc_t = PRM.dtype.element_ty
    c0 = tl.load(P + offs * 4 + 0, mask=ok, other=0.0).to(acc_t)
    c1 = tl.load(P + offs * 4 + 1, mask=ok, other=0.0).to(acc_t)
    c2 = tl.load(P + offs * 4 + 2, mask=ok, other=0.0).to(acc_t)
    c3 = tl.load(P + offs * 4 + 3, mask=ok, other=0.0).to(acc_t)
    return c0, c1, c2, c3


# ------------------------------------------------------------------ Gram form and the duplicate rule
@triton.jit
def gram_chunked(
    a_rows,
    a_ok,
    b_rows,
    b_ok,
    D,
    PRM,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_CHUNK: tl.constexpr,
    SWAP: tl.constexpr = False,
):
    """The Gram tile A_I B_J^T accumulated over D in chunks of K_CHUNK (only chunk tiles are staged),
    and the squared norms of the B rows; ``SWAP``: each chunk's product computed as (B A^T)^T."""
    acc_t = PRM.dtype.element_ty
    dot = tl.zeros([a_ok.shape[0], b_ok.shape[0]], acc_t)
    nb = tl.zeros([b_ok.shape[0]], acc_t)
    for c0 in range(0, BLOCK_D, K_CHUNK):
        offs_c = c0 + tl.arange(0, K_CHUNK)
        c_ok = offs_c < D
        a = load_tile(a_rows, a_ok, offs_c, c_ok)
        b = load_tile(b_rows, b_ok, offs_c, c_ok)
        ba = b.to(acc_t)
        nb += tl.sum(ba * ba, 1)
        if UPCAST:
            a = a.to(acc_t)
            b = ba
        if SWAP:
            dot += tl.trans(tl.dot(b, tl.trans(a), input_precision=PREC, out_dtype=acc_t))
        else:
            dot += tl.dot(a, tl.trans(b), input_precision=PREC, out_dtype=acc_t)
    return dot, nb


@triton.jit
def pair_distance(dot, na, nb, rel):
    """d and 1/d of a tile from the Gram form d^2 = |a|^2 + |b|^2 - 2 a.b clamped at 0.

    The duplicate rule (docs/semantics.md §1.3): d^2 <= rel (|a|^2 + |b|^2) gives d = 0 and no
    direction, 1/d = 0; 1/d is 0 for duplicates only."""
    d2 = tl.maximum(na + nb - 2.0 * dot, 0.0)
    dup = d2 <= rel * (na + nb)
    d = tl.where(dup, 0.0, tl.sqrt(tl.where(dup, 1.0, d2)))
    inv = tl.where(dup, 0.0, 1.0 / tl.maximum(d, 1e-30))
    return d, inv


@triton.jit
def pair_sets(la, lb, ida, idb, a_ok, b_ok, HAS_IDS: tl.constexpr):
    """(same, diff): the pairs of a tile with equal / different labels, among the valid ones (both
    rows in range and, with ids, ``ida != idb``: docs/semantics.md §1.5)."""
    valid = a_ok[:, None] & b_ok[None, :]
    if HAS_IDS:
        valid = valid & (ida[:, None] != idb[None, :])
    same = valid & (la[:, None] == lb[None, :])
    diff = valid & (la[:, None] != lb[None, :])
    return same, diff


@triton.jit
def store_gram_grad(rows, ok, offs_d, d_ok, row_sum, x, acc):
    """Store sum_j G_ij (x_i - y_j) = (G 1)_i x_i - (G Y)_i from its two accumulated parts."""
    store_tile(rows, ok, offs_d, d_ok, row_sum[:, None] * x - acc)


# ------------------------------------------------------------------ online softmax (per row)
@triton.jit
def online_rescale(m, s):
    """Fold a tile of logits s (-inf for non-members) into the running max m of each row: (new max,
    factor e^{m - m_new} for what was accumulated so far, tile weights e^{s - m_new})."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
    f = tl.where(m == NEG_INF, 0.0, tl.exp(m - m_ref))
    return m_new, f, tl.exp(s - m_ref[:, None])


@triton.jit
def online_update(m, l, a, s, v):
    """OnlineRow (m, l = sum e^{s - m}, a = sum e^{s - m} v) after a tile of logits s and values v.

    Returns (m, l, a, the factor applied to the old accumulators, the tile weights e^{s - m})."""
    m_new, f, w = online_rescale(m, s)
    return m_new, l * f + tl.sum(w, 1), a * f + tl.sum(w * v, 1), f, w


@triton.jit
def online_finish(m, l, a, bias, HAS_BIAS: tl.constexpr):
    """(L, log den) of a set; log den = logaddexp(m + log l, log bias); empty set: (0, -inf)."""
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


# ------------------------------------------------------------ row normalisation (docs/semantics.md §1.4)
@triton.jit
def safe_row_norms(x):
    """Scale-safe norms of the rows of a tile ``x`` (accumulation dtype, masked entries 0) and the
    rows scaled by their largest |x| (every entry in [-1, 1]): no overflow or underflow for any
    finite row. The plain sqrt(sum x^2) where that sum neither overflows nor underflows (as the C++
    ops and F.normalize: the same z to the ulp), else m sqrt(sum (x/m)^2). A row with an Inf or NaN
    entry gets a NaN norm; a zero row norm 0."""
    m = tl.max(tl.abs(x), 1)
    m_safe = tl.where(m > 0.0, m, 1.0)
    xs = x / m_safe[:, None]
    s = tl.sum(xs * xs, 1)
    sq = tl.sum(x * x, 1)
    plain = (sq < float("inf")) & (sq >= 1e-31)  # float32: smallest normal / eps
    scaled = tl.where(m > 0.0, m * tl.sqrt(s), tl.where(m == 0.0, 0.0, m + s))  # NaN m: NaN
    norm = tl.where(plain, tl.sqrt(tl.where(plain, sq, 1.0)), scaled)
    norm = tl.where((m == float("inf")) | (s != s), float("nan"), norm)
    return norm, xs, s


@triton.jit
def normalize_backward(g, z, norm):
    """The gradient through z = x/|x| of a block of rows: (g - z (z . g)) / |x|; 0 for a zero row."""
    zg = tl.sum(z * g, 1)
    return tl.where((norm == 0.0)[:, None], 0.0, (g - z * zg[:, None]) / norm[:, None])


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """x (float32) in ``dtype``, rounded to nearest even: for bfloat16 by its bits, as a GPU's cvt.rn
    does (the interpreter's cast truncates, which moves z by an ulp: the loss of bf16 rows by 1e-3)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def normalize_rows_kernel(
    X, Z, NORMS, R, D, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    """z = x/|x| of BLOCK_R rows of X (any strides) into the contiguous Z (its dtype) and |x| into
    NORMS: one read of the rows, one write. Non-finite rows get NaN norms and NaN z rows."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = offs_r < R
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    x = tl.load(
        X + offs_r[:, None] * stride_r + offs_d[None, :] * stride_c,
        mask=ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    x = x.to(NORMS.dtype.element_ty)
    norm, xs, s = safe_row_norms(x)
    # x / |x| (one rounding, as F.normalize); (x / m) / sqrt(s) where |x| is subnormal
    tiny = norm < 1.1754943508222875e-38
    n_div = tl.where(tiny | (norm == 0.0), 1.0, norm)
    z = tl.where(tiny[:, None], xs / tl.sqrt(tl.where(s > 0.0, s, 1.0))[:, None], x / n_div[:, None])
    z = tl.where((norm == 0.0)[:, None], 0.0, z)
    z = tl.where((norm == norm)[:, None], z, float("nan"))
    tl.store(
        Z + offs_r[:, None] * D + offs_d[None, :],
        _round_to(z, Z.dtype.element_ty),
        mask=ok[:, None] & d_ok[None, :],
    )
    tl.store(NORMS + offs_r, norm, mask=ok)


def normalize_rows(x, z, norms) -> None:
    """Launch ``normalize_rows_kernel``: the rows of ``x`` (R x D, any strides) normalised into the
    contiguous ``z`` (R x D), their norms into ``norms`` (R,) in the accumulation dtype."""
    r, d = x.shape
    if r == 0:
        return
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(r, block_r),)
    normalize_rows_kernel[grid](x, z, norms, r, d, x.stride(0), x.stride(1), BLOCK_R=block_r, BLOCK_D=block_d)


@triton.jit
def normalize_rows_backward_kernel(G, Z, NORMS, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """In place, g <- (g - z (z . g)) / |x| for BLOCK_R contiguous rows of G (0 for a zero row, NaN
    for a non-finite one): the Jacobian epilogue of an op whose rows normalize_rows normalised."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = offs_r < R
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    norm = tl.load(NORMS + offs_r, mask=ok, other=1.0)
    g = load_tile(G + offs_r[:, None] * D, ok, offs_d, d_ok).to(norm.dtype)
    z = load_tile(Z + offs_r[:, None] * D, ok, offs_d, d_ok).to(norm.dtype)
    store_tile(
        G + offs_r[:, None] * D, ok, offs_d, d_ok, normalize_backward(g, z, norm).to(G.dtype.element_ty)
    )


def normalize_rows_backward(g, z, norms) -> None:
    """Launch ``normalize_rows_backward_kernel`` on the contiguous (R x D) gradient ``g`` of the rows
    ``z`` and ``norms`` that :func:`normalize_rows` wrote."""
    r, d = g.shape
    if r == 0:
        return
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(1, min(64, 4096 // block_d))
    normalize_rows_backward_kernel[(triton.cdiv(r, block_r),)](
        g, z, norms, r, d, BLOCK_R=block_r, BLOCK_D=block_d
    )
