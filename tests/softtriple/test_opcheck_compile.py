"""SoftTriple ops: torch.library conformance (opcheck) on every fused backend, with raw and unit
embeddings and with normalised and raw centers (the kernels normalise both, docs/semantics.md §1.4,
§3.4); torch.compile(fullgraph=True) through the ops and the regulariser, and no recompile over
12 batch sizes (dynamic=True and the default)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from compile_counts import assert_no_recompile
from host_reads import host_reads
from softtriple_cases import loss_and_grads, problem
from tolerance import assert_close_fp64

from rll_kernels import SoftTripleFused, soft_triple_loss
from rll_kernels._backends import fused_op
from rll_kernels.reference import soft_triple_loss as ref_loss


@pytest.mark.parametrize("centers", ["normalised", "raw"])
@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck_ops(backend, device, centers, normalize):
    e, y, w = problem(9, 5, 3, 6, device=device)
    x = (e if normalize else F.normalize(e, dim=1)).requires_grad_(True)
    wc = (F.normalize(w, dim=0) if centers == "normalised" else w).requires_grad_(True)
    fwd, bwd = fused_op("softtriple", backend), fused_op("softtriple", backend, "bwd")
    hp = (3, 20.0, 0.1, 0.01, normalize)
    torch.library.opcheck(fwd.default, (x, y, wc) + hp)
    rows, lse, z, norms = fwd(x.detach(), y, wc.detach(), *hp)
    args = (torch.rand_like(rows), x.detach(), y, wc.detach(), lse, z, norms) + hp + (True, True)
    torch.library.opcheck(bwd.default, args)


@pytest.mark.slow
def test_torch_compile_fullgraph(backend, device):
    # the ops (fake kernels + registered autograd) and the regulariser trace without graph breaks
    e, y, w = problem(13, 5, 3, 8, device=device)
    fn = torch.compile(lambda a, b: soft_triple_loss(a, y, b, 3, backend=backend), fullgraph=True)
    lc, gec, gwc = loss_and_grads(lambda a, _y, b: fn(a, b), e, y, w)
    lr, ger, gwr = loss_and_grads(ref_loss, e, y, w, 3)
    assert_close_fp64(lc, lr, "loss")
    assert_close_fp64(gec, ger, "grad embeddings")
    assert_close_fp64(gwc, gwr, "grad centers")


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "default"])
@pytest.mark.parametrize("api", ["functional", "module"])
def test_compile_no_recompile_over_batch_sizes(backend, device, api, dynamic):
    c, k, d = 5, 3, 8
    module = SoftTripleFused(c, d, k, backend=backend).to(device)
    centers = torch.randn(d, c * k, device=device, requires_grad=True)

    def fn(e, y):
        if api == "module":
            return module(e, y)
        return soft_triple_loss(e, y, centers, k, la=15.0, tau=0.1, backend=backend)

    def make_args(n):
        return torch.randn(n, d, device=device, requires_grad=True), torch.randint(0, c, (n,), device=device)

    assert_no_recompile(fn, make_args, dynamic)


def test_no_host_read_on_the_python_path(backend, device):
    # the label range and finite values are checked inside the op: nothing in Python reads a tensor
    # value, so a CUDA step never synchronises (docs/semantics.md §6)
    module = SoftTripleFused(5, 8, 3, backend=backend).to(device)
    e, y = torch.randn(20, 8, device=device), torch.randint(0, 5, (20,), device=device)
    centers = torch.randn(8, 15, device=device, requires_grad=True)

    def step():
        x = e.clone().requires_grad_(True)
        (soft_triple_loss(x, y, centers, 3, backend=backend) + module(x, y)).backward()

    assert host_reads(step) == []
