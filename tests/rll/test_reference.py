"""The dense reference equals PML 2.9.0 RankedListLoss in value and gradient ("pml" semantics)."""

import warnings

import pytest
import torch
from tolerance import assert_close_fp64

from rll_kernels import reference

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def _pml(emb, labels, margin, Tn, imbalance, alpha, Tp):
    """PML's loss (mean over the rows)."""
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


def _pml_rows(emb, labels, **hp):
    """PML's per-row losses (its DoNothingReducer)."""
    reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = pml_losses.RankedListLoss(reducer=reducers.DoNothingReducer(), **hp)
    return fn(emb, labels)["loss"]["losses"]


def _ids_dropping_zero_distance_negatives(emb, labels):
    """Ids under which the reference leaves out exactly the pairs PML drops: a row and its exact
    duplicates of another label share one id, so those pairs (and the diagonal) are excluded
    (docs/semantics.md §1.5); the bias still counts every column, as PML's does."""
    z = torch.nn.functional.normalize(emb, dim=1)
    ids = torch.arange(len(labels))
    for i in range(len(labels)):
        for j in range(i):
            if torch.equal(z[i], z[j]) and labels[i] != labels[j]:
                ids[i] = ids[j]
    return ids


@pytest.mark.parametrize("with_duplicate", [True, False], ids=["d0-negative", "none"])
def test_reference_differs_from_pml_only_on_zero_distance_negative(with_duplicate):
    # the documented deliberate difference (docs/semantics.md §2.8): PML drops a negative at exactly
    # d = 0, we keep it. Only the rows that hold such a negative may differ, and leaving exactly
    # those pairs out of the reference must give PML's value and gradient.
    hp = dict(margin=0.4, Tn=10.0, imbalance=0.5, alpha=None, Tp=0.0)
    emb = torch.randn(12, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3, 0, 1, 2, 3])
    if with_duplicate:
        emb[1] = emb[0]  # labels 0 and 1: each row has a negative at d = 0
    ids = _ids_dropping_zero_distance_negatives(emb, labels)
    held = ids != torch.arange(12)
    held = held | torch.isin(torch.arange(12), ids[held])  # the rows holding such a negative
    assert held.tolist() == [with_duplicate] * 2 + [False] * 10

    ours = reference.ranked_list_loss(emb, labels, semantics="pml", reduction="none", **hp)
    theirs = _pml_rows(emb, labels, **hp)
    # everywhere else: equal, row by row
    assert_close_fp64(ours[~held], theirs[~held], "rows without a d = 0 negative")
    if with_duplicate:
        # rows 0 and 1 hold the duplicate: for them L_N is dominated by v = alpha - 0 = 1.2
        assert ours[0].item() > 0.5 * 0.5 * 1.2 and ours[1].item() > 0.5 * 0.5 * 1.2
        assert (ours[held] - theirs[held]).abs().min().item() > 1e-3
        assert ours.mean().item() > _pml(emb, labels, **hp).item() + 1e-3  # PML dropped it
    # with exactly those pairs left out, value and gradient equal PML's
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    kept_out = reference.ranked_list_loss(
        e1, labels, semantics="pml", ref_emb=e1, ref_labels=labels, query_ids=ids, ref_ids=ids, **hp
    )
    pml = _pml(e2, labels, **hp)
    kept_out.backward()
    pml.backward()
    assert_close_fp64(kept_out.detach(), pml.detach(), "loss, d = 0 negatives left out")
    assert_close_fp64(e1.grad, e2.grad, "grad, d = 0 negatives left out")
