"""SoftTriple errors (docs/semantics.md §6): labels outside [0, C) and non-finite embeddings or
centers (raised by the C++ op, in eager and compiled code alike; a NaN loss and gradient on the
Triton backend, a ValueError there with RLL_STRICT_FINITE=1), center shapes, hyper-parameters,
backends the loss does not have, PML's ref_emb message."""

from __future__ import annotations

import pytest
import torch
from softtriple_cases import problem

from rll_kernels import SoftTripleFused, soft_triple_loss

BAD_VALUES = {
    "label_below": ("labels", -1, r"labels must lie in \[0, num_classes=5\)"),
    "label_above": ("labels", 5, r"labels must lie in \[0, num_classes=5\)"),
    "nan_embedding": ("embeddings", float("nan"), "embeddings contains NaN or Inf"),
    "inf_embedding": ("embeddings", float("inf"), "embeddings contains NaN or Inf"),
    "nan_center": ("centers", float("nan"), "centers contains NaN or Inf"),
    "inf_center": ("centers", float("-inf"), "centers contains NaN or Inf"),
}


def _bad_problem(case, device):
    e, y, w = problem(6, 5, 2, 4, device=device)
    where, value, message = BAD_VALUES[case]
    if where == "labels":
        y[3] = value
    elif where == "embeddings":
        e[2, 1] = value
    else:
        w[3, 7] = value
    return e, y, w, message


@pytest.mark.backends("cpp", "reference")
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_raise(backend, case):
    e, y, w, message = _bad_problem(case, "cpu")
    if backend == "reference" and case.endswith("center"):
        pytest.skip("the dense reference does not check the centers' values")
    with pytest.raises(ValueError, match=message):
        soft_triple_loss(e, y, w, 2, backend=backend)
    if case.startswith("label"):
        with pytest.raises(ValueError, match=message):
            SoftTripleFused(5, 4, 2, backend=backend)(e.float(), y)


@pytest.mark.backends("cpp")
@pytest.mark.parametrize("case", ["label_above", "nan_embedding", "inf_center"])
def test_bad_values_raise_in_compiled_code(backend, case):
    e, y, w, message = _bad_problem(case, "cpu")
    fn = torch.compile(
        lambda a, b, c: soft_triple_loss(a, b, c, 2, backend=backend), fullgraph=True, backend="aot_eager"
    )
    fn(*problem(6, 5, 2, 4)[:3])  # compiled on good values first: the check is in the graph, not in tracing
    with pytest.raises(ValueError, match=message):
        fn(e, y, w)


@pytest.mark.backends("triton")
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_give_nan_without_sync_or_raise_when_strict(backend, device, case, monkeypatch):
    e, y, w, message = _bad_problem(case, device)
    e, w = e.requires_grad_(True), w.requires_grad_(True)
    rows = soft_triple_loss(e, y, w, 2, tau=0.0, backend=backend, reduction="none")
    ge, gw = torch.autograd.grad(rows.sum(), (e, w))
    assert rows.isnan().any() and ge.isnan().any() and gw.isnan().any()  # never a finite wrong value
    monkeypatch.setenv("RLL_STRICT_FINITE", "1")
    with pytest.raises(ValueError, match=message):
        soft_triple_loss(e, y, w, 2, backend=backend)


def test_bad_arguments():
    e, y, w = problem(6, 5, 2, 4)
    with pytest.raises(
        ValueError, match="centers has 10 columns, expected a positive multiple of centers_per_class=3"
    ):
        soft_triple_loss(e, y, w, 3)
    with pytest.raises(ValueError, match=r"centers must be \(embedding_size=4"):
        soft_triple_loss(e, y, w.t(), 2)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        soft_triple_loss(e, y, w, 2, gamma=0.0)
    with pytest.raises(ValueError, match="la must be a finite number"):
        soft_triple_loss(e, y, w, 2, la=float("inf"))
    with pytest.raises(ValueError, match="backend must be one of"):
        soft_triple_loss(e, y, w, 2, backend="cuda")
    with pytest.raises(ValueError, match="ref_emb is not supported"):
        SoftTripleFused(5, 4, 2)(e.float(), y, ref_emb=e.float())
