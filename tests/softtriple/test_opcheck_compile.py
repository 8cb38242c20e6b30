"""SoftTriple ops: torch.library conformance (opcheck) on every fused backend, with normalised and
with raw centers (the kernels scale each center column, docs/semantics.md §3.4), and
torch.compile(fullgraph=True) through the ops and the regulariser."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from softtriple_cases import loss_and_grads, problem
from tolerance import assert_close_fp64

from rll_kernels import soft_triple_loss
from rll_kernels._backends import fused_op
from rll_kernels.reference import soft_triple_loss as ref_loss


@pytest.mark.parametrize("centers", ["normalised", "raw"])
def test_opcheck_ops(backend, device, centers):
    e, y, w = problem(9, 5, 3, 6, device=device)
    x = F.normalize(e, dim=1).requires_grad_(True)
    wc = (F.normalize(w, dim=0) if centers == "normalised" else w).requires_grad_(True)
    fwd, bwd = fused_op("softtriple", backend), fused_op("softtriple", backend, "bwd")
    torch.library.opcheck(fwd.default, (x, y, wc, 3, 20.0, 0.1, 0.01))
    rows, lse = fwd(x.detach(), y, wc.detach(), 3, 20.0, 0.1, 0.01)
    torch.library.opcheck(
        bwd.default,
        (torch.rand_like(rows), x.detach(), y, wc.detach(), lse, 3, 20.0, 0.1, 0.01, True, True),
    )


@pytest.mark.slow
def test_torch_compile_fullgraph(backend, device):
    # the C++ ops (fake kernels + registered autograd) and the regulariser trace without graph breaks
    e, y, w = problem(13, 5, 3, 8, device=device)
    fn = torch.compile(lambda a, b: soft_triple_loss(a, y, b, 3, backend=backend), fullgraph=True)
    lc, gec, gwc = loss_and_grads(lambda a, _y, b: fn(a, b), e, y, w)
    lr, ger, gwr = loss_and_grads(ref_loss, e, y, w, 3)
    assert_close_fp64(lc, lr, "loss")
    assert_close_fp64(gec, ger, "grad embeddings")
    assert_close_fp64(gwc, gwr, "grad centers")
