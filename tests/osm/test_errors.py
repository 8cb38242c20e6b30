"""OSM errors (docs/semantics.md §4.5, §6): attention of the wrong shape or dtype on every backend;
attention outside (0, 1] and non-finite embeddings raised by the C++ op in eager and compiled code
alike (the reference raises too), a NaN loss and gradient on the Triton backend and a ValueError
there with RLL_STRICT_FINITE=1; hyper-parameters outside their domain."""

from __future__ import annotations

import pytest
import torch

import rll_kernels
from rll_kernels import reference


def _attention(bad, n):
    a = torch.full((n,), 0.5)
    return {
        "long": torch.full((n + 1,), 0.5),
        "short": torch.full((n - 1,), 0.5),
        "2d": a.view(n, 1),
        "zero": a.clone().index_fill_(0, torch.tensor([2]), 0.0),
        "negative": a.clone().index_fill_(0, torch.tensor([0]), -0.1),
        "above_one": a.clone().index_fill_(0, torch.tensor([5]), 1.0001),
        "nan": a.clone().index_fill_(0, torch.tensor([1]), float("nan")),
        "int": torch.ones(n, dtype=torch.int64),
    }[bad]


SHAPE_AND_TYPE = ["long", "short", "2d", "int"]
VALUES = ["zero", "negative", "above_one", "nan"]


@pytest.mark.backends("reference", "cpp", "triton")
@pytest.mark.parametrize("bad", SHAPE_AND_TYPE + VALUES)
def test_bad_attention_raises(backend, device, bad):
    # values: checked by the C++ op and the reference; the Triton op gives NaN (below)
    if backend == "triton" and bad in VALUES:
        pytest.skip("the Triton op gives a NaN loss for a bad attention value: test_bad_values_give_nan")
    n = 6
    x = torch.randn(n, 3, device=device)
    y = torch.randint(0, 2, (n,), device=device)
    att = _attention(bad, n).to(device)
    with pytest.raises(ValueError, match="attention"):
        rll_kernels.weighted_contrastive_loss(x, y, att, backend=backend)
    if backend == "reference":
        with pytest.raises(ValueError, match="attention"):
            reference.weighted_contrastive_loss(x, y, att)


def _bad_inputs(case, device):
    n = 7
    x = torch.randn(n, 3)
    att = torch.full((n,), 0.5)
    if case in VALUES:
        att = _attention(case, n)
        message = r"attention values must lie in \(0, 1\]"
    else:
        x[4, 2] = {"nan_embedding": float("nan"), "inf_embedding": float("inf")}[case]
        message = "embeddings contains NaN or Inf"
    return x.to(device), torch.randint(0, 2, (n,), device=device), att.to(device), message


@pytest.mark.backends("cpp")
@pytest.mark.parametrize("case", ["nan_embedding", "inf_embedding", "zero", "nan"])
@pytest.mark.parametrize("normalize", [True, False])
def test_bad_values_raise_in_eager_and_compiled_code(backend, case, normalize):
    x, y, att, message = _bad_inputs(case, "cpu")
    with pytest.raises(ValueError, match=message):
        rll_kernels.weighted_contrastive_loss(x, y, att, normalize=normalize, backend=backend)
    fn = torch.compile(
        lambda a, b, c: rll_kernels.weighted_contrastive_loss(a, b, c, normalize=normalize, backend=backend),
        fullgraph=True,
        backend="aot_eager",
    )
    fn(*_bad_inputs("zero", "cpu")[:2], None)  # compiled on good values first
    with pytest.raises(ValueError, match=message):
        fn(x, y, att)


@pytest.mark.backends("triton")
@pytest.mark.parametrize("case", ["nan_embedding", "inf_embedding"] + VALUES)
def test_bad_values_give_nan_without_sync_or_raise_when_strict(backend, device, case, monkeypatch):
    x, y, att, message = _bad_inputs(case, device)
    x = x.requires_grad_(True)
    loss = rll_kernels.weighted_contrastive_loss(x, y, att, backend=backend)
    (g,) = torch.autograd.grad(loss, x)
    assert loss.isnan() and g.isnan().all()  # never a finite wrong value
    monkeypatch.setenv("RLL_STRICT_FINITE", "1")
    with pytest.raises(ValueError, match=message):
        rll_kernels.weighted_contrastive_loss(x, y, att, backend=backend)


@pytest.mark.parametrize(
    "kw",
    [
        dict(sigma=0.0),
        dict(sigma=-1.0),
        dict(alpha=0.0),
        dict(imbalance=1.5),
        dict(alpha=float("nan")),
        dict(backend="cuda"),
    ],
)
def test_bad_parameters_raise(kw):
    with pytest.raises(ValueError):
        rll_kernels.WeightedContrastiveFused(**kw)
