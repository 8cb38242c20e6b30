"""rll_kernels.pml: the exact drop-ins for PML 2.9.0 (docs/semantics.md §2.8, §3.6).

Each class, with each reducer, regulariser, distance and inside each of PML's wrappers, equals
PML's own class in the same place: float64, value and gradient, relative error <= 1e-9.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys

import pytest
import torch
import torch.distributed as dist
from gloo_spawn import assert_errors_below, init_gloo, save_and_exit, spawn
from tolerance import assert_close_fp64

import rll_kernels

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import distances, miners, reducers, regularizers  # noqa: E402
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper  # noqa: E402

from rll_kernels import pml  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Values of Tp or Tn are too high")

N, D, C, K = 24, 8, 4, 3
RTOL = 1e-9


def _batch(n=N, scale=3.0):
    return torch.randn(n, D, dtype=torch.float64) * scale, torch.randint(0, C, (n,))


def _pair(name: str, backend: str = "auto", **kw):
    """(ours on ``backend``, PML's), built from equal keyword arguments (PML's gets a deep copy of every
    reducer, regulariser and distance object, so their stats are their own); SoftTriple's centers shared."""
    if name == "rll":
        kw = {"margin": 0.4, "Tn": 10.0, "Tp": 2.0, **kw}
        return pml.RankedListLoss(**kw, backend=backend), pml_losses.RankedListLoss(**copy.deepcopy(kw))
    kw = {"num_classes": C, "embedding_size": D, "centers_per_class": K, **kw}
    ours = pml.SoftTripleLoss(**kw, backend=backend).double()
    theirs = pml_losses.SoftTripleLoss(**copy.deepcopy(kw)).double()
    with torch.no_grad():
        theirs.fc.copy_(ours.fc)
    return ours, theirs


def _run(loss, e, y, call=None):
    """Loss value (or the DoNothingReducer's dict) and the gradients of the embeddings and parameters."""
    x = e.clone().requires_grad_()
    out = (call or (lambda f, a, b: f(a, b)))(loss, x, y)
    value = (
        out["loss"]["losses"].sum() + out.get("weight_reg_loss", {"losses": 0})["losses"]
        if isinstance(out, dict)
        else out
    )
    params = [x, *loss.parameters()]
    return [value.detach(), *torch.autograd.grad(value * 1.3, params)]


def _assert_same(ours, theirs, e, y, call=None, what=""):
    got, want = _run(ours, e, y, call), _run(theirs, e, y, call)
    assert want[0].abs() > 0 and want[1].abs().max() > 0, f"{what}: a case that tests nothing"
    for name, a, b in zip(("loss", "grad embeddings", "grad centers"), got, want):
        assert_close_fp64(a, b, f"{what} {name}", rtol=RTOL)


# ------------------------------------------------------------------ the base-class contract
@pytest.mark.parametrize("name", ["rll", "st"])
def test_subclass_of_pml_with_pml_names_and_signature(name):
    ours, theirs = _pair(name)
    assert isinstance(ours, pml_losses.BaseMetricLossFunction) and isinstance(ours, type(theirs))
    assert type(ours).__name__ == type(theirs).__name__
    mine = inspect.signature(type(ours).__init__).parameters
    for p in inspect.signature(type(theirs).__init__).parameters.values():
        assert p.name in mine, p.name
        if p.default is not inspect.Parameter.empty:
            assert mine[p.name].default == p.default, p.name
    assert mine["backend"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.loss("rll")
@pytest.mark.backends("reference", "cpp", "triton", "cuda")
def test_rll_default_equals_pml_on_every_backend(backend, device):
    e, y = _batch()
    ours, theirs = _pair("rll", backend=backend)
    _assert_same(ours, theirs, e.to(device), y.to(device), what=f"rll {backend}")


@pytest.mark.loss("softtriple")
@pytest.mark.backends("reference", "cpp", "triton")
def test_softtriple_default_equals_pml_on_every_backend(backend, device):
    e, y = _batch()
    ours, theirs = _pair("st", backend=backend)
    ours, theirs = ours.to(device), theirs.to(device)
    _assert_same(ours, theirs, e.to(device), y.to(device), what=f"softtriple {backend}")


REDUCERS = {
    "MeanReducer": reducers.MeanReducer,
    "AvgNonZeroReducer": reducers.AvgNonZeroReducer,
    "ThresholdReducer": lambda: reducers.ThresholdReducer(low=0.2, high=3.0),
    "SumReducer": reducers.SumReducer,
    "ClassWeightedReducer": lambda: reducers.ClassWeightedReducer(torch.tensor([0.5, 1.0, 2.0, 0.1])),
    "PerAnchorReducer": lambda: reducers.PerAnchorReducer(reducers.AvgNonZeroReducer()),
    "DoNothingReducer": reducers.DoNothingReducer,
    "MultipleReducers": lambda: reducers.MultipleReducers({"loss": reducers.SumReducer()}),
}


# RLL with alpha = 0.5: the first half of the batch are duplicates of one row (label 0, the only rows
# of class 0) with no negative inside alpha, so their losses are 0 for the reducers to drop or keep
RLL_ZERO_ROWS = dict(margin=0.4, alpha=0.5)


def _batch_with_zero_rows():
    e, y = _batch()
    e[: N // 2], y[: N // 2] = e[0], 0
    y[N // 2 :] = 1 + y[N // 2 :] % (C - 1)
    return e, y


@pytest.mark.parametrize("reducer", sorted(REDUCERS))
@pytest.mark.parametrize("name", ["rll", "st"])
def test_each_reducer_equals_pml(name, reducer):
    kw = RLL_ZERO_ROWS if name == "rll" else {}
    ours, theirs = _pair(name, reducer=REDUCERS[reducer](), **kw)
    e, y = _batch_with_zero_rows() if name == "rll" else _batch()
    _assert_same(ours, theirs, e, y, what=f"{name} {reducer}")


def test_the_rll_reducer_batch_has_zero_rows():
    # the reducer cases above are not a MeanReducer in disguise
    e, y = _batch_with_zero_rows()
    rows = pml.RankedListLoss(Tn=10.0, Tp=2.0, reducer=reducers.DoNothingReducer(), **RLL_ZERO_ROWS)(e, y)
    rows = rows["loss"]["losses"]
    assert (rows[: N // 2] == 0).all() and (rows[N // 2 :] > 0.2).all()
    avg_non_zero = pml.RankedListLoss(Tn=10.0, Tp=2.0, reducer=reducers.AvgNonZeroReducer(), **RLL_ZERO_ROWS)
    assert abs(avg_non_zero(e, y).item() - 2 * rows.mean().item()) < 1e-12


@pytest.mark.parametrize("name", ["rll", "st"])
def test_reducer_of_pairs_or_divisor_is_a_clear_error(name):
    class PairsOnly(reducers.BaseReducer):
        def pos_pair_reduction(self, losses, *args):
            return losses.mean()

    for reducer in (reducers.DivisorReducer(), PairsOnly()):
        ours, _ = _pair(name, reducer=reducer)
        with pytest.raises(ValueError, match=f"reducer={type(reducer).__name__} needs pairs"):
            ours(*_batch())


# ------------------------------------------------------------------ regularisers, distances
def test_sparse_centers_regularizer_runs_fused_and_equals_pml():
    kw = dict(weight_regularizer=regularizers.SparseCentersRegularizer(C, K), weight_reg_weight=0.2)
    ours, theirs = _pair("st", **kw)

    def boom(*_):
        raise AssertionError("PML's dense regulariser ran")

    ours.weight_regularizer.compute_loss = boom  # the fused path never calls it
    e, y = _batch()
    _assert_same(ours, theirs, e, y, what="SparseCentersRegularizer")

    # two centers of class 0 in one direction: the cosine rounds to 1 or just above, which PML clamps;
    # PML's value is kept, its gradient is NaN when the cosine rounds below 1 (sqrt of ~tiny), ours finite
    with torch.no_grad():
        ours.fc[:, 1] = 1.7 * ours.fc[:, 0]
        theirs.fc.copy_(ours.fc)
    got, want = _run(ours, e, y), _run(theirs, e, y)
    assert_close_fp64(got[0], want[0], "coinciding centers: loss", rtol=RTOL)
    assert torch.isfinite(got[2]).all()


def test_other_regularizers_are_applied_as_pml_applies_them():
    stats = regularizers.SparseCentersRegularizer(C, K, collect_stats=True)
    kw = dict(weight_regularizer=stats, embedding_regularizer=regularizers.LpRegularizer())
    ours, theirs = _pair("st", **kw, embedding_reg_weight=0.3)
    e, y = _batch()
    _assert_same(ours, theirs, e, y, what="SoftTriple + regularisers")
    assert ours.weight_regularizer.same_class_center_sim == theirs.weight_regularizer.same_class_center_sim
    kw = dict(weight_regularizer=regularizers.LpRegularizer(), weight_reg_weight=0.5)
    _assert_same(*_pair("st", **kw), e, y, what="SoftTriple + LpRegularizer")
    kw = dict(embedding_regularizer=regularizers.LpRegularizer(p=1), embedding_reg_weight=0.1)
    _assert_same(*_pair("rll", **kw), e, y, what="RLL + embedding regulariser")


def test_fused_distances_equal_pml():
    e, y = _batch(scale=0.4)  # unnormalised rows at distances around 1
    kw = dict(distance=distances.LpDistance(normalize_embeddings=False), margin=0.3, alpha=0.8)
    _assert_same(*_pair("rll", **kw), e, y, what="LpDistance(normalize_embeddings=False)")
    kw = dict(distance=distances.DotProductSimilarity())
    _assert_same(*_pair("st", **kw), e, y, what="DotProductSimilarity")


@pytest.mark.parametrize(
    "name, distance",
    [
        ("rll", distances.CosineSimilarity()),
        ("rll", distances.LpDistance(power=2)),
        ("rll", distances.LpDistance(p=1)),
        ("st", distances.LpDistance()),
        ("st", distances.CosineSimilarity(power=2)),
    ],
)
def test_unfused_distance_names_what_is_supported(name, distance):
    supported = "LpDistance\\(p=2, power=1\\)" if name == "rll" else "CosineSimilarity\\(\\)"
    with pytest.raises(
        ValueError, match=f"support distance={supported}.*got distance={type(distance).__name__}"
    ):
        _pair(name, distance=distance)
    ours, _ = _pair(name)
    ours.distance = distance  # changed after construction: refused at the call
    with pytest.raises(ValueError, match="got distance"):
        ours(*_batch())


# ------------------------------------------------------------------ keywords, config dicts, stats
def test_pml3_temperature_names_are_aliases():
    e, y = _batch()
    want = _run(pml.RankedListLoss(0.4, 10.0, Tp=2.0), e, y)
    got = _run(pml.RankedListLoss(0.4, neg_temperature=10.0, pos_temperature=2.0), e, y)
    for a, b in zip(got, want):
        assert_close_fp64(a, b, rtol=RTOL)
    with pytest.raises(TypeError, match="both Tn and neg_temperature"):
        pml.RankedListLoss(0.4, 10.0, neg_temperature=10.0)
    with pytest.raises(TypeError, match="both Tp and pos_temperature"):
        pml.RankedListLoss(0.4, 10.0, 0.5, None, 0.0, pos_temperature=1.0)
    with pytest.raises(TypeError, match="missing 1 required argument: 'Tn'"):
        pml.RankedListLoss(0.4)


def test_config_dicts_of_pml_keywords():
    configs = {
        "rll": dict(margin=0.0, Tn=5, imbalance=0.3, alpha=0.9, Tp=-1, reducer=reducers.AvgNonZeroReducer()),
        "st": dict(
            la=15, gamma=0.2, margin=0.05, weight_regularizer=regularizers.SparseCentersRegularizer(C, K)
        ),
    }
    for name, cfg in configs.items():
        _assert_same(*_pair(name, **cfg), *_batch(), what=f"config {name}")


def test_collect_stats():
    e, y = _batch()
    kw = dict(collect_stats=True, reducer=reducers.ThresholdReducer(low=0.3, collect_stats=True))
    kw["distance"] = distances.LpDistance(collect_stats=True)
    ours, theirs = _pair("rll", **kw)
    _assert_same(ours, theirs, e, y, what="collect_stats")
    assert ours.reducer.num_past_filter == theirs.reducer.num_past_filter > 0
    for stat in ("initial_avg_query_norm", "final_avg_ref_norm"):
        assert getattr(ours.distance, stat) == pytest.approx(getattr(theirs.distance, stat), rel=1e-12)
        assert getattr(ours.distance, stat) > 0
    ours, theirs = _pair("st", distance=distances.CosineSimilarity(collect_stats=True))
    _run(ours, e, y), _run(theirs, e, y)
    assert ours.distance.initial_avg_ref_norm == pytest.approx(
        theirs.distance.initial_avg_ref_norm, rel=1e-12
    )


def test_imbalance_outside_unit_interval_is_a_value_error():
    with pytest.raises(ValueError, match=r"imbalance must lie in \[0, 1\]"):
        pml.RankedListLoss(0.4, 10.0, imbalance=1.5)
    with pytest.raises(AssertionError):  # PML's own
        pml_losses.RankedListLoss(0.4, 10.0, imbalance=1.5)


def test_import_without_pml_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning", None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, "rll_kernels.pml")
    with pytest.raises(ImportError, match="pip install pytorch-metric-learning"):
        importlib.import_module("rll_kernels.pml")


def test_softtriple_miner_weights_state_dict_and_no_default_regulariser():
    e, y = _batch()
    miner = miners.MultiSimilarityMiner(epsilon=0.3)
    call = lambda f, a, b: f(a, b, miner(a, b))  # noqa: E731
    ours, theirs = _pair("st")
    assert not ours.weight_regularizer and ours.sub_loss_names() == ["loss"]
    _assert_same(ours, theirs, e, y, call, what="miner weights")
    fresh = pml.SoftTripleLoss(C, D, centers_per_class=K).double()
    fresh.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh.fc, theirs.fc)


def test_ref_emb_goes_beyond_pml():
    e, y = _batch()
    bank, bank_y = _batch(n=30)
    got = pml.RankedListLoss(0.4, 10.0)(e, y, ref_emb=bank, ref_labels=bank_y)
    want = rll_kernels.ranked_list_loss(e, y, semantics="pml", ref_emb=bank, ref_labels=bank_y)
    assert_close_fp64(got, want)
    with pytest.raises(ValueError, match="ref_emb is not supported"):
        pml_losses.RankedListLoss(0.4, 10.0)(e, y, ref_emb=bank, ref_labels=bank_y)


def test_native_classes_keep_the_paper_defaults_and_point_to_the_dropins():
    assert rll_kernels.RLLFused().semantics == "paper" and rll_kernels.SoftTripleFused(C, D).tau == 0.2
    with pytest.raises(TypeError, match="rll_kernels.pml.SoftTripleLoss is the exact PML drop-in"):
        rll_kernels.SoftTripleFused(C, D, weight_regularizer=regularizers.SparseCentersRegularizer(C, 10))
    with pytest.raises(TypeError, match="rll_kernels.pml.RankedListLoss is the exact PML drop-in"):
        rll_kernels.RLLFused(reducer=reducers.AvgNonZeroReducer())


# ------------------------------------------------------------------ PML's wrappers
def test_multiple_losses():
    e, y = _batch()
    (r1, r2), (s1, s2) = _pair("rll"), _pair("st")
    miner = miners.MultiSimilarityMiner(epsilon=0.3)
    ours = pml_losses.MultipleLosses([r1, s1], miners=[None, miner], weights=[1.0, 0.5])
    theirs = pml_losses.MultipleLosses([r2, s2], miners=[None, miner], weights=[1.0, 0.5])
    _assert_same(ours, theirs, e, y, what="MultipleLosses")


@pytest.mark.parametrize("name", ["rll", "st"])
def test_wrappers_that_refuse_pml_refuse_ours_alike(name):
    # SelfSupervisedLoss and PML's CrossBatchMemory keep a whitelist of loss names without these two
    ours, theirs = _pair(name)
    for wrap in (pml_losses.SelfSupervisedLoss, lambda f: pml_losses.CrossBatchMemory(f, D)):
        with pytest.raises(Exception, match="not supported for") as want:
            wrap(theirs)
        with pytest.raises(type(want.value), match=str(want.value)):
            wrap(ours)


def _wrapper_worker(rank, world, payload, out_dir):
    init_gloo(rank, world, out_dir)
    errs = {}
    g = torch.Generator().manual_seed(7 + rank)  # each rank its own batch
    for name, reducer in payload:
        torch.manual_seed(11)  # the same centers on every rank
        kw = {} if reducer is None else dict(reducer=REDUCERS[reducer]())
        ours, theirs = _pair(name, **kw)
        e = torch.randn(N, D, generator=g, dtype=torch.float64)  # even batches: PML's all_gather needs them
        y = torch.randint(0, C, (N,), generator=g)
        got, want = (_run(DistributedLossWrapper(f), e, y) for f in (ours, theirs))
        errs[f"{name} {reducer}"] = {
            q: (a - b).abs().max().item() / b.abs().max().item() for q, a, b in zip("vep", got, want)
        }
        # efficient=True passes pairs and ref_emb: PML's own classes refuse them with ValueError, ours alike
        errs[f"{name} efficient: no ValueError"] = {
            who: _no_value_error(DistributedLossWrapper(f, efficient=True), e, y)
            for who, f in (("ours", ours), ("PML", theirs))
        }
    save_and_exit(rank, out_dir, errs)


def _no_value_error(loss, e, y) -> float:
    """0.0 when ``loss(e, y)`` raises ValueError (on every rank alike, after the gather), else 1.0."""
    try:
        loss(e.clone().requires_grad_(), y)
    except ValueError:
        return 0.0
    return 1.0


def test_distributed_loss_wrapper_gloo():
    cases = [("rll", None), ("rll", "AvgNonZeroReducer"), ("st", None), ("st", "ThresholdReducer")]
    results = spawn(_wrapper_worker, 2, cases)
    assert_errors_below(results, RTOL)
    assert not dist.is_initialized()
