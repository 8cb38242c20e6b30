"""OSM errors (docs/semantics.md §4.5, §6): attention outside (0, 1], of the wrong shape or dtype, on
every backend and in the reference; hyper-parameters outside their domain."""

from __future__ import annotations

import pytest
import torch

import rll_kernels
from rll_kernels import reference


@pytest.mark.backends("reference", "cpp", "triton")
@pytest.mark.parametrize("bad", ["long", "short", "2d", "zero", "negative", "above_one", "nan", "int"])
def test_bad_attention_raises(backend, bad):
    n = 6
    x = torch.randn(n, 3)
    y = torch.randint(0, 2, (n,))
    a = torch.full((n,), 0.5)
    att = {
        "long": torch.full((n + 1,), 0.5),
        "short": torch.full((n - 1,), 0.5),
        "2d": a.view(n, 1),
        "zero": a.clone().index_fill_(0, torch.tensor([2]), 0.0),
        "negative": a.clone().index_fill_(0, torch.tensor([0]), -0.1),
        "above_one": a.clone().index_fill_(0, torch.tensor([5]), 1.0001),
        "nan": a.clone().index_fill_(0, torch.tensor([1]), float("nan")),
        "int": torch.ones(n, dtype=torch.int64),
    }[bad]
    with pytest.raises(ValueError, match="attention"):
        rll_kernels.weighted_contrastive_loss(x, y, att, backend=backend)
    if backend == "reference":
        with pytest.raises(ValueError, match="attention"):
            reference.weighted_contrastive_loss(x, y, att)


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
