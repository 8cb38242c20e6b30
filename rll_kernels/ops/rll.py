"""Ranked List Loss op contract: fake kernels and autograd, shared by the C++ op and its Triton twin.

Forward ``(q, q_labels, q_ids, k, k_labels, k_ids, alpha, beta, Tn, Tp, imbalance, den_bias, attached,
need_grad) -> (rows (N,), gradq, stats (N, 4))``: per-row losses, the query gradient of each row's
loss (N, D) when ``need_grad and not attached`` ("paper": computed in the forward pass) else an empty
tensor, and the row statistics [log den_P, L_P, log den_N, L_N] that the backward op
(``attached``: "pml") recomputes the tiles from. Pairs with ``q_ids[i] == k_ids[j]`` are excluded.
Rows, statistics and the forward's query gradient are in the accumulation dtype (fp32, fp64 for fp64
inputs); gradients are returned in the input dtype. See docs/semantics.md §2.3 and §2.6.
"""

from __future__ import annotations

import torch

from .._checks import compute_dtype
from ._schemas import OPS

__all__ = ["rll_backward_fake", "rll_forward_fake"]


def rll_forward_fake(
    q, q_labels, q_ids, k, k_labels, k_ids, alpha, beta, Tn, Tp, imbalance, den_bias, attached, need_grad
):
    torch._check(q.dim() == 2 and k.dim() == 2, lambda: "rll_fwd: q and k must be 2-D")
    torch._check(q.shape[1] == k.shape[1], lambda: "rll_fwd: q and k embedding sizes differ")
    n, d = q.shape
    acc = compute_dtype(q.dtype)
    grad = q.new_empty(n, d, dtype=acc) if (need_grad and not attached) else q.new_empty(0, dtype=acc)
    return q.new_empty(n, dtype=acc), grad, q.new_empty(n, 4, dtype=acc)


def rll_backward_fake(
    grad_rows,
    q,
    q_labels,
    q_ids,
    k,
    k_labels,
    k_ids,
    stats,
    alpha,
    beta,
    Tn,
    Tp,
    imbalance,
    den_bias,
    attached,
    need_gq,
    need_gk,
):
    gq = torch.empty_like(q) if need_gq else q.new_empty(0)
    gk = torch.empty_like(k) if need_gk else k.new_empty(0)
    return gq, gk


def _setup_context(ctx, inputs, output):
    q, q_labels, q_ids, k, k_labels, k_ids, alpha, beta, Tn, Tp, lam, bias, attached, need_grad = inputs
    _, gradq, stats = output
    ctx.params = (alpha, beta, Tn, Tp, lam, bias)
    ctx.attached = attached
    ctx.q_dtype = q.dtype
    ctx.grad_in_forward = need_grad and not attached
    if ctx.grad_in_forward:
        ctx.save_for_backward(gradq)  # "paper": every row's query gradient is already there
    else:
        ctx.save_for_backward(q, q_labels, q_ids, k, k_labels, k_ids, stats)


def _make_backward(backend: str):
    """Autograd of the forward op of ``backend``: scales the forward's gradient, or calls its backward op."""
    backward_op = getattr(torch.ops.rll_kernels, OPS["rll"][backend][1])

    def backward(ctx, g_rows, _g_grad, _g_stats):
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        if ctx.grad_in_forward:
            (gradq,) = ctx.saved_tensors
            gq = (gradq * g_rows.unsqueeze(1)).to(ctx.q_dtype) if need_q else None
            return (gq,) + (None,) * 13
        q, q_labels, q_ids, k, k_labels, k_ids, stats = ctx.saved_tensors
        need_k = need_k and ctx.attached  # "paper": the gallery is a constant
        gq, gk = backward_op(
            g_rows.contiguous(),
            q,
            q_labels,
            q_ids,
            k,
            k_labels,
            k_ids,
            stats,
            *ctx.params,
            ctx.attached,
            need_q,
            need_k,
        )
        return (gq if need_q else None, None, None, gk if need_k else None) + (None,) * 10

    return backward


def _triton_forward(*args):
    from ..triton import rll as kernels  # triton is imported on the first Triton call only

    return kernels.rll_forward(*args)


def _triton_backward(*args):
    from ..triton import rll as kernels

    return kernels.rll_backward(*args)


for _backend, (_fwd, _bwd) in OPS["rll"].items():
    torch.library.register_fake(f"rll_kernels::{_fwd}", rll_forward_fake)
    torch.library.register_fake(f"rll_kernels::{_bwd}", rll_backward_fake)
    torch.library.register_autograd(
        f"rll_kernels::{_fwd}", _make_backward(_backend), setup_context=_setup_context
    )
torch.library.register_kernel("rll_kernels::rll_triton_fwd", ("cpu", "cuda"), _triton_forward)
torch.library.register_kernel("rll_kernels::rll_triton_bwd", ("cpu", "cuda"), _triton_backward)
