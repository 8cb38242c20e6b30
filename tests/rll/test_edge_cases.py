"""Edge cases (docs/semantics.md §2.5) on every fused backend: empty sets, duplicates, huge
temperatures, tiny batches, raw (unnormalised) rows."""

import pytest
import torch
import torch.nn.functional as F
from rll_cases import run_loss
from tolerance import assert_close_derived, assert_close_fp64

import rll_kernels
from rll_kernels import reference
from rll_kernels._backends import fused_op

fused = rll_kernels.ranked_list_loss


def _cmp(backend, emb, labels, sem, **kw):
    a = run_loss(
        lambda *x, **k: fused(*x, backend=backend, **k), emb, labels, None, None, semantics=sem, **kw
    )
    b = run_loss(reference.ranked_list_loss, emb, labels, None, None, semantics=sem, **kw)
    for x in a[:2]:
        assert torch.isfinite(x).all()
    assert_close_fp64(a[0], b[0], "loss")
    assert_close_fp64(a[1], b[1], "grad")
    return a


def _fwd(backend, q, labels, ids, alpha, beta, Tn=10.0):
    """The backend's forward op in-batch on rows it does not normalise ("paper", no gradient):
    (rows, _, stats)."""
    args = (alpha, beta, Tn, 0.0, 0.5, 0.0, None, False, False, False)
    return fused_op("rll", backend)(q, labels, ids, None, None, None, *args)[:3]


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_no_positives_singletons(backend, device, sem):
    emb = torch.randn(30, 8, dtype=torch.float64, device=device)
    loss, grad, _ = _cmp(backend, emb, torch.arange(30, device=device), sem)
    assert loss > 0


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_no_negatives_all_same_label(backend, device, sem):
    emb = torch.randn(30, 8, dtype=torch.float64, device=device)
    loss, grad, _ = _cmp(backend, emb, torch.zeros(30, dtype=torch.long, device=device), sem)
    assert loss > 0  # only the positive pull


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_every_set_empty_gives_zero_loss_and_zero_grad(backend, device, sem):
    # two far-apart classes, tight inside: every positive is trivial (d < beta), no negative (d > alpha)
    emb = torch.tensor([[1.0, 0.0]] * 5 + [[-1.0, 0.0]] * 5, dtype=torch.float64)
    emb = (emb + 1e-3 * torch.randn_like(emb)).to(device)
    labels = torch.tensor([0] * 5 + [1] * 5, device=device)
    loss, grad, _ = _cmp(backend, emb, labels, sem)
    assert loss.item() == 0.0 and grad.abs().max().item() == 0.0


@pytest.mark.parametrize("sem", ["paper", "pml"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_duplicates_zero_distance(backend, device, sem, dtype):
    emb = torch.randn(40, 16, dtype=dtype)
    emb[1] = emb[0]  # different labels: a d = 0 negative, kept, zero direction
    emb[3] = emb[2]  # same label: a trivial positive
    emb[5] = 3.0 * emb[4]  # same direction, other scale: also d = 0 after normalisation
    labels = torch.arange(40) // 4
    labels[1] = 39
    emb, labels = emb.to(device), labels.to(device)
    fn = lambda *x, **k: fused(*x, backend=backend, **k)  # noqa: E731
    a = run_loss(fn, emb, labels, None, None, semantics=sem)
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
    rows = fused(emb, labels, semantics=sem, reduction="none", backend=backend)
    assert rows[0].item() > 0.5 * 1.1


@pytest.mark.parametrize("sem", ["paper", "pml"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_huge_temperatures_no_overflow(backend, device, sem, dtype):
    emb = torch.randn(64, 12, dtype=dtype, device=device)
    labels = torch.arange(64, device=device) // 4
    fn = lambda *x, **k: fused(*x, backend=backend, **k)  # noqa: E731
    for Tn, Tp in [(100.0, 0.0), (100.0, 100.0), (1000.0, -1000.0)]:
        kw = dict(semantics=sem, Tn=Tn, Tp=Tp)
        a = run_loss(fn, emb, labels, None, None, **kw)
        b = run_loss(reference.ranked_list_loss, emb.double(), labels, None, None, **kw)
        assert torch.isfinite(a[0]).all() and torch.isfinite(a[1]).all(), (Tn, Tp)
        if dtype == torch.float64:
            assert_close_fp64(a[0], b[0], f"loss Tn={Tn}")
            assert_close_fp64(a[1], b[1], f"grad Tn={Tn}")
        else:
            c = run_loss(reference.ranked_list_loss, emb, labels, None, None, **kw)
            assert_close_derived(a[0], c[0], b[0], f"loss Tn={Tn}")
            assert_close_derived(a[1], c[1], b[1], f"grad Tn={Tn}")


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_single_query_gives_zero_with_graph(backend, device, sem):
    e = torch.randn(1, 5, device=device, requires_grad=True)
    loss = fused(e, torch.tensor([3], device=device), semantics=sem, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert e.grad is not None and e.grad.abs().max().item() == 0.0


def test_normalize_false_matches_reference(backend, device):
    emb = 3.0 * torch.randn(33, 7, dtype=torch.float64, device=device)
    labels = torch.arange(33, device=device) // 3
    for sem in ("paper", "pml"):
        _cmp(backend, emb, labels, sem, normalize=False, margin=1.0, alpha=4.0)


# ------------------------------------------------------------------ per-row upstream gradient (fp64)
def _edge_inputs(kind: str):
    n, d = 41, 12
    if kind == "one_class":  # no negatives anywhere
        return torch.randn(n, d, dtype=torch.float64), torch.zeros(n, dtype=torch.int64), {}
    if kind == "all_distinct":  # no positives anywhere
        return torch.randn(n, d, dtype=torch.float64), torch.arange(n), {}
    if kind == "singletons_mixed":  # some rows without any positive
        y = torch.cat([torch.arange(10), torch.randint(10, 13, (n - 10,))])
        return torch.randn(n, d, dtype=torch.float64), y, {}
    if kind == "duplicates":  # exact duplicates with the same and with other labels (d = 0)
        base = torch.randn(20, d, dtype=torch.float64)
        x = torch.cat([base, base[:12], 3.0 * base[:9]])  # scaled copies normalise to duplicates
        y = torch.cat([torch.randint(0, 4, (20,)), torch.randint(0, 4, (12,)), torch.randint(0, 4, (9,))])
        return x, y, {}
    if kind == "Tn100":  # overflow guard: exp(100 * 1.2) overflows without max-subtraction
        return torch.randn(n, d, dtype=torch.float64), torch.randint(0, 4, (n,)), {"Tn": 100.0, "Tp": 50.0}
    if kind == "Tp_negative":
        return torch.randn(n, d, dtype=torch.float64), torch.randint(0, 4, (n,)), {"Tp": -5.0, "margin": 0.9}
    if kind == "no_normalize":  # raw embeddings, larger distances, big margin
        return (
            0.3 * torch.randn(n, d, dtype=torch.float64),
            torch.randint(0, 3, (n,)),
            {"normalize": False, "alpha": 1.5, "margin": 0.6},
        )
    raise AssertionError(kind)


EDGES = [
    "one_class",
    "all_distinct",
    "singletons_mixed",
    "duplicates",
    "Tn100",
    "Tp_negative",
    "no_normalize",
]


@pytest.mark.parametrize("semantics", ["paper", "pml"])
@pytest.mark.parametrize("kind", EDGES)
def test_edge_cases_fp64_per_row_upstream(backend, device, kind, semantics):
    x, y, extra = _edge_inputs(kind)
    x, y = x.to(device), y.to(device)
    w = torch.randn(x.shape[0], dtype=torch.float64, device=device)
    kw = dict(semantics=semantics, reduction="none", **extra)
    fn = lambda *a, **k: fused(*a, backend=backend, **k)  # noqa: E731
    lt, gxt, _ = run_loss(fn, x, y, None, None, w, **kw)
    lr, gxr, _ = run_loss(reference.ranked_list_loss, x, y, None, None, w, **kw)
    assert torch.isfinite(lt).all() and torch.isfinite(gxt).all()
    assert_close_fp64(lt, lr, f"{kind} loss")
    assert_close_fp64(gxt, gxr, f"{kind} grad")
    if kind == "one_class":
        # every negative set empty: L_N = 0, so the loss is (1 - lambda) L_P only
        ids = torch.arange(len(y), device=device)
        stats = _fwd(backend, F.normalize(x, dim=1), y, ids, 1.2, 0.8)[2]
        assert torch.isneginf(stats[:, 2]).all() and (stats[:, 3] == 0).all()


def test_duplicate_of_other_label_is_a_negative_at_d0(backend, device):
    # a duplicate (d = 0) of another label stays in N_i (PML drops it), value alpha
    x = torch.randn(8, 6, dtype=torch.float64, device=device)
    x = F.normalize(torch.cat([x, 2.0 * x[:1]]), dim=1)
    y = torch.cat([torch.zeros(8, dtype=torch.int64), torch.ones(1, dtype=torch.int64)]).to(device)
    alpha = 1.2
    rows, _, st = _fwd(backend, x, y, torch.arange(9, device=device), alpha, alpha - 0.4)
    # row 0's only negative is its duplicate: L_N(0) = alpha - 0, log den_N = Tn * alpha
    assert abs(st[0, 3].item() - alpha) <= 1e-12 and abs(st[0, 2].item() - 10.0 * alpha) <= 1e-12
    assert_close_fp64(rows, reference.ranked_list_loss(x, y, reduction="none", normalize=False), "rows")
