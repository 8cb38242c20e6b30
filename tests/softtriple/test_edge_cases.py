"""SoftTriple edge cases (docs/semantics.md §3.5) on every fused backend: zero and tiny center
columns (the normalisation's clamp at 1e-12); K = 1, one row and many classes are in
test_parity.py's shapes."""

from __future__ import annotations

from softtriple_cases import loss_and_grads, problem
from tolerance import assert_close_fp64

from rll_kernels import soft_triple_loss
from rll_kernels.reference import soft_triple_loss as ref_loss


def test_zero_and_tiny_centers(backend, device):
    # F.normalize clamps the norm at 1e-12: a zero center has s = 0 and gradient g / 1e-12
    e, y, w = problem(11, 4, 3, 6, all_classes=True, device=device)
    w[:, 2] = 0.0
    w[:, 7] *= 1e-6
    lr, ger, gwr = loss_and_grads(ref_loss, e, y, w, 3)
    lf, gef, gwf = loss_and_grads(soft_triple_loss, e, y, w, 3, backend=backend)
    assert_close_fp64(lf, lr, "loss")
    assert_close_fp64(gef, ger, "grad embeddings")
    assert_close_fp64(gwf, gwr, "grad centers")
    assert gwf[:, 2].abs().max() > 1e6  # the clamped column really is in the 1/eps regime
