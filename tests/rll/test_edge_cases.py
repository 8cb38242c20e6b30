"""Edge cases (docs/semantics.md §2.5): empty sets, duplicates, huge temperatures, tiny batches, half
inputs."""

import pytest
import torch
from rll_cases import run_loss
from tolerance import assert_close_derived, assert_close_fp64

import rll_kernels
from rll_kernels import reference

fused = rll_kernels.ranked_list_loss


def _cmp(emb, labels, sem, **kw):
    a = run_loss(lambda *x, **k: fused(*x, backend="cpp", **k), emb, labels, None, None, semantics=sem, **kw)
    b = run_loss(reference.ranked_list_loss, emb, labels, None, None, semantics=sem, **kw)
    for x in a[:2]:
        assert torch.isfinite(x).all()
    assert_close_fp64(a[0], b[0], "loss")
    assert_close_fp64(a[1], b[1], "grad")
    return a


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_no_positives_singletons(sem):
    loss, grad, _ = _cmp(torch.randn(30, 8, dtype=torch.float64), torch.arange(30), sem)
    assert loss > 0


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_no_negatives_all_same_label(sem):
    emb = torch.randn(30, 8, dtype=torch.float64)
    loss, grad, _ = _cmp(emb, torch.zeros(30, dtype=torch.long), sem)
    assert loss > 0  # only the positive pull


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_every_set_empty_gives_zero_loss_and_zero_grad(sem):
    # two far-apart classes, tight inside: every positive is trivial (d < beta), no negative (d > alpha)
    emb = torch.tensor([[1.0, 0.0]] * 5 + [[-1.0, 0.0]] * 5, dtype=torch.float64)
    emb = emb + 1e-3 * torch.randn_like(emb)
    labels = torch.tensor([0] * 5 + [1] * 5)
    loss, grad, _ = _cmp(emb, labels, sem)
    assert loss.item() == 0.0 and grad.abs().max().item() == 0.0


@pytest.mark.parametrize("sem", ["paper", "pml"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_duplicates_zero_distance(sem, dtype):
    emb = torch.randn(40, 16, dtype=dtype)
    emb[1] = emb[0]  # different labels: a d = 0 negative, kept, zero direction
    emb[3] = emb[2]  # same label: a trivial positive
    emb[5] = 3.0 * emb[4]  # same direction, other scale: also d = 0 after normalisation
    labels = torch.arange(40) // 4
    labels[1] = 39
    a = run_loss(lambda *x, **k: fused(*x, **k), emb, labels, None, None, semantics=sem)
    b = run_loss(reference.ranked_list_loss, emb.double(), labels, None, None, semantics=sem)
    assert torch.isfinite(a[0]).all() and torch.isfinite(a[1]).all()
    if dtype == torch.float64:
        assert_close_fp64(a[0], b[0], "loss")
        assert_close_fp64(a[1], b[1], "grad")
    else:
        c = run_loss(reference.ranked_list_loss, emb, labels, None, None, semantics=sem)
        assert_close_derived(a[0], c[0], b[0], "loss fp32")
        assert_close_derived(a[1], c[1], b[1], "grad fp32")
    # the duplicate negative dominates row 0's negative term: L_N(0) ~ alpha
    rows = fused(emb, labels, semantics=sem, reduction="none")
    assert rows[0].item() > 0.5 * 1.1


@pytest.mark.parametrize("sem", ["paper", "pml"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_huge_temperatures_no_overflow(sem, dtype):
    emb = torch.randn(64, 12, dtype=dtype)
    labels = torch.arange(64) // 4
    for Tn, Tp in [(100.0, 0.0), (100.0, 100.0), (1000.0, -1000.0)]:
        a = run_loss(fused, emb, labels, None, None, semantics=sem, Tn=Tn, Tp=Tp)
        b = run_loss(
            reference.ranked_list_loss, emb.double(), labels, None, None, semantics=sem, Tn=Tn, Tp=Tp
        )
        assert torch.isfinite(a[0]).all() and torch.isfinite(a[1]).all(), (Tn, Tp)
        if dtype == torch.float64:
            assert_close_fp64(a[0], b[0], f"loss Tn={Tn}")
            assert_close_fp64(a[1], b[1], f"grad Tn={Tn}")
        else:
            c = run_loss(reference.ranked_list_loss, emb, labels, None, None, semantics=sem, Tn=Tn, Tp=Tp)
            assert_close_derived(a[0], c[0], b[0], f"loss Tn={Tn}")
            assert_close_derived(a[1], c[1], b[1], f"grad Tn={Tn}")


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_single_query_gives_zero_with_graph(sem):
    e = torch.randn(1, 5, requires_grad=True)
    loss = fused(e, torch.tensor([3]), semantics=sem)
    assert loss.item() == 0.0
    loss.backward()
    assert e.grad is not None and e.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_fp32(dtype):
    emb = torch.randn(50, 16).to(dtype)
    labels = torch.arange(50) // 5
    e = emb.clone().requires_grad_()
    loss = fused(e, labels, Tn=10.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert e.grad.dtype == dtype and torch.isfinite(e.grad.float()).all()
    # same upcast inputs: the fp32 kernel against the fp32 / fp64 references of those inputs
    assert_close_derived(
        loss,
        reference.ranked_list_loss(emb.float(), labels),
        reference.ranked_list_loss(emb.double(), labels),
        "loss",
    )


def test_normalize_false_matches_reference():
    emb = 3.0 * torch.randn(33, 7, dtype=torch.float64)
    labels = torch.arange(33) // 3
    for sem in ("paper", "pml"):
        _cmp(emb, labels, sem, normalize=False, margin=1.0, alpha=4.0)
