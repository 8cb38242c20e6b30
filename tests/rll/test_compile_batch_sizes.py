"""torch.compile(fullgraph=True) of the fused RLL over many batch sizes (docs/semantics.md §6 "Under
torch.compile"): with ``dynamic=True`` and with the default, both semantics, in-batch and against a
gallery, no error and no recompile after the second size. Graphs are counted by a compile backend
that counts its calls (one per compiled graph), so a recompile cannot go unseen."""

import pytest
import torch
from tolerance import assert_close_fp64
from torch._dynamo.testing import CompileCounterWithBackend

import rll_kernels
from rll_kernels import reference

SIZES = list(range(8, 28, 2))  # 10 distinct batch sizes


def _batch(n, d, device, gallery):
    g = torch.Generator().manual_seed(n)
    e = torch.randn(n, d, dtype=torch.float64, generator=g).to(device)
    y = (torch.arange(n) // 2).to(device)
    if not gallery:
        return e, y, {}
    m = n + 5  # the gallery's size varies with the batch too (as a memory bank fills)
    r = torch.randn(m, d, dtype=torch.float64, generator=g).to(device)
    return e, y, {"ref_emb": r, "ref_labels": (torch.arange(m) // 2).to(device)}


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
@pytest.mark.parametrize("sem", ["paper", "pml"])
@pytest.mark.parametrize("gallery", [False, True], ids=["in_batch", "ref_emb"])
def test_no_recompile_over_ten_batch_sizes(backend, device, dynamic, sem, gallery):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    mod = rll_kernels.RLLFused(semantics=sem, backend=backend)
    compiled = torch.compile(mod, fullgraph=True, dynamic=dynamic, backend=counter)
    graphs = []
    for i, n in enumerate(SIZES):
        e, y, kw = _batch(n, 5, device, gallery)  # D = 5, no batch size: no duck-sized N == D guard
        x = e.clone().requires_grad_()
        loss = compiled(x, y, **kw)
        (g,) = torch.autograd.grad(loss, x)
        graphs.append(counter.frame_count)
        if i in (0, len(SIZES) - 1):  # the compiled loss is the loss
            xr = e.clone().requires_grad_()
            want = reference.ranked_list_loss(xr, y, semantics=sem, **kw)
            (gr,) = torch.autograd.grad(want, xr)
            assert_close_fp64(loss.detach(), want.detach(), "loss")
            assert_close_fp64(g, gr, "grad")
    # default: the static graphs, recompiled once (dynamic) at the second size; dynamic=True: none
    assert graphs[-1] == graphs[1] and graphs[1] - graphs[0] <= (0 if dynamic else 1), graphs


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
def test_functional_api_compiles_with_python_float_hyper_parameters(backend, device, dynamic):
    # the functional API checks its hyper-parameters while traced (no math.isfinite on symbolic floats)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(x, y, margin, tn):
        return rll_kernels.ranked_list_loss(x, y, margin=margin, Tn=tn, semantics="pml", backend=backend)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend=counter)
    graphs = []
    for n in SIZES[:4]:
        e, y, _ = _batch(n, 5, device, False)
        got = compiled(e, y, 0.4, 10.0)
        want = reference.ranked_list_loss(e, y, margin=0.4, Tn=10.0, semantics="pml")
        assert_close_fp64(got, want, "loss")
        graphs.append(counter.frame_count)
    assert graphs[-1] == graphs[1] and graphs[1] - graphs[0] <= (0 if dynamic else 1), graphs
    with pytest.raises(Exception, match="margin must be a finite number"):
        compiled(e, y, float("inf"), 10.0)
