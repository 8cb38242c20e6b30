"""Ranked List Loss op contract: fake kernels (both ops) and the Triton op's autograd (the C++ op's,
the same formula, is csrc/rll_autograd.cpp).

Forward ``(q, q_labels, q_ids, k, k_labels, k_ids, alpha, beta, Tn, Tp, imbalance, bias_per_row,
den_rows, normalize, attached, need_grad) -> (rows (N,), gradq, stats (N, 4), z, norms)``.

* ``k`` absent (with ``k_labels`` and ``k_ids``): in-batch, the queries are the gallery, one tensor
  whatever its strides; the pairs with equal ``q_ids`` are excluded, or the pair i = i without ids.
  Else the pairs with ``q_ids[i] == k_ids[j]`` are excluded (docs/semantics.md §1.5).
* ``normalize``: the op takes the raw rows e and works on z = e/|e| (scale-safe norms, zero rows stay
  0); its gradients are w.r.t. e, through (I - z z^T)/|e| (docs/semantics.md §1.4). A non-finite row
  raises a ValueError naming ``embeddings`` or ``ref_emb`` on the CPU, and gives a NaN loss on a GPU
  (docs/semantics.md §6).
* The denominators' bias is ``bias_per_row`` x (``den_rows``, default the gallery's rows): PML's
  M * 1e-5 with ``bias_per_row = 1e-5`` (docs/semantics.md §2.8), so nothing per call depends on M.

Outputs: per-row losses; the query gradient of each row's loss (N, D) when ``need_grad and not
attached`` ("paper": computed in the forward pass), the gradient of the rows' mean (N, D) when
``need_grad and attached`` in-batch on the C++ op's CPU kernels ("pml": ``need_grad`` then says that
the upstream gradient of the rows is uniform, as the mean and sum reductions make it; both passes run
in the forward, docs/semantics.md §2.6), else an empty tensor; the row statistics
[log den_P, L_P, log den_N, L_N] that the backward op (``attached``: "pml") recomputes the tiles from;
with ``normalize`` the rows z (queries, then the gallery unless in-batch; input dtype) and their norms
|e| (accumulation dtype) that the backward reads, else empty tensors. Rows, statistics and the
forward's query gradient are in the accumulation dtype (fp32, fp64 for fp64 inputs); gradients are
returned in the input dtype; in-batch the backward returns the whole gradient as grad q.
See docs/semantics.md §2.3 and §2.6.
"""

from __future__ import annotations

import functools

import torch

from .._checks import compute_dtype
from ._schemas import OPS

__all__ = ["grad_in_forward", "rll_backward_fake", "rll_forward_fake"]


def grad_in_forward(backend: str, q, k, attached: bool, need_grad: bool) -> bool:
    """Whether the forward op of ``backend`` returns the gradient: "paper" with need_grad, and "pml"
    with need_grad in-batch on the C++ op's CPU kernels (the rule of csrc/rll_autograd.cpp)."""
    pml_in_forward = backend == "cpp" and k is None and q.device.type == "cpu"
    return need_grad and (not attached or pml_in_forward)


def rll_forward_fake(
    q,
    q_labels,
    q_ids,
    k,
    k_labels,
    k_ids,
    alpha,
    beta,
    Tn,
    Tp,
    imbalance,
    bias_per_row,
    den_rows,
    normalize,
    attached,
    need_grad,
    *,
    backend: str = "cpp",
):
    torch._check(q.dim() == 2, lambda: "rll_fwd: q must be 2-D")
    torch._check(
        k is None or (k.dim() == 2 and k.shape[1] == q.shape[1]), lambda: "rll_fwd: k must be (M, D)"
    )
    n, d = q.shape
    acc = compute_dtype(q.dtype)
    in_forward = grad_in_forward(backend, q, k, attached, need_grad)
    grad = q.new_empty(n, d, dtype=acc) if in_forward else q.new_empty(0, dtype=acc)
    rows = n if k is None else n + k.shape[0]
    z = q.new_empty(rows, d) if normalize else q.new_empty(0)
    norms = q.new_empty(rows if normalize else 0, dtype=acc)
    return q.new_empty(n, dtype=acc), grad, q.new_empty(n, 4, dtype=acc), z, norms


def rll_backward_fake(grad_rows, q, q_labels, q_ids, k, k_labels, k_ids, stats, z, norms, *rest):
    need_gq, need_gk = rest[-2], rest[-1]
    gq = q.new_empty(q.shape) if need_gq else q.new_empty(0)
    gk = k.new_empty(k.shape) if (need_gk and k is not None) else q.new_empty(0)
    return gq, gk


def _setup_context(ctx, inputs, output):
    q, q_labels, q_ids, k, k_labels, k_ids = inputs[:6]
    *params, normalize, attached, need_grad = inputs[6:]
    _, gradq, stats, z, norms = output
    ctx.params = tuple(params)  # alpha, beta, Tn, Tp, imbalance, bias_per_row, den_rows
    ctx.normalize, ctx.attached = normalize, attached
    ctx.q_dtype = q.dtype
    ctx.grad_in_forward = grad_in_forward("triton", q, k, attached, need_grad)
    if ctx.grad_in_forward:
        ctx.save_for_backward(gradq)  # "paper": every row's query gradient is already there
    else:
        ctx.save_for_backward(q, q_labels, q_ids, k, k_labels, k_ids, stats, z, norms)


_NO_GRADS = (None,) * 12  # labels, ids and every non-tensor argument after k


def _make_backward(backend: str):
    """Autograd of the forward op of ``backend``: scales the forward's gradient, or calls its backward op."""
    backward_op = getattr(torch.ops.rll_kernels, OPS["rll"][backend][1])

    def backward(ctx, g_rows, _g_grad, _g_stats, _g_z, _g_norms):
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        if ctx.grad_in_forward:
            (gradq,) = ctx.saved_tensors
            gq = (gradq * g_rows.unsqueeze(1)).to(ctx.q_dtype) if need_q else None
            return (gq, None, None, None) + _NO_GRADS
        q, q_labels, q_ids, k, k_labels, k_ids, stats, z, norms = ctx.saved_tensors
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
            z,
            norms,
            *ctx.params,
            ctx.normalize,
            ctx.attached,
            need_q,
            need_k,
        )
        return (gq if need_q else None, None, None, gk if need_k else None) + _NO_GRADS

    return backward


def _triton_forward(*args):
    from ..triton import rll as kernels  # triton is imported on the first Triton call only

    return kernels.rll_forward(*args)


def _triton_backward(*args):
    from ..triton import rll as kernels

    return kernels.rll_backward(*args)


for _backend, (_fwd, _bwd) in OPS["rll"].items():
    torch.library.register_fake(f"rll_kernels::{_fwd}", functools.partial(rll_forward_fake, backend=_backend))
    torch.library.register_fake(f"rll_kernels::{_bwd}", rll_backward_fake)
# The C++ op's autograd is registered by the extension itself (csrc/rll_autograd.cpp: the same
# formula in C++, so that an eager step runs no Python around the kernels); the Triton op's is here.
torch.library.register_autograd(
    f"rll_kernels::{OPS['rll']['triton'][0]}", _make_backward("triton"), setup_context=_setup_context
)
torch.library.register_kernel("rll_kernels::rll_triton_fwd", ("cpu", "cuda"), _triton_forward)
torch.library.register_kernel("rll_kernels::rll_triton_bwd", ("cpu", "cuda"), _triton_backward)
