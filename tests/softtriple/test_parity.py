"""SoftTriple: every fused backend against the dense reference (docs/semantics.md §3), backend x
dtype x shape: float64 to 1e-10, float32 within the derived tolerance, fp16/bf16 embeddings
(computed in float32, §1.2); odd sizes, K = 1, many class tiles, reductions with an upstream
gradient. The backends come from the registry (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch
from softtriple_cases import loss_and_grads, problem
from tolerance import assert_close_derived, assert_close_fp64

from rll_kernels import soft_triple_loss
from rll_kernels.reference import soft_triple_loss as ref_loss

SHAPES = [  # (n, c, k, d): odd sizes, K = 1, more classes than one tile, one row
    (1, 3, 2, 4),
    (13, 5, 1, 9),
    (37, 7, 3, 24),
    (20, 70, 10, 16),
]


@pytest.mark.parametrize("n,c,k,d", SHAPES)
@pytest.mark.parametrize("tau", [0.0, 0.2])
def test_fused_fp64_equals_reference(backend, device, n, c, k, d, tau):
    e, y, w = problem(n, c, k, d, all_classes=True, device=device)
    lr, ger, gwr = loss_and_grads(ref_loss, e, y, w, k, 20.0, 0.1, 0.01, tau)
    lf, gef, gwf = loss_and_grads(soft_triple_loss, e, y, w, k, 20.0, 0.1, 0.01, tau, backend=backend)
    assert lf.dtype == torch.float64
    assert_close_fp64(lf, lr, "loss")
    assert_close_fp64(gef, ger, "grad embeddings")
    assert_close_fp64(gwf, gwr, "grad centers")


@pytest.fixture
def gpu_float_arguments(monkeypatch):
    """Python floats reach a compiled Triton kernel as fp32, but the interpreter keeps them doubles:
    give interpreted kernels the fp32 values too, so a float hyper-parameter shows on the CPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return
    run = InterpretedFunction.run

    def run_fp32(self, *args, **kwargs):
        def fp32(v):
            return torch.tensor(v, dtype=torch.float32).item() if isinstance(v, float) else v

        return run(self, *map(fp32, args), **{k: fp32(v) for k, v in kwargs.items()})

    monkeypatch.setattr(InterpretedFunction, "run", run_fp32)


def test_fused_fp64_keeps_fp64_hyper_parameters(backend, device, gpu_float_arguments):
    # la, 1/gamma and la * margin that are not fp32 numbers: a kernel that rounds its hyper-parameters
    # to fp32 moves the loss by ~1e-8 relative, 100x the fp64 tolerance (docs/semantics.md §1.2)
    la, gamma, margin = 20.1, 0.3, 0.07
    e, y, w = problem(37, 7, 3, 24, all_classes=True, device=device)
    lr, ger, gwr = loss_and_grads(ref_loss, e, y, w, 3, la, gamma, margin, 0.0)
    lf, gef, gwf = loss_and_grads(soft_triple_loss, e, y, w, 3, la, gamma, margin, 0.0, backend=backend)
    assert_close_fp64(lf, lr, "loss")
    assert_close_fp64(gef, ger, "grad embeddings")
    assert_close_fp64(gwf, gwr, "grad centers")
    # the test can fail: the reference with the fp32-rounded values is off by more than the tolerance
    la32, inv_gamma32, la_margin32 = torch.tensor([la, 1.0 / gamma, la * margin]).tolist()
    l32, _, _ = loss_and_grads(ref_loss, e, y, w, 3, la32, 1.0 / inv_gamma32, la_margin32 / la32, 0.0)
    assert (l32 - lr).abs() > 1e-10 * lr.abs()


@pytest.mark.parametrize("n,c,k,d", [(37, 7, 3, 24), (64, 90, 10, 32)])
@pytest.mark.parametrize("la,gamma", [(20.0, 0.1), (40.0, 0.02)])
def test_fused_fp32_derived_tolerance(backend, device, n, c, k, d, la, gamma):
    e, y, w = problem(n, c, k, d, dtype=torch.float32, all_classes=True, device=device)
    args = (k, la, gamma, 0.01, 0.2)
    l64, ge64, gw64 = loss_and_grads(ref_loss, e.double(), y, w.double(), *args)
    l32, ge32, gw32 = loss_and_grads(ref_loss, e, y, w, *args)
    lf, gef, gwf = loss_and_grads(soft_triple_loss, e, y, w, *args, backend=backend)
    assert lf.dtype == torch.float32 and gef.dtype == torch.float32 and gwf.dtype == torch.float32
    assert_close_derived(lf, l32, l64, "loss")
    assert_close_derived(gef, ge32, ge64, "grad embeddings")
    assert_close_derived(gwf, gw32, gw64, "grad centers")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_upstream_grad(backend, device, reduction):
    # a non-unit upstream gradient (per row for "none") must reach both gradients
    e, y, w = problem(19, 6, 4, 11, all_classes=True, device=device)
    up = (
        torch.rand(19, dtype=torch.float64, device=device) + 0.5
        if reduction == "none"
        else torch.tensor(2.5, dtype=torch.float64, device=device)
    )

    def run(fn, **kw):
        e1, w1 = e.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fn(e1, y, w1, 4, 20.0, 0.1, 0.01, 0.2, reduction=reduction, **kw)
        (out * up).sum().backward()
        return out.detach(), e1.grad, w1.grad

    for a, b, nm in zip(run(soft_triple_loss, backend=backend), run(ref_loss), ("loss", "grad e", "grad w")):
        assert_close_fp64(a, b, nm)


@pytest.mark.slow
def test_many_tiles_and_row_blocks(backend, device, skip_if_interpreted_above):
    # N > 256 rows (two row blocks) and many class tiles split over the threads
    skip_if_interpreted_above(300, 400 * 5, 20)
    e, y, w = problem(300, 400, 5, 20, device=device)
    lr, ger, gwr = loss_and_grads(ref_loss, e, y, w, 5, 20.0, 0.1, 0.01, 0.2)
    lf, gef, gwf = loss_and_grads(soft_triple_loss, e, y, w, 5, 20.0, 0.1, 0.01, 0.2, backend=backend)
    assert_close_fp64(lf, lr, "loss")
    assert_close_fp64(gef, ger, "grad embeddings")
    assert_close_fp64(gwf, gwr, "grad centers")


@pytest.mark.backends("cpp")
def test_cpp_thread_count_invariant(backend):
    # the per-thread LSE merge and partial dX sums give the same result on 1 thread
    e, y, w = problem(40, 60, 4, 12)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = loss_and_grads(soft_triple_loss, e, y, w, 4, backend=backend)
        torch.set_num_threads(1)
        b = loss_and_grads(soft_triple_loss, e, y, w, 4, backend=backend)
    finally:
        torch.set_num_threads(before)
    for u, v, nm in zip(a, b, ("loss", "grad e", "grad w")):
        assert_close_fp64(u, v, nm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_half_embeddings_are_computed_in_fp32(backend, device, dtype, reduction):
    e, y, w = problem(23, 6, 3, 16, dtype=torch.float32, all_classes=True, device=device)
    e = e.to(dtype)
    args = (3, 20.0, 0.1, 0.01, 0.2)
    lf, gef, gwf = loss_and_grads(soft_triple_loss, e, y, w, *args, reduction=reduction, backend=backend)
    assert lf.dtype == torch.float32 and gef.dtype == dtype and gwf.dtype == torch.float32
    assert torch.isfinite(gef.float()).all()
    # the same upcast embeddings: the fp32 kernel against the fp32 / fp64 references
    l32, _, gw32 = loss_and_grads(ref_loss, e.float(), y, w, *args, reduction=reduction)
    l64, _, gw64 = loss_and_grads(ref_loss, e.double(), y, w.double(), *args, reduction=reduction)
    assert_close_derived(lf, l32, l64, "loss")
    assert_close_derived(gwf, gw32, gw64, "grad centers")
