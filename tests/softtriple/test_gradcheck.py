"""SoftTriple gradients (docs/semantics.md §3.3): nothing is detached, so float64 finite
differences must agree with every backend's gradient, of the embeddings and of the raw centers."""

from __future__ import annotations

import pytest
import torch
from softtriple_cases import problem

from rll_kernels import soft_triple_loss


@pytest.mark.parametrize(
    "n, c, k, d, tau, reduction",
    [(7, 4, 3, 5, 0.2, "mean"), (7, 4, 3, 5, 0.0, "none"), (5, 3, 2, 4, 0.2, "mean")],
    ids=["regularised", "per-row", "small"],  # "none": every row's gradient separately
)
def test_gradcheck(backend, device, n, c, k, d, tau, reduction):
    e, y, w = problem(n, c, k, d, device=device)
    e.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: soft_triple_loss(a, y, b, k, 5.0, 0.3, 0.1, tau, reduction=reduction, backend=backend),
        (e, w),
    )
