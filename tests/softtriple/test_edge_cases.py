"""SoftTriple edge cases (docs/semantics.md §3.5) on every fused backend: zero and tiny center
columns (a zero column stays 0 with a zero gradient, a tiny one is a unit column; the scale-safe
norms of docs/semantics.md §1.4); K = 1, one row and many classes are in test_parity.py's shapes."""

from __future__ import annotations

import pytest
import torch
from softtriple_cases import loss_and_grads, problem
from tolerance import assert_close_fp64

from rll_kernels import soft_triple_loss
from rll_kernels.reference import soft_triple_loss as ref_loss


@pytest.mark.parametrize("tau", [0.0, 0.2])
def test_zero_and_tiny_centers(backend, device, tau):
    # the zero column: s = 0 (and, in the regulariser, cosines 0) as in the reference, but no
    # gradient (F.normalize's is g / 1e-12); the column of norm ~1e-20 is a unit column (F.normalize
    # would divide it by 1e-12 only)
    e, y, w = problem(11, 4, 3, 6, all_classes=True, device=device)
    w[:, 2] = 0.0
    w[:, 7] *= 1e-20
    unit = w.clone()
    unit[:, 7] = w[:, 7] / w[:, 7].norm()  # (F.normalize would clamp this norm at 1e-12)
    lr, ger, gwr = loss_and_grads(ref_loss, e, y, unit, 3, tau=tau)
    lf, gef, gwf = loss_and_grads(soft_triple_loss, e, y, w, 3, tau=tau, backend=backend)
    assert_close_fp64(lf, lr, "loss")
    assert_close_fp64(gef, ger, "grad embeddings")
    assert (gwf[:, 2] == 0).all()
    gwf[:, 7] *= w[:, 7].norm()  # the unit column's gradient divided by its norm
    keep = torch.arange(12, device=device) != 2
    assert_close_fp64(gwf[:, keep], gwr[:, keep], "grad centers")
