"""SoftTriple: dense reference vs PML 2.9.0, fused backends (C++, Triton interpreter) vs reference."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import rll_kernels
from rll_kernels import SoftTripleFused, _backends, soft_triple_loss
from rll_kernels.reference import soft_triple_loss as ref_loss
from rll_kernels.reference import soft_triple_regularizer
from tests.tolerance import assert_close_derived, assert_close_fp64

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_reg = pytest.importorskip("pytorch_metric_learning.regularizers")

HAS_TRITON = rll_kernels.available_backends("cpu", "softtriple")["triton"] is None


def _fused_backends():
    out = [pytest.param("cpp", id="cpp")]
    # the Triton kernels run on CPU tensors through the interpreter (conftest sets TRITON_INTERPRET)
    out.append(
        pytest.param(
            "triton",
            id="triton",
            marks=[
                pytest.mark.interpreter,
                pytest.mark.skipif(not HAS_TRITON, reason="triton not installed / TRITON_INTERPRET not set"),
            ],
        )
    )
    return out


def _problem(n, c, k, d, dtype=torch.float64, all_classes=False):
    e = torch.randn(n, d, dtype=dtype)
    y = torch.randint(0, c, (n,))
    if all_classes and n >= c:
        y[:c] = torch.arange(c)
    w = torch.randn(d, c * k, dtype=dtype)
    return e, y, w


def _loss_and_grads(fn, e, y, w, *args, **kw):
    e = e.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(e, y, w, *args, **kw)
    ge, gw = torch.autograd.grad(loss, (e, w))
    return loss.detach(), ge, gw


# ---------------------------------------------------------------- reference vs PML 2.9.0
@pytest.mark.parametrize("n,c,k,d", [(16, 5, 10, 8), (33, 7, 3, 12), (9, 4, 1, 5)])
@pytest.mark.parametrize("la,gamma,margin", [(20.0, 0.1, 0.01), (7.0, 0.5, 0.3)])
def test_reference_equals_pml_tau0(n, c, k, d, la, gamma, margin):
    e, y, w = _problem(n, c, k, d)
    pml = pml_losses.SoftTripleLoss(c, d, centers_per_class=k, la=la, gamma=gamma, margin=margin).double()
    with torch.no_grad():
        pml.fc.copy_(w)
    e1 = e.clone().requires_grad_(True)
    lp = pml(e1, y)
    lp.backward()
    lr, ge, gw = _loss_and_grads(ref_loss, e, y, w, k, la, gamma, margin, 0.0)
    assert_close_fp64(lr, lp.detach(), "loss")
    assert_close_fp64(ge, e1.grad, "grad embeddings")
    assert_close_fp64(gw, pml.fc.grad, "grad centers")


@pytest.mark.parametrize("n,c,k,d", [(20, 6, 4, 10), (17, 3, 10, 7)])
def test_reference_equals_pml_with_regularizer(n, c, k, d):
    tau = 0.2
    e, y, w = _problem(n, c, k, d)
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
    lr, ge, gw = _loss_and_grads(ref_loss, e, y, w, k, 20.0, 0.1, 0.01, tau, reg_eps=tiny)
    assert_close_fp64(lr, lp.detach(), "loss")
    assert_close_fp64(ge, e1.grad, "grad embeddings")
    assert_close_fp64(gw, pml.fc.grad, "grad centers")
    # with the official 1e-5 the regulariser moves by at most tau * 1e-5 / (2 sqrt(min gap)) per term
    r_off = soft_triple_regularizer(w, k)
    r_pml = soft_triple_regularizer(w, k, reg_eps=tiny)
    assert 0 < (r_off - r_pml).item() < 1e-5 / (2 * torch.sqrt(r_pml.new_tensor(1e-3)).item())


# ---------------------------------------------------------------- fused vs reference
SHAPES = [  # (n, c, k, d): odd sizes, K = 1, more classes than one tile, one row
    (1, 3, 2, 4),
    (13, 5, 1, 9),
    (37, 7, 3, 24),
    (20, 70, 10, 16),
]


@pytest.mark.parametrize("backend", _fused_backends())
@pytest.mark.parametrize("n,c,k,d", SHAPES)
@pytest.mark.parametrize("tau", [0.0, 0.2])
def test_fused_fp64_equals_reference(backend, n, c, k, d, tau):
    e, y, w = _problem(n, c, k, d, all_classes=True)
    lr, ger, gwr = _loss_and_grads(ref_loss, e, y, w, k, 20.0, 0.1, 0.01, tau)
    lf, gef, gwf = _loss_and_grads(soft_triple_loss, e, y, w, k, 20.0, 0.1, 0.01, tau, backend=backend)
    assert lf.dtype == torch.float64
    assert_close_fp64(lf, lr, "loss")
    assert_close_fp64(gef, ger, "grad embeddings")
    assert_close_fp64(gwf, gwr, "grad centers")


@pytest.fixture
def gpu_float_arguments(monkeypatch):
    """Python floats reach a compiled Triton kernel as fp32, but the interpreter keeps them doubles:
    give interpreted kernels the fp32 values too, so a float hyper-parameter shows on the CPU."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not HAS_TRITON:
        return
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def run_fp32(self, *args, **kwargs):
        def fp32(v):
            return torch.tensor(v, dtype=torch.float32).item() if isinstance(v, float) else v

        return run(self, *map(fp32, args), **{k: fp32(v) for k, v in kwargs.items()})

    monkeypatch.setattr(InterpretedFunction, "run", run_fp32)


@pytest.mark.parametrize("backend", _fused_backends())
def test_fused_fp64_keeps_fp64_hyper_parameters(backend, gpu_float_arguments):
    # la, 1/gamma and la * margin that are not fp32 numbers: a kernel that rounds its hyper-parameters
    # to fp32 moves the loss by ~1e-8 relative, 100x the fp64 tolerance (docs/semantics.md §1.2)
    la, gamma, margin = 20.1, 0.3, 0.07
    e, y, w = _problem(37, 7, 3, 24, all_classes=True)
    lr, ger, gwr = _loss_and_grads(ref_loss, e, y, w, 3, la, gamma, margin, 0.0)
    lf, gef, gwf = _loss_and_grads(soft_triple_loss, e, y, w, 3, la, gamma, margin, 0.0, backend=backend)
    assert_close_fp64(lf, lr, "loss")
    assert_close_fp64(gef, ger, "grad embeddings")
    assert_close_fp64(gwf, gwr, "grad centers")
    # the test can fail: the reference with the fp32-rounded values is off by more than the tolerance
    la32, inv_gamma32, la_margin32 = torch.tensor([la, 1.0 / gamma, la * margin]).tolist()
    l32, _, _ = _loss_and_grads(ref_loss, e, y, w, 3, la32, 1.0 / inv_gamma32, la_margin32 / la32, 0.0)
    assert (l32 - lr).abs() > 1e-10 * lr.abs()


@pytest.mark.parametrize("backend", _fused_backends())
@pytest.mark.parametrize("n,c,k,d", [(37, 7, 3, 24), (64, 90, 10, 32)])
@pytest.mark.parametrize("la,gamma", [(20.0, 0.1), (40.0, 0.02)])
def test_fused_fp32_derived_tolerance(backend, n, c, k, d, la, gamma):
    e, y, w = _problem(n, c, k, d, dtype=torch.float32, all_classes=True)
    args = (k, la, gamma, 0.01, 0.2)
    l64, ge64, gw64 = _loss_and_grads(ref_loss, e.double(), y, w.double(), *args)
    l32, ge32, gw32 = _loss_and_grads(ref_loss, e, y, w, *args)
    lf, gef, gwf = _loss_and_grads(soft_triple_loss, e, y, w, *args, backend=backend)
    assert lf.dtype == torch.float32 and gef.dtype == torch.float32 and gwf.dtype == torch.float32
    assert_close_derived(lf, l32, l64, "loss")
    assert_close_derived(gef, ge32, ge64, "grad embeddings")
    assert_close_derived(gwf, gw32, gw64, "grad centers")


@pytest.mark.parametrize("backend", _fused_backends())
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_upstream_grad(backend, reduction):
    # a non-unit upstream gradient (per row for "none") must reach both gradients
    e, y, w = _problem(19, 6, 4, 11, all_classes=True)
    up = (
        torch.rand(19, dtype=torch.float64) + 0.5
        if reduction == "none"
        else torch.tensor(2.5, dtype=torch.float64)
    )

    def run(fn, **kw):
        e1, w1 = e.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fn(e1, y, w1, 4, 20.0, 0.1, 0.01, 0.2, reduction=reduction, **kw)
        (out * up).sum().backward()
        return out.detach(), e1.grad, w1.grad

    for a, b, nm in zip(run(soft_triple_loss, backend=backend), run(ref_loss), ("loss", "grad e", "grad w")):
        assert_close_fp64(a, b, nm)


def test_gradcheck_cpp():
    e, y, w = _problem(7, 4, 3, 5)
    e.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: soft_triple_loss(a, y, b, 3, 5.0, 0.3, 0.1, 0.2, backend="cpp"), (e, w)
    )
    # per-row losses: every row's gradient separately
    assert torch.autograd.gradcheck(
        lambda a, b: soft_triple_loss(a, y, b, 3, 5.0, 0.3, 0.1, 0.0, reduction="none", backend="cpp"), (e, w)
    )


@pytest.mark.interpreter
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed / TRITON_INTERPRET not set")
def test_gradcheck_triton():
    e, y, w = _problem(5, 3, 2, 4)
    e.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: soft_triple_loss(a, y, b, 2, 5.0, 0.3, 0.1, 0.2, backend="triton"), (e, w)
    )


@pytest.mark.slow
def test_cpp_many_tiles_and_row_blocks():
    # N > 256 rows (two row blocks) and many class tiles split over the threads
    e, y, w = _problem(300, 400, 5, 20)
    lr, ger, gwr = _loss_and_grads(ref_loss, e, y, w, 5, 20.0, 0.1, 0.01, 0.2)
    lf, gef, gwf = _loss_and_grads(soft_triple_loss, e, y, w, 5, 20.0, 0.1, 0.01, 0.2, backend="cpp")
    assert_close_fp64(lf, lr, "loss")
    assert_close_fp64(gef, ger, "grad embeddings")
    assert_close_fp64(gwf, gwr, "grad centers")


def test_cpp_thread_count_invariant():
    # the per-thread LSE merge and partial dX sums give the same result on 1 thread
    e, y, w = _problem(40, 60, 4, 12)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = _loss_and_grads(soft_triple_loss, e, y, w, 4, backend="cpp")
        torch.set_num_threads(1)
        b = _loss_and_grads(soft_triple_loss, e, y, w, 4, backend="cpp")
    finally:
        torch.set_num_threads(before)
    for u, v, nm in zip(a, b, ("loss", "grad e", "grad w")):
        assert_close_fp64(u, v, nm)


def test_opcheck_cpp_ops():
    e, y, w = _problem(9, 5, 3, 6)
    x = F.normalize(e, dim=1).requires_grad_(True)
    wn = F.normalize(w, dim=0).requires_grad_(True)
    torch.library.opcheck(torch.ops.rll_kernels.softtriple_fwd.default, (x, y, wn, 3, 20.0, 0.1, 0.01))
    rows, lse = torch.ops.rll_kernels.softtriple_fwd(x.detach(), y, wn.detach(), 3, 20.0, 0.1, 0.01)
    torch.library.opcheck(
        torch.ops.rll_kernels.softtriple_bwd.default,
        (torch.rand_like(rows), x.detach(), y, wn.detach(), lse, 3, 20.0, 0.1, 0.01, True, True),
    )


@pytest.mark.interpreter
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed / TRITON_INTERPRET not set")
def test_opcheck_triton_ops():
    e, y, w = _problem(9, 5, 3, 6)
    x = F.normalize(e, dim=1).requires_grad_(True)
    w.requires_grad_(True)
    torch.library.opcheck(torch.ops.rll_kernels.softtriple_triton_fwd.default, (x, y, w, 3, 20.0, 0.1, 0.01))
    rows, lse = torch.ops.rll_kernels.softtriple_triton_fwd(x.detach(), y, w.detach(), 3, 20.0, 0.1, 0.01)
    torch.library.opcheck(
        torch.ops.rll_kernels.softtriple_triton_bwd.default,
        (torch.rand_like(rows), x.detach(), y, w.detach(), lse, 3, 20.0, 0.1, 0.01, True, True),
    )


# ---------------------------------------------------------------- module, dtypes, PML interop
def test_module_equals_pml_and_loads_its_state_dict():
    c, d, k = 9, 16, 4
    pml = pml_losses.SoftTripleLoss(c, d, centers_per_class=k)
    mod = SoftTripleFused(c, d, centers_per_class=k, tau=0.0)
    mod.load_state_dict(pml.state_dict())  # strict: same keys and shapes
    assert mod.fc.dtype == torch.float32 and mod.fc.shape == (d, c * k)
    e = torch.randn(30, d)
    y = torch.randint(0, c, (30,))
    e1, e2 = e.clone().requires_grad_(True), e.clone().requires_grad_(True)
    lm = mod(e1, y)
    lp = pml(e2, y)
    lm.backward()
    lp.backward()
    # fp32 both: the derived tolerance against the fp64 reference
    l64, ge64, gw64 = _loss_and_grads(
        ref_loss, e.double(), y, pml.fc.detach().double(), k, 20.0, 0.1, 0.01, 0.0
    )
    assert_close_derived(lm.detach(), lp.detach(), l64, "loss")
    assert_close_derived(e1.grad, e2.grad, ge64, "grad embeddings")
    assert_close_derived(mod.fc.grad, pml.fc.grad, gw64, "grad centers")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_keeps_fc_fp32(dtype):
    c, d, k = 6, 12, 3
    mod = SoftTripleFused(c, d, centers_per_class=k)
    fc0 = mod.fc.detach().clone()
    e = torch.randn(10, d).to(dtype).requires_grad_(True)
    y = torch.randint(0, c, (10,))
    loss = mod(e, y)
    loss.backward()
    assert mod.fc.dtype == torch.float32 and mod.fc.grad.dtype == torch.float32
    assert torch.equal(mod.fc.detach(), fc0)  # never rewritten in place (PML #293/#309)
    assert loss.dtype == torch.float32 and e.grad.dtype == dtype
    expected = ref_loss(e.detach().float(), y, fc0, k, 20.0, 0.1, 0.01, 0.2)
    assert_close_derived(loss.detach(), expected, ref_loss(e.detach().double(), y, fc0.double(), k), "loss")


def test_module_double_and_defaults():
    mod = SoftTripleFused(5, 8).double()
    assert mod.fc.dtype == torch.float64 and mod.fc.shape == (8, 50)
    assert (mod.centers_per_class, mod.la, mod.gamma, mod.margin, mod.tau) == (10, 20.0, 0.1, 0.01, 0.2)
    e = torch.randn(6, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    assert_close_fp64(mod(e, y), ref_loss(e, y, mod.fc.detach(), 10), "loss")


# ---------------------------------------------------------------- errors and dispatch
@pytest.mark.parametrize("bad", [-1, 5])
def test_labels_out_of_range(bad):
    e, y, w = _problem(6, 5, 2, 4)
    y[3] = bad
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=5\), got " + str(bad)):
        soft_triple_loss(e, y, w, 2)
    with pytest.raises(ValueError, match="labels must lie"):
        SoftTripleFused(5, 4, 2)(e.float(), y)


def test_bad_arguments():
    e, y, w = _problem(6, 5, 2, 4)
    with pytest.raises(
        ValueError, match="centers has 10 columns, expected a positive multiple of centers_per_class=3"
    ):
        soft_triple_loss(e, y, w, 3)
    with pytest.raises(ValueError, match=r"centers must be \(embedding_size=4"):
        soft_triple_loss(e, y, w.t(), 2)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        soft_triple_loss(e, y, w, 2, gamma=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        soft_triple_loss(e, y, w, 2, backend="cuda")
    with pytest.raises(ValueError, match="ref_emb is not supported"):
        SoftTripleFused(5, 4, 2)(e.float(), y, ref_emb=e.float())


def test_named_unavailable_backend_raises(monkeypatch):
    real = _backends.available_backends("cpu", "softtriple")
    monkeypatch.setitem(_backends._AVAILABLE, ("softtriple", "cpu"), {**real, "triton": "no (test)"})
    e, y, w = _problem(6, 5, 2, 4)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available on cpu"):
        soft_triple_loss(e, y, w, 2, backend="triton")


def test_fallback_to_reference_warns_once(monkeypatch):
    real = _backends.available_backends("cpu", "softtriple")
    monkeypatch.setitem(_backends._AVAILABLE, ("softtriple", "cpu"), {**real, "cpp": "not built (test)"})
    monkeypatch.setattr(_backends, "_warned", set())
    e, y, w = _problem(6, 5, 2, 4)
    with pytest.warns(RuntimeWarning, match="falling back to the dense reference"):
        out = soft_triple_loss(e, y, w, 2)
    assert_close_fp64(out, ref_loss(e, y, w, 2), "loss")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        soft_triple_loss(e, y, w, 2)  # second call: no warning


def test_interpreter_env_is_set_without_gpu():
    # guards the Triton parametrisations above from silently skipping on a CPU-only CI
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"


def test_cpp_zero_and_tiny_centers():
    # F.normalize clamps the norm at 1e-12: a zero center has s = 0 and gradient g / 1e-12
    e, y, w = _problem(11, 4, 3, 6, all_classes=True)
    w[:, 2] = 0.0
    w[:, 7] *= 1e-6
    lr, ger, gwr = _loss_and_grads(ref_loss, e, y, w, 3)
    lf, gef, gwf = _loss_and_grads(soft_triple_loss, e, y, w, 3, backend="cpp")
    assert_close_fp64(lf, lr, "loss")
    assert_close_fp64(gef, ger, "grad embeddings")
    assert_close_fp64(gwf, gwr, "grad centers")
    assert gwf[:, 2].abs().max() > 1e6  # the clamped column really is in the 1/eps regime


@pytest.mark.slow
def test_torch_compile_fullgraph_cpp():
    # the C++ ops (fake kernels + registered autograd) and the regulariser trace without graph breaks
    e, y, w = _problem(13, 5, 3, 8)
    fn = torch.compile(lambda a, b: soft_triple_loss(a, y, b, 3, backend="cpp"), fullgraph=True)
    lc, gec, gwc = _loss_and_grads(lambda a, _y, b: fn(a, b), e, y, w)
    lr, ger, gwr = _loss_and_grads(ref_loss, e, y, w, 3)
    assert_close_fp64(lc, lr, "loss")
    assert_close_fp64(gec, ger, "grad embeddings")
    assert_close_fp64(gwc, gwr, "grad centers")
