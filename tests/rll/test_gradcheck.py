"""Ranked List Loss gradients (docs/semantics.md §2.3): "pml" is the true gradient, so finite
differences must agree with it (float64 gradcheck); "paper" is by design not the loss's gradient
(constant weights, a fixed gallery), so it is checked against a stop-gradient surrogate instead."""

import pytest
import torch
from rll_cases import make_batch
from tolerance import assert_close_fp64

import rll_kernels
from rll_kernels import reference

fused = rll_kernels.ranked_list_loss


# the C++-family backends here; Triton in the interpreter takes ~10 s per gradcheck, so it runs the
# two tight-tolerance cases below, which every backend runs too
CPP_FAMILY = pytest.mark.backends("cpp", "cuda")


@CPP_FAMILY
@pytest.mark.parametrize("red", ["mean", "none"])
def test_gradcheck_pml(backend, device, red):
    emb, labels, _, _ = make_batch(11, 5, classes=3, device=device)
    e = emb.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: fused(x, labels, semantics="pml", reduction=red, backend=backend), (e,)
    )


@CPP_FAMILY
def test_gradcheck_ref_emb_pml(backend, device):
    emb, labels, ref, ref_labels = make_batch(7, 4, classes=3, m=9, device=device)
    e, r = emb.requires_grad_(), ref.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y: fused(
            x, labels, ref_emb=y, ref_labels=ref_labels, semantics="pml", reduction="none", backend=backend
        ),
        (e, r),
    )


@pytest.mark.parametrize("with_ref", [False, True], ids=["inbatch", "ref_emb"])
def test_gradcheck_pml_with_Tp_tight_tolerance(backend, device, with_ref):
    n, d = 9, 5
    x = torch.randn(n, d, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2], device=device)
    kw = dict(semantics="pml", Tp=1.5, reduction="none", backend=backend)
    inputs = [x]
    if with_ref:
        r = torch.randn(7, d, dtype=torch.float64, device=device, requires_grad=True)
        ry = torch.tensor([0, 1, 2, 0, 1, 2, 0], device=device)
        inputs.append(r)
        fn = lambda a, b: fused(a, y, ref_emb=b, ref_labels=ry, **kw)  # noqa: E731
    else:
        fn = lambda a: fused(a, y, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_paper_gradient_is_stop_gradient_surrogate(backend, device):
    # paper gradient == gradcheck-able surrogate: weights frozen at the current point, gallery fixed
    emb, labels, _, _ = make_batch(11, 5, classes=3, device=device)
    e = emb.clone().requires_grad_()
    fused(e, labels, semantics="paper", backend=backend).backward()
    eye = torch.eye(11, dtype=torch.bool, device=device)
    z0 = torch.nn.functional.normalize(emb, dim=1)
    d0 = reference.pairwise_distance(z0, z0, eye)
    same = labels[:, None] == labels[None, :]
    pos, neg = same & ~eye & (d0 > 0.8), ~same & (d0 < 1.2)  # beta = alpha - margin = 0.8
    wp = torch.where(pos, torch.ones_like(d0), torch.zeros_like(d0))
    wn = torch.where(neg, torch.exp(10.0 * (1.2 - d0)), torch.zeros_like(d0))
    wp = wp / wp.sum(1, keepdim=True).clamp_min(1e-300)
    wn = wn / wn.sum(1, keepdim=True).clamp_min(1e-300)

    def surrogate(x):
        z = torch.nn.functional.normalize(x, dim=1)
        d = ((z[:, None, :] - z0[None, :, :]) ** 2).sum(-1).clamp_min(1e-30).sqrt()
        return (0.5 * (wp * (d - 0.8)).sum(1) + 0.5 * (wn * (1.2 - d)).sum(1)).mean()

    x = emb.clone().requires_grad_()
    surrogate(x).backward()
    assert_close_fp64(e.grad, x.grad, "paper grad vs stop-gradient surrogate", rtol=1e-9)


def test_paper_gallery_gets_no_gradient(backend, device):
    # "paper": the gallery is a constant, so a ref_emb that requires grad gets none
    emb, labels, ref, ref_labels = make_batch(20, 8, classes=3, m=30, device=device)
    r = ref.requires_grad_()
    e = emb.requires_grad_()
    fused(e, labels, ref_emb=r, ref_labels=ref_labels, semantics="paper", backend=backend).backward()
    assert r.grad is None and e.grad is not None and e.grad.abs().sum() > 0
