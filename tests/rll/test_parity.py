"""Fused C++ CPU kernel vs the dense reference: values and gradients, fp64 and fp32."""

import pytest
import torch
from rll_cases import make_batch, run_loss
from tolerance import assert_close_derived, assert_close_fp64

import rll_kernels
from rll_kernels import reference

fused = rll_kernels.ranked_list_loss
SIZES_N = [1, 2, 3, 37, 129, 1000]
SIZES_D = [1, 3, 64, 300]


def _both(emb, labels, ref, ref_labels, sem, red, dtype, grad_out=None, **hp):
    kw = dict(semantics=sem, reduction=red, **hp)
    a = run_loss(
        lambda *x, **k: fused(*x, backend="cpp", **k),
        emb.to(dtype),
        labels,
        None if ref is None else ref.to(dtype),
        ref_labels,
        grad_out,
        **kw,
    )
    b = run_loss(
        reference.ranked_list_loss,
        emb.to(dtype),
        labels,
        None if ref is None else ref.to(dtype),
        ref_labels,
        grad_out,
        **kw,
    )
    return a, b


def _check(emb, labels, ref, ref_labels, sem, red, **hp):
    n = emb.shape[0]
    g = torch.rand(n, dtype=torch.float64) + 0.5 if red == "none" else None
    if emb.shape[1] == 1:
        return _check_d1(emb, labels, ref, ref_labels, sem, red, g, **hp)
    (l64, e64, r64), (L64, E64, R64) = _both(emb, labels, ref, ref_labels, sem, red, torch.float64, g, **hp)
    assert_close_fp64(l64, L64, "loss fp64")
    assert_close_fp64(e64, E64, "grad emb fp64")
    if sem == "pml" and ref is not None:
        assert_close_fp64(r64, R64, "grad ref fp64")
    (l32, e32, r32), (L32, E32, R32) = _both(emb, labels, ref, ref_labels, sem, red, torch.float32, g, **hp)
    assert torch.isfinite(l32).all() and torch.isfinite(e32).all()
    assert_close_derived(l32, L32, L64, "loss fp32")
    assert_close_derived(e32, E32, E64, "grad emb fp32")
    if sem == "pml" and ref is not None:
        assert_close_derived(r32, R32, R64, "grad ref fp32")


def _check_d1(emb, labels, ref, ref_labels, sem, red, g, **hp):
    # D = 1: normalised embeddings are +-1, every pair is a duplicate (d = 0) or opposite (d = 2),
    # and the tangent space of the sphere is empty, so the true gradient is exactly 0: both the
    # kernel and the reference return rounding noise of the pre-projection gradient (O(N) terms).
    for dt in (torch.float64, torch.float32):
        (l, e, r), (L, E, R) = _both(emb, labels, ref, ref_labels, sem, red, dt, g, **hp)
        assert_close_fp64(l.double(), L.double(), f"loss D=1 {dt}", rtol=10 * torch.finfo(dt).eps)
        m = emb.shape[0] + (0 if ref is None else ref.shape[0])
        noise = 8 * m * torch.finfo(dt).eps
        assert e.abs().max().item() <= noise and E.abs().max().item() <= noise


@pytest.mark.parametrize("d", SIZES_D)
@pytest.mark.parametrize("n", SIZES_N)
@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_in_batch_sizes(n, d, sem):
    emb, labels, _, _ = make_batch(n, d)
    for red in ("mean", "sum", "none"):
        _check(emb, labels, None, None, sem, red, Tp=0.0)


@pytest.mark.parametrize("d", SIZES_D)
@pytest.mark.parametrize("n", SIZES_N)
@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_ref_emb_sizes(n, d, sem):
    m = {1: 5, 2: 1, 3: 700, 37: 64, 129: 513, 1000: 1031}[n]
    emb, labels, ref, ref_labels = make_batch(n, d, m=m)
    for red in ("mean", "none"):
        _check(emb, labels, ref, ref_labels, sem, red, Tp=0.0)


@pytest.mark.parametrize("sem", ["paper", "pml"])
@pytest.mark.parametrize(
    "hp",
    [
        dict(margin=0.4, Tn=10.0, Tp=0.0, imbalance=0.5),
        dict(margin=0.2, Tn=3.0, Tp=-10.0, imbalance=0.3, alpha=1.4),
        dict(margin=0.6, Tn=0.0, Tp=7.0, imbalance=0.9, alpha=1.0),
        dict(margin=0.4, Tn=100.0, Tp=50.0, imbalance=0.5),
    ],
    ids=["default", "negTp", "Tn0", "hot"],
)
def test_hyper_parameters(sem, hp):
    emb, labels, _, _ = make_batch(77, 24)
    _check(emb, labels, None, None, sem, "mean", **hp)


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_clustered_embeddings_many_active_pairs(sem):
    # tight classes, so most negatives and positives are non-trivial: every tile path is exercised
    n, d = 300, 16
    centers = torch.randn(8, d, dtype=torch.float64)
    labels = torch.randint(0, 8, (n,))
    emb = centers[labels] + 0.6 * torch.randn(n, d, dtype=torch.float64)
    _check(emb, labels, None, None, sem, "mean")


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_all_same_labels_dense_positive_tiles(sem):
    # every pair is a positive: the dense (GEMM) positive path of the paper kernel
    emb, _, _, _ = make_batch(700, 32)
    labels = torch.zeros(700, dtype=torch.long)
    _check(emb, labels, None, None, sem, "mean", margin=1.2, alpha=1.3)


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_not_last_layer_grad_output(sem):
    # loss * 2 before backward: the saved forward gradient must be scaled by grad_output
    emb, labels, _, _ = make_batch(50, 12)
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    (2.0 * fused(e1, labels, semantics=sem) + 0.0).backward()
    (2.0 * reference.ranked_list_loss(e2, labels, semantics=sem)).backward()
    assert_close_fp64(e1.grad, e2.grad, "grad of 2 * loss")


@pytest.mark.parametrize("red", ["mean", "none"])
def test_gradcheck_pml(red):
    # "pml" is the true gradient of the loss, so finite differences must agree. ("paper" is by
    # design not the loss's gradient: constant weights and a fixed gallery; it is checked against
    # the reference's autograd with those stop-gradients instead.)
    emb, labels, _, _ = make_batch(11, 5, classes=3)
    e = emb.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fused(x, labels, semantics="pml", reduction=red), (e,))


def test_paper_gradient_is_stop_gradient_surrogate():
    # paper gradient == gradcheck-able surrogate: weights frozen at the current point, gallery fixed
    emb, labels, _, _ = make_batch(11, 5, classes=3)
    e = emb.clone().requires_grad_()
    fused(e, labels, semantics="paper").backward()
    z0 = torch.nn.functional.normalize(emb, dim=1)
    d0 = reference.pairwise_distance(z0, z0, torch.eye(11, dtype=torch.bool))
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(11, dtype=torch.bool)
    pos, neg = same & off & (d0 > 0.8), ~same & (d0 < 1.2)  # beta = alpha - margin = 0.8
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


def test_gradcheck_ref_emb_pml():
    emb, labels, ref, ref_labels = make_batch(7, 4, classes=3, m=9)
    e, r = emb.requires_grad_(), ref.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y: fused(x, labels, ref_emb=y, ref_labels=ref_labels, semantics="pml", reduction="none"),
        (e, r),
    )


def test_paper_gallery_gets_no_gradient():
    emb, labels, ref, ref_labels = make_batch(20, 8, m=30)
    r = ref.requires_grad_()
    e = emb.requires_grad_()
    fused(e, labels, ref_emb=r, ref_labels=ref_labels, semantics="paper").backward()
    assert r.grad is None and e.grad is not None and e.grad.abs().sum() > 0
