"""SoftTriple gradients (docs/semantics.md §3.3): nothing is detached, so float64 finite
differences must agree with every backend's gradient, of the embeddings and of the raw centers."""

from __future__ import annotations

import torch
from softtriple_cases import problem

from rll_kernels import soft_triple_loss


def test_gradcheck(backend, device):
    e, y, w = problem(7, 4, 3, 5, device=device)
    e.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: soft_triple_loss(a, y, b, 3, 5.0, 0.3, 0.1, 0.2, backend=backend), (e, w)
    )
    # per-row losses: every row's gradient separately
    assert torch.autograd.gradcheck(
        lambda a, b: soft_triple_loss(a, y, b, 3, 5.0, 0.3, 0.1, 0.0, reduction="none", backend=backend),
        (e, w),
    )


def test_gradcheck_small_batch(backend, device):
    e, y, w = problem(5, 3, 2, 4, device=device)
    e.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: soft_triple_loss(a, y, b, 2, 5.0, 0.3, 0.1, 0.2, backend=backend), (e, w)
    )
