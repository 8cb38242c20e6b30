"""The Ranked List Loss accepts PML 2.9.0's whole parameter domain (docs/semantics.md §2.2).

margin = 0, alpha <= margin (positive boundary beta <= 0), a negative margin (beta above alpha: the
sets overlap in distance, the labels keep them apart), alpha <= 0 (no negative), negative
temperatures, imbalance 0 and 1: every backend gives PML's value and gradient in float64 with
``semantics="pml"``, and the dense reference's with ``semantics="paper"`` (the CUDA kernels run the
same corners through their CPU emulation in tests/test_cuda_emulated.py). Only non-finite numbers and
an imbalance outside [0, 1] are errors (§6). The backends come from the registry (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_derived, assert_close_fp64

from rll_kernels import RLLFused, ranked_list_loss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

# name -> PML RankedListLoss keyword arguments
CORNERS = {
    "margin 0": dict(margin=0.0, Tn=10.0, alpha=0.9),
    "margin 0, default alpha": dict(margin=0.0, Tn=4.0),
    "alpha below margin (beta < 0)": dict(margin=1.2, Tn=10.0, alpha=0.4, Tp=2.0),
    "alpha = margin (beta = 0)": dict(margin=0.7, Tn=5.0, alpha=0.7),
    "negative margin (beta > alpha)": dict(margin=-0.4, Tn=3.0, alpha=0.9, Tp=1.0),
    "alpha < 0 (no negative)": dict(margin=0.4, Tn=10.0, alpha=-0.2, Tp=-1.0),
    "negative temperatures": dict(margin=0.4, Tn=-8.0, Tp=-3.0),
    "imbalance 0": dict(margin=0.4, Tn=10.0, imbalance=0.0, Tp=2.0),
    "imbalance 1": dict(margin=0.4, Tn=10.0, imbalance=1.0, Tp=2.0),
    "beta < 0, negative temperatures": dict(margin=1.5, Tn=-6.0, alpha=0.8, Tp=-4.0),
    "large temperatures": dict(margin=0.2, Tn=60.0, Tp=40.0),
}


def _batch(n=24, d=6, classes=4, device="cpu"):
    """Unit-scale rows in a small D, so that distances spread over (0, 2); no duplicates."""
    e, y = torch.randn(n, d, dtype=torch.float64) * 3.0, torch.randint(0, classes, (n,))
    return e.to(device), y.to(device)


def _value_and_grad(fn, e, y):
    x = e.clone().requires_grad_()
    loss = fn(x, y)
    (g,) = torch.autograd.grad(loss * 1.3, x)  # not the last layer
    return loss.detach(), g


def _ours(params: dict, backend: str, semantics: str):
    p = dict(params)
    return lambda x, y: ranked_list_loss(
        x,
        y,
        p.pop("margin"),
        p.pop("Tn"),
        p.pop("imbalance", 0.5),
        p.pop("alpha", None),
        p.pop("Tp", 0.0),
        semantics=semantics,
        backend=backend,
    )


@pytest.mark.filterwarnings("ignore:Values of Tp or Tn are too high")
@pytest.mark.parametrize("corner", sorted(CORNERS))
@pytest.mark.backends("reference", "cpp", "triton", "cuda")
def test_pml_domain_equals_pml(backend, device, corner):
    e, y = _batch(device=device)
    params = CORNERS[corner]
    want, g_want = _value_and_grad(pml_losses.RankedListLoss(**params), e, y)
    assert want.item() > 0 and g_want.abs().max() > 0, "a corner that tests nothing"
    got, g_got = _value_and_grad(_ours(params, backend, "pml"), e, y)
    assert_close_fp64(got, want, f"{backend} {corner}: loss")
    assert_close_fp64(g_got, g_want, f"{backend} {corner}: grad")
    mod = RLLFused(**params, semantics="pml", backend=backend)
    assert_close_fp64(_value_and_grad(mod, e, y)[0], want, f"{backend} {corner}: RLLFused")


@pytest.mark.parametrize("corner", sorted(CORNERS))
def test_paper_domain_equals_reference(backend, device, corner):
    e, y = _batch(device=device)
    want, g_want = _value_and_grad(_ours(CORNERS[corner], "reference", "paper"), e, y)
    got, g_got = _value_and_grad(_ours(CORNERS[corner], backend, "paper"), e, y)
    assert_close_fp64(got, want, f"{backend} {corner}: loss")
    assert_close_fp64(g_got, g_want, f"{backend} {corner}: grad")


def _at_distances(*ds):
    """2-D unit rows: row 0 at (1, 0), row k at distance ds[k - 1] from it."""
    rows = [[1.0, 0.0]] + [[1.0 - d * d / 2, d * (1 - d * d / 4) ** 0.5] for d in ds]
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.backends("reference", "cpp", "triton", "cuda")
def test_boundaries_beyond_each_other_labels_decide(backend, device):
    # beta = 1.3 > alpha = 0.9: a pair at d = 0.6 can only be a (non-trivial) negative, one at
    # d = 1.5 only a positive, one at d = 1.1 is in no set whatever its label
    z = _at_distances(0.6, 1.5, 1.1).to(device)
    kw = dict(margin=-0.4, Tn=0.0, imbalance=0.5, alpha=0.9, Tp=0.0, reduction="none")
    cases = {(0, 1, 0, 0): 0.5 * (1.5 - 1.3) + 0.5 * (0.9 - 0.6), (0, 0, 1, 1): 0.0, (0, 1, 1, 1): 0.5 * 0.3}
    for labels, want in cases.items():
        rows = ranked_list_loss(z, torch.tensor(labels, device=device), backend=backend, **kw)
        assert abs(rows[0].item() - want) < 1e-12, (backend, labels, rows[0].item(), want)


def test_excluded_pair_with_the_largest_logit_gives_no_nan(backend, device):
    # An excluded pair is in no set. In-batch with beta < 0 the d = 0 diagonal would be a
    # positive with the largest logit when Tp < 0; without the bias its weight e^{s - log den}
    # overflows in float64 unless the kernel drops it before summing (docs/semantics.md §1.5).
    e, y = _batch(n=20, device=device)
    kw = dict(margin=1.2, Tn=10.0, imbalance=0.5, alpha=0.4, Tp=-1000.0, semantics="pml", den_rows=0)
    want, g_want = _value_and_grad(lambda x, t: ranked_list_loss(x, t, backend="reference", **kw), e, y)
    got, g_got = _value_and_grad(lambda x, t: ranked_list_loss(x, t, backend=backend, **kw), e, y)
    assert torch.isfinite(g_got).all()
    assert_close_fp64(got, want, "loss")
    assert_close_fp64(g_got, g_want, "grad")


def test_excluded_gallery_row_far_beyond_the_others_fp32(backend, device):
    # a memory-bank row of the query's own sample (same id, same label) far beyond every real
    # positive: with Tp = 1000 its logit exceeds the set's log-denominator by ~400 (exp overflows
    # in float32); it is excluded, so the gradient is the reference's
    n, d = 16, 6
    q = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(device)
    y = torch.arange(n, device=device)  # one query per class: the bank's random rows are the real positives
    bank = torch.cat([-q, F.normalize(torch.randn(12, d, dtype=torch.float64), dim=1).to(device)])
    bank_y = torch.cat([y, torch.arange(12, device=device)])
    ids = torch.arange(n, device=device)
    bank_ids = torch.cat([ids, 100 + torch.arange(12, device=device)])
    kw = dict(margin=0.2, Tn=10.0, alpha=1.0, Tp=1000.0, semantics="pml", query_ids=ids, ref_ids=bank_ids)

    def run(backend, dtype):
        x, r = q.to(dtype).requires_grad_(), bank.to(dtype).requires_grad_()
        loss = ranked_list_loss(x, y, ref_emb=r, ref_labels=bank_y, backend=backend, **kw)
        return [loss.detach(), *torch.autograd.grad(loss, [x, r])]

    ref64, ref32, got = (
        run("reference", torch.float64),
        run("reference", torch.float32),
        run(backend, torch.float32),
    )
    for name, a, b, c in zip(("loss", "grad q", "grad bank"), got, ref32, ref64):
        assert torch.isfinite(a).all(), name
        assert_close_derived(a, b, c, name)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(margin=float("nan")), "margin must be a finite number"),
        (dict(alpha=float("inf")), "alpha must be a finite number"),
        (dict(Tn=float("-inf")), "Tn must be a finite number"),
        (dict(Tp=float("nan")), "Tp must be a finite number"),
        (dict(imbalance=1.0 + 1e-9), r"imbalance must lie in \[0, 1\]"),
        (dict(imbalance=-0.5), r"imbalance must lie in \[0, 1\]"),
    ],
)
def test_only_non_finite_numbers_and_imbalance_are_errors(kw, match):
    e, y = _batch(n=6)
    with pytest.raises(ValueError, match=match):
        ranked_list_loss(e, y, **kw)
    with pytest.raises(ValueError, match=match):
        RLLFused(**kw)


def test_op_accepts_any_finite_boundaries(backend, device):
    q = F.normalize(torch.randn(8, 4, dtype=torch.float64), dim=1).to(device)
    y, ids = torch.arange(8, device=device) % 3, torch.arange(8, device=device)
    op = {"cpp": "rll_fwd", "cuda": "rll_fwd", "triton": "rll_triton_fwd"}[backend]
    for alpha, beta in ((0.5, 0.5), (0.4, -0.8), (0.9, 1.3), (-0.2, -0.6)):
        rows, *_ = getattr(torch.ops.rll_kernels, op)(
            q, y, ids, q, y, ids, alpha, beta, 3.0, -2.0, 0.5, 1e-5, None, False, True, False
        )
        assert torch.isfinite(rows).all()
