"""Custom ops of the C++ extension: fake (meta) kernels and autograd registration.

The schemas are defined once in csrc/ops.cpp (TORCH_LIBRARY); every device registers its own
implementation. Importing this module loads ``rll_kernels._C`` if it was built.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)

    HAS_C = True
    C_IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    HAS_C = False
    C_IMPORT_ERROR = str(e)


def has_kernel(op: str, device: str) -> bool:
    """Whether ``rll_kernels::op`` has an implementation for ``device`` ('cpu' or 'cuda')."""
    if not HAS_C:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rll_kernels::{op}", key)


if HAS_C:

    @torch.library.register_fake("rll_kernels::rll_fwd")
    def _rll_fwd_fake(
        q, q_labels, q_ids, k, k_labels, k_ids, alpha, beta, Tn, Tp, imbalance, den_bias, attached, need_grad
    ):
        torch._check(q.dim() == 2 and k.dim() == 2, lambda: "rll_fwd: q and k must be 2-D")
        torch._check(q.shape[1] == k.shape[1], lambda: "rll_fwd: q and k embedding sizes differ")
        n, d = q.shape
        # loss and row statistics are accumulated in fp32 for half inputs (fp64 stays fp64)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        grad = q.new_empty(n, d) if (need_grad and not attached) else q.new_empty(0)
        return q.new_empty(n, dtype=acc), grad, q.new_empty(n, 4, dtype=acc)

    @torch.library.register_fake("rll_kernels::rll_bwd")
    def _rll_bwd_fake(
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

    def _rll_setup_context(ctx, inputs, output):
        q, q_labels, q_ids, k, k_labels, k_ids, alpha, beta, Tn, Tp, lam, bias, attached, need_grad = inputs
        _, gradq, stats = output
        ctx.params = (alpha, beta, Tn, Tp, lam, bias)
        ctx.attached = attached
        ctx.grad_in_forward = need_grad and not attached
        if ctx.grad_in_forward:
            # "paper": the query gradient of every row was computed in the forward pass
            ctx.save_for_backward(gradq)
        else:
            ctx.save_for_backward(q, q_labels, q_ids, k, k_labels, k_ids, stats)

    def _rll_backward(ctx, g_rows, _g_grad, _g_stats):
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        if ctx.grad_in_forward:
            (gradq,) = ctx.saved_tensors
            return (gradq * g_rows.unsqueeze(1) if need_q else None,) + (None,) * 13
        q, q_labels, q_ids, k, k_labels, k_ids, stats = ctx.saved_tensors
        need_k = need_k and ctx.attached  # the gallery is a constant with detached weights
        gq, gk = torch.ops.rll_kernels.rll_bwd(
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

    torch.library.register_autograd("rll_kernels::rll_fwd", _rll_backward, setup_context=_rll_setup_context)
