"""SoftTriple errors (docs/semantics.md §6): labels outside [0, C), center shapes, hyper-parameters,
backends the loss does not have, PML's ref_emb message."""

from __future__ import annotations

import pytest
from softtriple_cases import problem

from rll_kernels import SoftTripleFused, soft_triple_loss


# ---------------------------------------------------------------- errors and dispatch
@pytest.mark.parametrize("bad", [-1, 5])
def test_labels_out_of_range(bad):
    e, y, w = problem(6, 5, 2, 4)
    y[3] = bad
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=5\), got " + str(bad)):
        soft_triple_loss(e, y, w, 2)
    with pytest.raises(ValueError, match="labels must lie"):
        SoftTripleFused(5, 4, 2)(e.float(), y)


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
    with pytest.raises(ValueError, match="backend must be one of"):
        soft_triple_loss(e, y, w, 2, backend="cuda")
    with pytest.raises(ValueError, match="ref_emb is not supported"):
        SoftTripleFused(5, 4, 2)(e.float(), y, ref_emb=e.float())
