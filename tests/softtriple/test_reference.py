"""SoftTriple: the dense reference equals PML 2.9.0 SoftTripleLoss in value and both gradients
(float64), without the regulariser and with PML's (docs/semantics.md §3.6)."""

from __future__ import annotations

import pytest
import torch
from softtriple_cases import loss_and_grads, problem
from tolerance import assert_close_fp64

from rll_kernels.reference import soft_triple_loss as ref_loss
from rll_kernels.reference import soft_triple_regularizer

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_reg = pytest.importorskip("pytorch_metric_learning.regularizers")


# ---------------------------------------------------------------- reference vs PML 2.9.0
@pytest.mark.parametrize("n,c,k,d", [(16, 5, 10, 8), (33, 7, 3, 12), (9, 4, 1, 5)])
@pytest.mark.parametrize("la,gamma,margin", [(20.0, 0.1, 0.01), (7.0, 0.5, 0.3)])
def test_reference_equals_pml_tau0(n, c, k, d, la, gamma, margin):
    e, y, w = problem(n, c, k, d)
    pml = pml_losses.SoftTripleLoss(c, d, centers_per_class=k, la=la, gamma=gamma, margin=margin).double()
    with torch.no_grad():
        pml.fc.copy_(w)
    e1 = e.clone().requires_grad_(True)
    lp = pml(e1, y)
    lp.backward()
    lr, ge, gw = loss_and_grads(ref_loss, e, y, w, k, la, gamma, margin, 0.0)
    assert_close_fp64(lr, lp.detach(), "loss")
    assert_close_fp64(ge, e1.grad, "grad embeddings")
    assert_close_fp64(gw, pml.fc.grad, "grad centers")


@pytest.mark.parametrize("n,c,k,d", [(20, 6, 4, 10), (17, 3, 10, 7)])
def test_reference_equals_pml_with_regularizer(n, c, k, d):
    tau = 0.2
    e, y, w = problem(n, c, k, d)
    reg = pml_reg.SparseCentersRegularizer(c, k)
    pml = pml_losses.SoftTripleLoss(
        c, d, centers_per_class=k, weight_regularizer=reg, weight_reg_weight=tau
    ).double()
    with torch.no_grad():
        pml.fc.copy_(w)
    e1 = e.clone().requires_grad_(True)
    lp = pml(e1, y)
    lp.backward()
    # PML smooths the sqrt with finfo.tiny instead of the official 1e-5: pass its epsilon to compare exactly
    tiny = torch.finfo(torch.float64).tiny
    lr, ge, gw = loss_and_grads(ref_loss, e, y, w, k, 20.0, 0.1, 0.01, tau, reg_eps=tiny)
    assert_close_fp64(lr, lp.detach(), "loss")
    assert_close_fp64(ge, e1.grad, "grad embeddings")
    assert_close_fp64(gw, pml.fc.grad, "grad centers")
    # with the official 1e-5 the regulariser moves by at most tau * 1e-5 / (2 sqrt(min gap)) per term
    r_off = soft_triple_regularizer(w, k)
    r_pml = soft_triple_regularizer(w, k, reg_eps=tiny)
    assert 0 < (r_off - r_pml).item() < 1e-5 / (2 * torch.sqrt(r_pml.new_tensor(1e-3)).item())
