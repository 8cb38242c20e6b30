"""SoftTriple op contract: fake kernels and autograd, shared by the C++ op and its Triton twin, and the
center-sparsity regulariser as an autograd function over the raw centers.

Forward ``(x, labels, w, centers_per_class, la, gamma, margin, normalize) -> (rows (N,), lse (N,), z, norms)``
on the raw embeddings x (any strides; with ``normalize`` the op normalises them and returns
z = x/|x| (N, D) and |x| (N,) for the backward, else (0,) each) and the raw (D, C*K) centers w
(normalised per column inside the kernels); backward ``(grad_rows, x, labels, w, lse, z, norms, ...)
-> (grad x or (0,), grad w or (0,))`` recomputes the class tiles from the saved per-row log-sum-exp and
applies the normalisation's Jacobian to the rows' gradient. See docs/semantics.md §1.4 and §3.
"""

from __future__ import annotations

import torch

from ..reference.softtriple import REG_EPS
from ._schemas import OPS

__all__ = ["softtriple_backward_fake", "softtriple_forward_fake", "sparse_centers_raw"]


def softtriple_forward_fake(x, labels, w, centers_per_class, la, gamma, margin, normalize):
    torch._check(x.dim() == 2 and w.dim() == 2, lambda: "softtriple_fwd: x and w must be 2-D")
    torch._check(x.shape[1] == w.shape[0], lambda: "softtriple_fwd: x and w embedding sizes differ")
    n = x.shape[0]
    z = x.new_empty(x.shape) if normalize else x.new_empty(0)
    return x.new_empty(n), x.new_empty(n), z, x.new_empty(n if normalize else 0)


def softtriple_backward_fake(
    grad_rows, x, labels, w, lse, z, norms, centers_per_class, la, gamma, margin, normalize, need_gx, need_gw
):
    # contiguous whatever the strides of x and w (the kernels write row-major gradients)
    gx = x.new_empty(x.shape) if need_gx else x.new_empty(0)
    gw = w.new_empty(w.shape) if need_gw else w.new_empty(0)
    return gx, gw


def _setup_context(ctx, inputs, output):
    x, labels, w, k, la, gamma, margin, normalize = inputs
    _, lse, z, norms = output
    ctx.params = (k, la, gamma, margin, normalize)
    ctx.save_for_backward(x, labels, w, lse, z, norms)


def _make_backward(backend: str):
    backward_op = getattr(torch.ops.rll_kernels, OPS["softtriple"][backend][1])

    def backward(ctx, g_rows, _g_lse, _g_z, _g_norms):
        # LSE, z and the norms are saved statistics: their gradients are not propagated (the API
        # never returns them)
        x, labels, w, lse, z, norms = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        gx, gw = backward_op(g_rows.contiguous(), x, labels, w, lse, z, norms, *ctx.params, need_x, need_w)
        return (gx if need_x else None, None, gw if need_w else None) + (None,) * 5

    return backward


def _triton_forward(*args):
    from ..triton import softtriple as kernels  # triton is imported on the first Triton call only

    return kernels.softtriple_forward(*args)


def _triton_backward(*args):
    from ..triton import softtriple as kernels

    return kernels.softtriple_backward(*args)


for _backend, (_fwd, _bwd) in OPS["softtriple"].items():
    torch.library.register_fake(f"rll_kernels::{_fwd}", softtriple_forward_fake)
    torch.library.register_fake(f"rll_kernels::{_bwd}", softtriple_backward_fake)
    torch.library.register_autograd(
        f"rll_kernels::{_fwd}", _make_backward(_backend), setup_context=_setup_context
    )
torch.library.register_kernel("rll_kernels::softtriple_triton_fwd", ("cpu", "cuda"), _triton_forward)
torch.library.register_kernel("rll_kernels::softtriple_triton_bwd", ("cpu", "cuda"), _triton_backward)


def _chunk_values(t: torch.Tensor) -> int:
    """Values per temporary of the regulariser: 2^20 on the CPU (4 MB in float32, in cache; with 2^22
    the forward was slower here, bench/RESULTS.md §18), 2^24 on a GPU (fewer launches)."""
    return 1 << 20 if t.device.type == "cpu" else 1 << 24


def _inverse_peaks(centers: torch.Tensor) -> torch.Tensor:
    """1 / (the largest |entry|) per center column, 0 for a zero column (one pass, no temporary)."""
    lo, hi = torch.aminmax(centers, dim=0)
    peak = torch.maximum(hi, -lo)
    live = peak > 0
    return torch.where(live, 1.0 / torch.where(live, peak, torch.ones_like(peak)), torch.zeros_like(peak))


def _scaled_gram(centers: torch.Tensor, inv_peak: torch.Tensor, k: int) -> torch.Tensor:
    """Per class, the K x K Gram of its columns divided by their peaks (entries in [-1, 1]: no
    square overflows or underflows), built from chunks of classes of about _chunk_values values."""
    d, ck = centers.shape
    c = ck // k
    step = max(1, _chunk_values(centers) // max(1, d * k))  # classes per chunk
    parts = []
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        cols = slice(c0 * k, c1 * k)
        scaled = (centers[:, cols] * inv_peak[cols]).view(d, c1 - c0, k).permute(1, 2, 0)
        parts.append(torch.bmm(scaled, scaled.transpose(1, 2)))
    return torch.cat(parts)


class _SparseCentersRaw(torch.autograd.Function):
    """R from the raw centers with a hand-written backward that makes one D x C*K gradient.

    Plain autograd through the batched Gram makes two (C, K, D) gradients (one per bmm operand),
    a layout copy and their sum: about 3 x 232 MB at SOP scale. Here, with u = w / |w| (scale-safe:
    from the columns divided by their peaks) built in chunks of classes and D rows, never as one
    copy of the centers,
    dR/dw_t = (sum_s A_ts u_s - (sum_s A_ts cos_ts) u_t) / |w_t| per class, with A = dR/dcos
    (symmetric); a zero column has u = 0, cos = 0 and gets no gradient (docs/semantics.md §3.5).
    """

    @staticmethod
    def forward(ctx, centers: torch.Tensor, k: int, reg_eps: float) -> torch.Tensor:
        d, ck = centers.shape
        c = ck // k
        inv_peak = _inverse_peaks(centers)
        gram = _scaled_gram(centers, inv_peak, k)
        # |w| / peak from the Gram's diagonal (in [1, sqrt(D)]; 0 for a zero column), as a masked sum:
        # with torch.diagonal's view, inductor (torch 2.13) compiled this Function's gradient wrong
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        scaled_norm = (gram * eye).sum(2).sqrt()  # (C, K)
        safe = torch.where(scaled_norm > 0, scaled_norm, torch.ones_like(scaled_norm))
        cos = gram / (safe.unsqueeze(2) * safe.unsqueeze(1))
        inv_norm = (inv_peak.view(c, k) / safe).reshape(ck)  # 1 / |w|, 0 for a zero column
        # a cosine above 1 is rounding: clamped, as PML's SparseCentersRegularizer clamps 2 cos at 2
        root = torch.sqrt(2.0 + reg_eps - 2.0 * cos.clamp(max=1.0))
        upper = torch.ones(k, k, dtype=torch.bool, device=centers.device).triu(1)
        ctx.save_for_backward(centers, inv_norm, cos, root)
        ctx.k = k
        return (root * upper).sum() / (c * k * (k - 1))

    @staticmethod
    def backward(ctx, g):
        centers, inv_norm, cos, root = ctx.saved_tensors
        k = ctx.k
        d, ck = centers.shape
        c = ck // k
        off = ~torch.eye(k, dtype=torch.bool, device=centers.device)
        # dR/dcos_ts for t != s, both orders (each unordered pair appears once in R); 0 where the cosine
        # was clamped, and at root = 0 (coinciding centers with a tiny reg_eps: PML's gradient is NaN
        # there; the cosine's own gradient vanishes for coinciding directions)
        live = off & (cos <= 1.0) & (root > 0)
        a = torch.where(live, -g / (root * (c * k * (k - 1))), torch.zeros_like(root))
        m = a - torch.diag_embed((a * cos).sum(2))  # (C, K, K), applied to the unit columns
        step = max(1, _chunk_values(centers) // max(1, ck))  # D rows per chunk
        out = torch.empty_like(centers)  # written chunk by chunk: one D x CK gradient, no concatenation
        for d0 in range(0, d, step):
            u = (centers[d0 : d0 + step] * inv_norm).view(-1, c, k)  # the chunk's unit columns
            # the sum over s on unit columns first, then 1 / |w_t|: no product of two small factors
            grad = torch.einsum("dcs,cts->dct", u, m) * inv_norm.view(c, k)
            out[d0 : d0 + step].view(-1, c, k).copy_(grad)
        return out, None, None


def sparse_centers_raw(
    centers: torch.Tensor, centers_per_class: int, *, reg_eps: float = REG_EPS
) -> torch.Tensor:
    """SoftTriple's regulariser R from the raw (D, C*K) centers, without a normalised copy of them.

    Per class, the K x K Gram of the unit centers (built in chunks, from scale-safe norms: columns of
    any finite norm give their cosines, a zero column cosines 0) gives R; equal to
    ``reference.soft_triple_regularizer`` up to rounding for columns of norm above F.normalize's
    eps (1e-12), where the reference's F.normalize stops normalising.
    """
    k = int(centers_per_class)
    if k == 1:
        return centers.new_zeros(())
    return _SparseCentersRaw.apply(centers.contiguous(), k, float(reg_eps))
