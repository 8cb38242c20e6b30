"""OSM + CAA weighted contrastive loss op contract: fake kernel and autograd, shared by the C++ op and
its Triton twin.

Forward ``(x, labels, attention, alpha, sigma, imbalance, normalize, need_grad) -> (loss (), dL/dx (N, D)
or (0,), sums (4,) float64 [S+, T+, S-, T-])`` on the raw embeddings x (any strides; normalised inside
the op when ``normalize``, docs/semantics.md §1.4). The pair weights are constants, so the forward
computes the gradient, through the normalisation, in the same pass and the backward only scales it by
the incoming gradient (docs/semantics.md §4.3 and §4.4).
"""

from __future__ import annotations

import torch

from ._schemas import OPS

__all__ = ["osm_forward_fake"]


def osm_forward_fake(x, labels, attention, alpha, sigma, imbalance, normalize, need_grad):
    torch._check(x.dim() == 2, lambda: "osm: x must be 2-D")
    grad = x.new_empty(x.shape) if need_grad else x.new_empty(0)  # contiguous whatever the strides of x
    return x.new_empty(()), grad, x.new_empty(4, dtype=torch.float64)


def _setup_context(ctx, inputs, output):
    _, grad, _ = output
    ctx.has_grad = bool(inputs[-1])  # the gradient was computed in the forward pass
    ctx.save_for_backward(grad)


def _backward(ctx, g_loss, _g_grad, _g_sums):
    if not ctx.needs_input_grad[0]:
        return (None,) * 8
    if not ctx.has_grad:
        raise RuntimeError("osm: the forward ran with need_grad=False; no gradient was computed")
    (grad,) = ctx.saved_tensors
    return (grad * g_loss,) + (None,) * 7


def _triton_forward(*args):
    from ..triton import osm as kernels  # triton is imported on the first Triton call only

    return kernels.osm_forward(*args)


for _fwd, _ in OPS["osm"].values():
    torch.library.register_fake(f"rll_kernels::{_fwd}", osm_forward_fake)
    torch.library.register_autograd(f"rll_kernels::{_fwd}", _backward, setup_context=_setup_context)
torch.library.register_kernel("rll_kernels::osm_triton_fwd", ("cpu", "cuda"), _triton_forward)
