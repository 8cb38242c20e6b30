"""SoftTriple's normalisation inside the ops (docs/semantics.md §1.4, §3.4) on every fused backend:
rows and center columns of norm 1e30 and 1e-30 give the loss and gradient of the unit rows and
columns (fp32 and fp64), with and without the regulariser (§3.5); strided embeddings and centers
give the contiguous result; a zero row stays 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from softtriple_cases import loss_and_grads, problem
from tolerance import assert_close_derived, assert_close_fp64

from rll_kernels import soft_triple_loss
from rll_kernels.reference import soft_triple_loss as ref_loss

SCALES = (1e30, 1e-30)


def _scaled_problem(device, scale):
    """Unit rows and columns (fp64), and the per-row and per-column scales: alternately ``scale``
    and 1 (so a tile holds both)."""
    e, y, w = problem(21, 6, 3, 16, all_classes=True, device=device)
    u, wu = F.normalize(e, dim=1), F.normalize(w, dim=0)
    s_rows = torch.where(torch.arange(21, device=device) % 2 == 0, scale, 1.0).double()
    s_cols = torch.where(torch.arange(18, device=device) % 2 == 1, scale, 1.0).double()
    return u, y, wu, s_rows, s_cols


@pytest.mark.parametrize("tau", [0.0, 0.2])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_norms_give_the_unit_rows_result(backend, device, scale, dtype, tau):
    u, y, wu, s_rows, s_cols = _scaled_problem(device, scale)
    # tau = 0.2: the regulariser's cosines from scale-safe norms too (in float32, F.normalize's gave
    # NaN at 1e30 and treated 1e-30 columns as 1e-12 ones)
    kw = dict(tau=tau, backend=backend)
    e, w = (u * s_rows[:, None]).to(dtype), (wu * s_cols[None, :]).to(dtype)
    lf, gef, gwf = loss_and_grads(soft_triple_loss, e, y, w, 3, **kw)
    # d/de at e = s u is the unit rows' gradient divided by s (the Jacobian (I - z z^T)/|e|)
    gef, gwf = gef.double() * s_rows[:, None], gwf.double() * s_cols[None, :]
    lr, ger, gwr = loss_and_grads(ref_loss, u, y, wu, 3, tau=tau)
    if dtype == torch.float64:
        assert_close_fp64(lf, lr, "loss")
        assert_close_fp64(gef, ger, "grad embeddings")
        assert_close_fp64(gwf, gwr, "grad centers")
        return
    l32, ge32, gw32 = loss_and_grads(ref_loss, u.float(), y, wu.float(), 3, tau=tau)
    assert_close_derived(lf, l32, lr, "loss")
    assert_close_derived(gef, ge32, ger, "grad embeddings")
    assert_close_derived(gwf, gw32, gwr, "grad centers")


@pytest.mark.parametrize("layout", ["column_major", "every_other_column", "every_other_row"])
def test_strided_inputs_give_the_contiguous_result(backend, device, layout):
    e, y, w = problem(17, 5, 2, 12, device=device)
    strided = {
        "column_major": lambda t: t.t().contiguous().t(),
        "every_other_column": lambda t: torch.stack([t, torch.zeros_like(t)], 2).flatten(1)[:, ::2],
        "every_other_row": lambda t: torch.stack([t, torch.zeros_like(t)], 1).flatten(0, 1)[::2],
    }[layout]
    es, ws = strided(e), strided(w)
    assert not es.is_contiguous() and not ws.is_contiguous() and torch.equal(es, e)
    lc, gec, gwc = loss_and_grads(soft_triple_loss, e, y, w, 2, backend=backend)
    es, ws = es.detach().requires_grad_(True), ws.detach().requires_grad_(True)
    ls = soft_triple_loss(es, y, ws, 2, backend=backend)
    ges, gws = torch.autograd.grad(ls, (es, ws))
    assert_close_fp64(ls, lc, "loss")
    assert_close_fp64(ges, gec, "grad embeddings")
    assert_close_fp64(gws, gwc, "grad centers")


def test_zero_row_stays_zero(backend, device):
    # a zero row has z = 0 (logit 0 for every class) and a zero gradient, where F.normalize's
    # is g / 1e-12 (docs/semantics.md §1.4); every other row as the reference
    e, y, w = problem(9, 4, 2, 6, device=device)
    e[3] = 0.0
    lf, gef, gwf = loss_and_grads(soft_triple_loss, e, y, w, 2, tau=0.0, backend=backend)
    lr, ger, gwr = loss_and_grads(ref_loss, e, y, w, 2, tau=0.0)
    assert_close_fp64(lf, lr, "loss")
    assert (gef[3] == 0).all()
    keep = torch.arange(9, device=device) != 3
    assert_close_fp64(gef[keep], ger[keep], "grad embeddings")
    assert_close_fp64(gwf, gwr, "grad centers")
