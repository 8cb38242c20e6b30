"""OSM edge cases (docs/semantics.md §4.5) on every fused backend: no positive pair, no negative
inside the margin, one sample, empty sets, duplicates (same and other labels, a batch of one point)."""

from __future__ import annotations

import pytest
import torch
from osm_cases import check_fp64, rand_att, run


# ------------------------------------------------------------------ edge cases
def test_no_positive_pair(backend):
    n = 24
    x = torch.randn(n, 5, dtype=torch.float64)
    y = torch.randperm(n)  # every label distinct: L_P = 0
    l_f, g_f = check_fp64(backend, x, y, rand_att(n, torch.float64), alpha=1.5, imbalance=0.3)
    l_n = run("reference", x, y, None, alpha=1.5, imbalance=1.0)[0]  # = L_N with unit attention
    assert l_f.item() > 0 and l_n.item() > 0
    # loss = lam L_N exactly: compare with imbalance = 1 on the same attention
    l_1 = run(backend, x, y, None, alpha=1.5, imbalance=1.0)[0]
    l_3 = run(backend, x, y, None, alpha=1.5, imbalance=0.3)[0]
    assert l_3.item() == pytest.approx(0.3 * l_1.item(), rel=1e-12)


def test_no_negative_inside_the_margin(backend):
    n = 20
    x = torch.randn(n, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    l_1, g_1 = check_fp64(backend, x, y, None, alpha=1e-3, imbalance=0.4)  # every negative has d > alpha
    l_0, _ = run(backend, x, y, None, alpha=1e-3, imbalance=0.0)
    assert l_1.item() == pytest.approx(0.6 * l_0.item(), rel=1e-12) and l_0.item() > 0
    # one class only: no negative pair at all
    check_fp64(backend, x, torch.zeros(n, dtype=torch.int64), None)


def test_single_sample_and_empty_sets_give_zero(backend):
    l, g = run(backend, torch.randn(1, 4, dtype=torch.float64), torch.tensor([3]))
    assert l.item() == 0.0 and (g == 0).all()
    # two samples of different classes far apart: both sets empty
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    l, g = run(backend, x, torch.tensor([0, 1]), alpha=1.0)
    assert l.item() == 0.0 and (g == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_duplicates_give_finite_values(backend, dtype):
    base = torch.randn(6, 8, dtype=torch.float64)
    x = base[torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 5])].to(dtype)  # exact duplicates
    y = torch.tensor([0, 0, 1, 2, 3, 3, 4, 4, 5, 5, 6])  # duplicate pairs with same and different labels
    l_f, g_f = run(backend, x, y)
    assert torch.isfinite(l_f) and torch.isfinite(g_f).all()
    if dtype == torch.float64:
        check_fp64(backend, x, y, rand_att(11, dtype))
    # a whole batch of one point: every pair is a duplicate
    same = base[:1].expand(7, 8).contiguous().to(dtype)
    for labels in (torch.zeros(7, dtype=torch.int64), torch.arange(7)):
        l, g = run(backend, same, labels)
        assert torch.isfinite(l) and torch.isfinite(g).all() and (g == 0).all()
    # different labels at d = 0: L_N = alpha^2 / 2, with no gradient direction
    l, _ = run(backend, same, torch.arange(7), imbalance=1.0)
    assert l.item() == pytest.approx(0.5 * 1.2**2, rel=1e-6)
