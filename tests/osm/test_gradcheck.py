"""OSM gradient (docs/semantics.md §4.3): the weights and normalisers are constants, so each backend's
gradient is checked by gradcheck against a value with the weights frozen at the evaluation point."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from osm_cases import rand_att, run


# ------------------------------------------------------------------ gradient checks
class _FrozenWeights(torch.autograd.Function):
    """Value: docs/semantics.md §4.1 with the weights frozen at x0 (so finite differences see constant
    weights); backward: the backend's gradient at x0. gradcheck compares the two."""

    @staticmethod
    def forward(ctx, x, x0, y, a, backend, alpha, sigma, lam):
        ctx.save_for_backward(x)
        ctx.args = (y, a, backend, alpha, sigma, lam)
        n = x.shape[0]
        z0, z = F.normalize(x0, dim=1), F.normalize(x, dim=1)
        iu = torch.ones(n, n, dtype=torch.bool).triu(1)
        same = (y[:, None] == y[None, :]) & iu
        diff = (y[:, None] != y[None, :]) & iu
        aij = torch.minimum(a[:, None], a[None, :])
        d0, d = torch.cdist(z0, z0), torch.cdist(z, z)
        wp = torch.where(same, torch.exp(-d0 * d0 / (2 * sigma**2)) * aij, 0.0)
        wn = torch.where(diff, (alpha - d0).clamp_min(0) * aij, 0.0)
        lp = 0.5 * (wp * d * d).sum() / wp.sum() if wp.sum() > 0 else 0.0
        ln = 0.5 * (wn * (alpha - d).clamp_min(0) ** 2).sum() / wn.sum() if wn.sum() > 0 else 0.0
        return torch.as_tensor((1 - lam) * lp + lam * ln, dtype=x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        y, a, backend, alpha, sigma, lam = ctx.args
        _, grad = run(backend, x, y, a, alpha=alpha, sigma=sigma, imbalance=lam)
        return (g * grad,) + (None,) * 7


@pytest.mark.backends("reference", "cpp", "triton")
def test_gradcheck_against_frozen_weight_finite_differences(backend):
    n = 12
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4])
    a = rand_att(n, torch.float64, lo=0.2)
    x0 = x.clone()  # gradcheck perturbs x in place; the weights stay at x0
    x = x.requires_grad_(True)
    fn = lambda xx: _FrozenWeights.apply(xx, x0, y, a, backend, 1.6, 0.7, 0.45)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
