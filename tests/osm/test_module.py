"""WeightedContrastiveFused, the module, and class_aware_attention (docs/semantics.md §4.2): defaults,
dtypes, no-grad use, attention never differentiated."""

from __future__ import annotations

import pytest
import torch
from osm_cases import rand_att
from tolerance import assert_close_fp64

import rll_kernels
from rll_kernels import reference


# ------------------------------------------------------------------ API
def test_module_and_dtypes():
    m = rll_kernels.WeightedContrastiveFused()
    assert (m.alpha, m.sigma, m.imbalance) == (1.2, 0.8, 0.5) and "sigma=0.8" in repr(m)
    x = torch.randn(30, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    a = rand_att(30, torch.float64)
    assert_close_fp64(m(x, y, a), reference.weighted_contrastive_loss(x, y, a), "module loss")
    lb = m(x.to(torch.bfloat16), y)  # half types run in fp32
    assert lb.dtype == torch.float32 and torch.isfinite(lb)
    with torch.no_grad():
        assert_close_fp64(m(x, y, a), reference.weighted_contrastive_loss(x, y, a), "no-grad loss")


@pytest.mark.backends("reference", "cpp", "triton")
def test_attention_is_never_differentiated(backend, device):
    x = torch.randn(10, 4, dtype=torch.float64, device=device, requires_grad=True)
    a = rand_att(10, torch.float64, device=device).requires_grad_(True)
    y = torch.randint(0, 2, (10,), device=device)
    loss = rll_kernels.weighted_contrastive_loss(x, y, a, backend=backend)
    gx, ga = torch.autograd.grad(loss, (x, a), allow_unused=True)
    assert ga is None and gx is not None


def test_class_aware_attention():
    logits = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (13,))
    a = rll_kernels.class_aware_attention(logits, y)
    want = torch.softmax(logits.detach(), 1)[torch.arange(13), y]
    assert_close_fp64(a, want, "attention")
    assert not a.requires_grad and a.dtype == torch.float64
    g = rll_kernels.class_aware_attention(logits, y, gaussian_sigma=0.68)
    assert_close_fp64(g, torch.exp(-((1 - want) ** 2) / (2 * 0.68**2)), "gaussian attention")
    # an outlier whose true class has probability 0 still gets a valid attention in (0, 1]
    far = torch.tensor([[0.0, 1e4], [5.0, 0.0]])
    a_far = rll_kernels.class_aware_attention(far, torch.tensor([0, 0]))
    assert (a_far > 0).all() and (a_far <= 1).all()
    rll_kernels.weighted_contrastive_loss(torch.randn(2, 3), torch.tensor([0, 0]), a_far)  # accepted
    with pytest.raises(ValueError, match="labels"):
        rll_kernels.class_aware_attention(logits, torch.full((13,), 5))
    with pytest.raises(ValueError, match="logits"):
        rll_kernels.class_aware_attention(logits[0], y[:1])
