"""OSM op: torch.library conformance (opcheck) on every fused backend, with the op's normalisation on
and off (docs/semantics.md §1.4, §4.4); torch.compile(fullgraph=True) through it, and no recompile
over 12 batch sizes (dynamic=True and the default), with the class-aware attention inside the graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from compile_counts import assert_no_recompile
from host_reads import host_reads
from osm_cases import rand_att, run
from tolerance import assert_close_derived

import rll_kernels
from rll_kernels._backends import fused_op


@pytest.mark.parametrize("n, att, need_grad", [(19, True, True), (19, False, False), (18, True, True)])
@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck_op(backend, device, n, att, need_grad, normalize):
    x = torch.randn(n, 5, dtype=torch.float64)
    x = (x if normalize else F.normalize(x, dim=1)).to(device).requires_grad_(need_grad)
    y = torch.randint(0, 3, (n,), device=device)
    a = rand_att(n, torch.float64, device=device) if att else None
    torch.library.opcheck(fused_op("osm", backend), (x, y, a, 1.2, 0.8, 0.5, normalize, need_grad))


@pytest.mark.slow
def test_torch_compile_fullgraph(backend, device):
    x = torch.randn(40, 9, device=device, requires_grad=True)
    y = torch.randint(0, 4, (40,), device=device)
    a = rand_att(40, torch.float32, device=device)
    f = torch.compile(
        lambda x, y, a: rll_kernels.weighted_contrastive_loss(x, y, a, backend=backend), fullgraph=True
    )
    (g_c,) = torch.autograd.grad(f(x, y, a), x)
    l_e, g_e = run(backend, x, y, a)
    l_64, g_64 = run("reference", x.double(), y, a.double())
    assert_close_derived(f(x, y, a).detach(), l_e, l_64, "loss")
    assert_close_derived(g_c, g_e, g_64, "grad")


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "default"])
@pytest.mark.parametrize("api", ["functional", "module"])
def test_compile_no_recompile_over_batch_sizes(backend, device, api, dynamic):
    module = rll_kernels.WeightedContrastiveFused(alpha=1.1, sigma=0.7, backend=backend)

    def fn(e, y, logits):
        att = rll_kernels.class_aware_attention(logits, y)
        if api == "module":
            return module(e, y, att)
        return rll_kernels.weighted_contrastive_loss(e, y, att, imbalance=0.4, backend=backend)

    def make_args(n):
        e = torch.randn(n, 8, device=device, requires_grad=True)
        return e, torch.randint(0, 3, (n,), device=device), torch.randn(n, 3, device=device)

    assert_no_recompile(fn, make_args, dynamic)


def test_no_host_read_on_the_python_path(backend, device):
    # finite values and the attention range are checked inside the op: nothing in Python reads a
    # tensor value, so a CUDA step never synchronises (docs/semantics.md §6)
    module = rll_kernels.WeightedContrastiveFused(backend=backend)
    e, y = torch.randn(20, 8, device=device), torch.randint(0, 3, (20,), device=device)
    att = rand_att(20, torch.float32, device=device)

    def step():
        x = e.clone().requires_grad_(True)
        (rll_kernels.weighted_contrastive_loss(x, y, att, backend=backend) + module(x, y, att)).backward()

    assert host_reads(step) == []
