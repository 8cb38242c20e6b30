"""The dense reference equals PML 2.9.0 RankedListLoss in value and gradient ("pml" semantics)."""

import warnings

import pytest
import torch
from tolerance import assert_close_fp64

from rll_kernels import reference

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def _pml(emb, labels, margin, Tn, imbalance, alpha, Tp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PML warns for Tn or Tp > 5
        fn = pml_losses.RankedListLoss(margin=margin, Tn=Tn, imbalance=imbalance, alpha=alpha, Tp=Tp)
    return fn(emb, labels)


def _compare(emb, labels, **hp):
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    ours = reference.ranked_list_loss(e1, labels, semantics="pml", **hp)
    theirs = _pml(e2, labels, hp["margin"], hp["Tn"], hp["imbalance"], hp["alpha"], hp["Tp"])
    ours.backward()
    theirs.backward()
    assert_close_fp64(ours.detach(), theirs.detach(), "loss")
    assert_close_fp64(e1.grad, e2.grad, "grad")


@pytest.mark.parametrize("trial", range(24))
def test_reference_equals_pml_random_settings(trial):
    g = torch.Generator().manual_seed(1000 + trial)
    n = int(torch.randint(2, 90, (1,), generator=g))
    d = int(torch.randint(2, 48, (1,), generator=g))
    margin = float(torch.empty(1).uniform_(0.05, 0.8, generator=g))
    alpha = None if trial % 3 == 0 else margin + float(torch.empty(1).uniform_(0.05, 1.2, generator=g))
    hp = dict(
        margin=margin,
        Tn=float(torch.empty(1).uniform_(0.0, 20.0, generator=g)),
        Tp=float(torch.empty(1).uniform_(-10.0, 10.0, generator=g)),
        imbalance=float(torch.rand(1, generator=g)),
        alpha=alpha,
    )
    emb = torch.randn(n, d, dtype=torch.float64, generator=g)
    labels = torch.randint(0, max(1, n // 3), (n,), generator=g)
    _compare(emb, labels, **hp)


@pytest.mark.parametrize("kind", ["singletons", "all_same", "pairs"])
def test_reference_equals_pml_label_structures(kind):
    n, d = 40, 16
    emb = torch.randn(n, d, dtype=torch.float64)
    labels = {
        "singletons": torch.arange(n),
        "all_same": torch.zeros(n, dtype=torch.long),
        "pairs": torch.arange(n) // 2,
    }[kind]
    _compare(emb, labels, margin=0.4, Tn=10.0, imbalance=0.5, alpha=None, Tp=0.0)


def test_reference_differs_from_pml_only_on_zero_distance_negative():
    # the documented deliberate difference: PML drops a negative at exactly d = 0, we keep it
    emb = torch.randn(6, 8, dtype=torch.float64)
    emb[1] = emb[0]
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    ours = reference.ranked_list_loss(emb, labels, semantics="pml", reduction="none")
    theirs = _pml(emb, labels, 0.4, 10.0, 0.5, None, 0.0)
    # rows 0 and 1 hold the duplicate: for them L_N is dominated by v = alpha - 0 = 1.2
    assert ours[0].item() > 0.5 * 0.5 * 1.2 and ours[1].item() > 0.5 * 0.5 * 1.2
    assert ours.mean().item() > theirs.item() + 1e-3  # PML dropped it
