"""The normalisation inside the fused RLL ops (docs/semantics.md §1.4) on every fused backend: rows of
any finite scale give the loss and gradient of the unit rows, zero rows stay zero, any strides take
the shared in-batch path without a copy; non-finite rows are detected inside the op (§6)."""

import pytest
import torch
import torch.nn.functional as F
from rll_cases import run_loss
from tolerance import assert_close_derived, assert_close_fp64

import rll_kernels
from rll_kernels import functional, reference

fused = rll_kernels.ranked_list_loss


def _unit_problem(n, d, m, device):
    u = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    y = torch.arange(n) // 3
    if m is None:
        return u.to(device), y.to(device), None, None
    r = F.normalize(torch.randn(m, d, dtype=torch.float64), dim=1)
    return u.to(device), y.to(device), r.to(device), (torch.arange(m) // 3).to(device)


def _row_scales(n, scale, device):
    """Every other row scaled by ``scale``, the others by 1/scale: both ends of the range at once."""
    s = torch.where(torch.arange(n) % 2 == 0, scale, 1.0 / scale).to(torch.float64)
    return s.to(device)[:, None]


@pytest.mark.parametrize("sem", ["paper", "pml"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gallery", [False, True], ids=["in_batch", "ref_emb"])
def test_rows_of_norm_1e30_and_1e_30_give_the_unit_rows(backend, device, sem, dtype, gallery):
    # |e| = 1e30 overflows and 1e-30 underflows a plain float32 squared norm (F.normalize: zero rows and
    # unnormalised rows); the op's scale-safe norms give the unit rows' loss, and the gradient of the
    # unit rows divided by |e| (the normalisation's Jacobian (I - z z^T)/|e|)
    u, y, r, ry = _unit_problem(26, 12, 17 if gallery else None, device)
    su = _row_scales(u.shape[0], 1e30, device)
    sr = None if r is None else _row_scales(r.shape[0], 1e30, device)
    fn = lambda *x, **k: fused(*x, backend=backend, **k)  # noqa: E731
    e = (u * su).to(dtype)
    g_e = None if r is None else (r * sr).to(dtype)
    assert torch.isfinite(e).all() and (e.abs().amax(1) > 0).all()
    got = run_loss(fn, e, y, g_e, ry, semantics=sem)
    want64 = run_loss(reference.ranked_list_loss, u, y, r, ry, semantics=sem)
    grads = [got[1].double() * su] + ([got[2].double() * sr] if (gallery and sem == "pml") else [])
    wants = [want64[1]] + ([want64[2]] if (gallery and sem == "pml") else [])
    if dtype == torch.float64:
        assert_close_fp64(got[0], want64[0], "loss")
        for a, b in zip(grads, wants):
            assert_close_fp64(a, b, "grad x |e|")
        return
    want32 = run_loss(
        reference.ranked_list_loss, u.float(), y, None if r is None else r.float(), ry, semantics=sem
    )
    assert_close_derived(got[0], want32[0], want64[0], "loss fp32")
    for a, b32, b64 in zip(grads, [want32[1], want32[2]], wants):
        assert_close_derived(a, b32, b64, "grad x |e| fp32")


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_zero_rows_stay_zero_with_zero_gradient(backend, device, sem):
    e = torch.randn(20, 8, dtype=torch.float64, device=device)
    e[[3, 11]] = 0.0
    y = (torch.arange(20) // 4).to(device)
    got = run_loss(lambda *x, **k: fused(*x, backend=backend, **k), e, y, None, None, semantics=sem)
    want = run_loss(reference.ranked_list_loss, e, y, None, None, semantics=sem)
    assert_close_fp64(got[0], want[0], "loss")  # a zero row is at distance 1 from every unit row
    assert (got[1][[3, 11]] == 0).all()  # F.normalize's gradient there is g / 1e-12: not a gradient
    keep = torch.ones(20, dtype=torch.bool)
    keep[[3, 11]] = False
    assert_close_fp64(got[1][keep], want[1][keep], "grad of the other rows")


def _strided_views(e: torch.Tensor) -> dict:
    wide = torch.zeros(e.shape[0], 2 * e.shape[1], dtype=e.dtype, device=e.device)
    wide[:, ::2] = e
    return {
        "column_major": e.t().contiguous().t(),
        "every_other_column": wide[:, ::2],
        "every_other_row": torch.stack([e, e], 1).reshape(-1, e.shape[1])[::2],
    }


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_strided_inputs_take_the_shared_in_batch_path(backend, device, sem, monkeypatch):
    # one op call that sees the caller's tensor itself (no copy) and no gallery tensor: the in-batch
    # path ("pml": the backward that computes each unordered tile pair once for both ends)
    e = torch.randn(30, 10, dtype=torch.float64, device=device)
    y = (torch.arange(30) // 3).to(device)
    want = run_loss(lambda *x, **k: fused(*x, backend=backend, **k), e, y, None, None, semantics=sem)
    calls = []
    real = functional.fused_op

    def recording(loss, name, which="fwd"):
        op = real(loss, name, which)

        def call(*args):
            calls.append(args)
            return op(*args)

        return call

    monkeypatch.setattr(functional, "fused_op", recording)
    for kind, view in _strided_views(e).items():
        calls.clear()
        x = view.detach().requires_grad_()
        loss = fused(x, y, semantics=sem, backend=backend)
        (g,) = torch.autograd.grad(loss, x)
        assert len(calls) == 1, kind
        q, k = calls[0][0], calls[0][3]
        assert k is None and q.data_ptr() == x.data_ptr() and q.stride() == x.stride(), kind
        assert_close_fp64(loss, want[0], f"{kind} loss")
        assert_close_fp64(g, want[1], f"{kind} grad")


def _nan_cases(device):
    e = torch.randn(12, 6, device=device)
    y = (torch.arange(12) // 3).to(device)
    bad = e.clone()
    bad[4, 2] = float("nan")
    inf = e.clone()
    inf[7, 0] = float("inf")
    return e, y, bad, inf


@pytest.mark.backends("cpp")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_nonfinite_input_raises_on_the_cpu(backend, device, compiled, sem):
    e, y, bad, inf = _nan_cases(device)
    mod = rll_kernels.RLLFused(semantics=sem, backend=backend)
    fn = torch.compile(mod, fullgraph=True, backend="aot_eager") if compiled else mod
    with pytest.raises(ValueError, match=r"embeddings contains NaN or Inf \(row 4\)"):
        fn(bad, y)
    with pytest.raises(ValueError, match=r"ref_emb contains NaN or Inf \(row 7\)"):
        fn(e, y, ref_emb=inf, ref_labels=y)
    with pytest.raises(ValueError, match=r"embeddings contains NaN or Inf \(row 7\)"):
        rll_kernels.ranked_list_loss(inf, y, semantics=sem, backend=backend, normalize=False)
    assert torch.isfinite(fn(e, y))


@pytest.mark.backends("triton")
def test_nonfinite_input_gives_nan_without_sync_or_raises_when_strict(backend, device, monkeypatch):
    e, y, bad, inf = _nan_cases(device)
    for x in (bad, inf):
        for sem in ("paper", "pml"):
            assert torch.isnan(fused(x, y, semantics=sem, backend=backend)), sem  # never a finite loss
    assert torch.isnan(fused(e, y, ref_emb=inf, ref_labels=y, backend=backend))
    monkeypatch.setenv("RLL_STRICT_FINITE", "1")
    with pytest.raises(ValueError, match="embeddings contains NaN or Inf"):
        fused(bad, y, backend=backend)
    with pytest.raises(ValueError, match="ref_emb contains NaN or Inf"):
        fused(e, y, ref_emb=inf, ref_labels=y, backend=backend)
    assert torch.isfinite(fused(e, y, backend=backend))
