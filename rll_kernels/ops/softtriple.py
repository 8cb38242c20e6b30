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


class _SparseCentersRaw(torch.autograd.Function):
    """R from the raw centers with a hand-written backward that makes one D x C*K gradient.

    Plain autograd through the batched Gram makes two (C, K, D) gradients (one per bmm operand),
    a layout copy and their sum: about 3 x 232 MB at SOP scale. Here
    dR/dw_t = sum_s M_ts w_s per class, with M = r A r^T + diag(-q_t sum_s A_ts cos_ts),
    A = dR/dcos (symmetric), r = 1/|w| and q = r^2 (0 where F.normalize clamps the norm).
    """

    @staticmethod
    def forward(ctx, centers: torch.Tensor, k: int, reg_eps: float) -> torch.Tensor:
        d, ck = centers.shape
        c = ck // k
        wc = centers.view(d, c, k).permute(1, 2, 0)  # (C, K, D) view
        nrm = torch.linalg.vector_norm(centers, dim=0)
        rn = 1.0 / nrm.clamp_min(1e-12)
        cos = torch.bmm(wc, wc.transpose(1, 2)) * (rn.view(c, k, 1) * rn.view(c, 1, k))
        # a cosine above 1 is rounding: clamped, as PML's SparseCentersRegularizer clamps 2 cos at 2
        root = torch.sqrt(2.0 + reg_eps - 2.0 * cos.clamp(max=1.0))
        upper = torch.ones(k, k, dtype=torch.bool, device=centers.device).triu(1)
        ctx.save_for_backward(centers, nrm, cos, root)
        ctx.k = k
        return (root * upper).sum() / (c * k * (k - 1))

    @staticmethod
    def backward(ctx, g):
        centers, nrm, cos, root = ctx.saved_tensors
        k = ctx.k
        d, ck = centers.shape
        c = ck // k
        rn = (1.0 / nrm.clamp_min(1e-12)).view(c, k)
        q = torch.where(nrm > 1e-12, 1.0 / nrm.clamp_min(1e-12) ** 2, torch.zeros_like(nrm)).view(c, k)
        off = ~torch.eye(k, dtype=torch.bool, device=centers.device)
        # dR/dcos_ts for t != s, both orders (each unordered pair appears once in R); 0 where the cosine
        # was clamped, and at root = 0 (coinciding centers with a tiny reg_eps: PML's gradient is NaN
        # there; the cosine's own gradient vanishes for coinciding directions)
        live = off & (cos <= 1.0) & (root > 0)
        a = torch.where(live, -g / (root * (c * k * (k - 1))), torch.zeros_like(root))
        m = a * (rn.unsqueeze(2) * rn.unsqueeze(1))
        m = m - torch.diag_embed(q * (a * cos).sum(2))  # (C, K, K)
        out = torch.empty_like(centers)
        step = max(1, (1 << 22) // max(1, ck))  # D rows per chunk: temporaries of about 16 MB
        for d0 in range(0, d, step):
            blk = centers[d0 : d0 + step].view(-1, c, k)  # (dc, C, K)
            out[d0 : d0 + step].view(-1, c, k).copy_(torch.einsum("dcs,cts->dct", blk, m))
        return out, None, None


def sparse_centers_raw(
    centers: torch.Tensor, centers_per_class: int, *, reg_eps: float = REG_EPS
) -> torch.Tensor:
    """SoftTriple's regulariser R from the raw (D, C*K) centers, without a normalised copy of them.

    Per class, the K x K Gram of the raw centers divided by the outer product of their norms (the
    norms clamped at 1e-12, as F.normalize) gives the cosines; equal to
    ``reference.soft_triple_regularizer`` up to rounding.
    """
    k = int(centers_per_class)
    if k == 1:
        return centers.new_zeros(())
    return _SparseCentersRaw.apply(centers.contiguous(), k, float(reg_eps))
