"""Parity of the CUDA kernels (csrc/cuda/) with the CPU kernel and the reference, on a GPU.

Runs only where a CUDA device exists and the extension was built with the CUDA kernels
(docs/cuda.md); the GPU-less compile checks are in test_cuda_compile.py. The CPU kernel is the
oracle: the two implement the same op, so every output is compared (loss, stats, the "paper"
query gradient of the forward, both gradients of the backward).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_derived, assert_close_fp64, max_abs

import rll_kernels
from rll_kernels import _extension, reference

HAS_CUDA_KERNELS = torch.cuda.is_available() and _extension.has_kernel("rll_fwd", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not HAS_CUDA_KERNELS,
        reason="needs a CUDA device and rll_kernels built with its CUDA "
        "kernels (FORCE_CUDA=1 pip install ..., docs/cuda.md)",
    ),
]

FWD = torch.ops.rll_kernels.rll_fwd
BWD = torch.ops.rll_kernels.rll_bwd
# (N, M, D, in_batch): sizes off the tile multiples (64, 32, 16) on purpose
SHAPES = [(100, 100, 72, True), (130, 70, 40, False), (7, 300, 129, False)]
# alpha, beta, Tn, Tp, lambda, bias per gallery row, attached
SEMANTICS = {"paper": (1.2, 0.8, 10.0, 0.0, 0.5, 0.0, False), "pml": (1.2, 0.8, 10.0, 2.0, 0.4, 1e-5, True)}


def _problem(n, m, d, in_batch, dtype, device="cpu", classes=5, raw=True):
    """Unit rows, scaled to norms 1e-2 .. 1e2 when ``raw`` (the ops normalise them); in-batch k is absent."""
    q = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    if raw:
        q = q * torch.logspace(-2, 2, n, dtype=torch.float64)[:, None]
    ql = torch.randint(0, classes, (n,))
    if in_batch:
        k, kl, qid, kid = None, None, None, None
    else:
        k = F.normalize(torch.randn(m, d, dtype=torch.float64), dim=1)
        k[:3] = q[:3]  # exact duplicates across the two sides
        kl, qid, kid = torch.randint(0, classes, (m,)), None, None
    q, k = q.to(dtype), (None if k is None else k.to(dtype))

    def mv(t):
        return None if t is None else t.to(device)

    return mv(q), mv(ql), mv(qid), mv(k), mv(kl), mv(kid)


def _run(prob, params, need_grad, grad_rows=None, normalize=True):
    q, ql, qid, k, kl, kid = prob
    a, b, tn, tp, lam, bias, attached = params
    hp = (a, b, tn, tp, lam, bias, None, normalize, attached)
    # "pml": the statistics-only forward on both devices (on the CPU, need_grad in-batch would run
    # both passes in the forward, docs/semantics.md §2.6); the backward op gives the gradients
    loss, gq_fwd, stats, z, norms = FWD(q, ql, qid, k, kl, kid, *hp, need_grad and not attached)
    g = grad_rows if grad_rows is not None else torch.ones_like(loss)
    gq, gk = BWD(
        g.to(loss.device, loss.dtype),
        q,
        ql,
        qid,
        k,
        kl,
        kid,
        stats,
        z,
        norms,
        *hp,
        True,
        attached,
    )
    return {"loss": loss, "gq_fwd": gq_fwd, "stats": stats, "gq": gq, "gk": gk}


def _finite_stats(st):
    return torch.where(torch.isinf(st), torch.zeros_like(st), st)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sem", sorted(SEMANTICS))
def test_fp64_matches_cpu_kernel(shape, sem):
    params = SEMANTICS[sem]
    cpu = _problem(*shape, torch.float64)
    gpu = tuple(None if t is None else t.cuda() for t in cpu)
    g = torch.rand(shape[0], dtype=torch.float64)
    want = _run(cpu, params, need_grad=True, grad_rows=g)
    got = _run(gpu, params, need_grad=True, grad_rows=g)
    assert torch.equal(torch.isinf(got["stats"]).cpu(), torch.isinf(want["stats"]))  # same empty sets
    for key in ("loss", "gq_fwd", "gq", "gk"):
        assert got[key].shape == want[key].shape, key
        assert_close_fp64(got[key].cpu(), want[key], key)
    assert_close_fp64(_finite_stats(got["stats"]).cpu(), _finite_stats(want["stats"]), "stats")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sem", sorted(SEMANTICS))
def test_fp32_within_reference_rounding(shape, sem):
    params = SEMANTICS[sem]
    p64 = _problem(*shape, torch.float64)
    p32 = tuple(t if t is None or not t.is_floating_point() else t.float() for t in p64)
    g = torch.rand(shape[0], dtype=torch.float64)
    ref64, ref32 = _run(p64, params, True, g), _run(p32, params, True, g)
    got = _run(tuple(None if t is None else t.cuda() for t in p32), params, True, g)
    for key in ("loss", "gq_fwd", "gq", "gk"):
        assert got[key].dtype == torch.float32
        assert_close_derived(got[key].cpu(), ref32[key], ref64[key], key)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sem", sorted(SEMANTICS))
def test_half_inputs_tensor_cores(dtype, sem):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 tensor cores need sm_80+")
    params = SEMANTICS[sem]
    shape = (130, 70, 40, False)
    # unit rows rounded to the half type once, not normalised again: the oracle sees the same values
    ph = _problem(*shape, dtype, raw=False)
    p64 = tuple(t if t is None or not t.is_floating_point() else t.double() for t in ph)
    p32 = tuple(t if t is None or not t.is_floating_point() else t.float() for t in ph)
    g = torch.rand(shape[0], dtype=torch.float64)
    ref64, ref32 = _run(p64, params, True, g, normalize=False), _run(p32, params, True, g, normalize=False)
    got = _run(tuple(None if t is None else t.cuda() for t in ph), params, True, g, normalize=False)
    assert got["loss"].dtype == torch.float32 and got["stats"].dtype == torch.float32
    # loss/stats are fp32 accumulations of exact products: fp32-reference rounding applies
    assert_close_derived(got["loss"].cpu(), ref32["loss"], ref64["loss"], "loss", factor=8.0)
    for key in ("gq_fwd", "gq", "gk"):  # gradients are returned in the input dtype
        assert got[key].dtype == dtype and got[key].shape == ref64[key].shape, key
        if ref64[key].numel() == 0:
            continue
        scale = ref64[key].abs().max().item()
        err = max_abs(got[key].cpu(), ref64[key])
        assert err <= 2 * torch.finfo(dtype).eps * max(scale, 1e-12) + 8 * max_abs(ref32[key], ref64[key]), (
            key
        )


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_functional_backend_cuda_matches_reference(sem):
    x = torch.randn(96, 48, device="cuda", dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (96,), device="cuda")
    loss = rll_kernels.ranked_list_loss(x, y, semantics=sem, backend="cuda", reduction="none")
    w = torch.rand_like(loss)
    (gx,) = torch.autograd.grad((loss * w).sum(), x)
    xr = x.detach().cpu().requires_grad_(True)
    ref = reference.ranked_list_loss(xr, y.cpu(), semantics=sem, reduction="none")
    (gr,) = torch.autograd.grad((ref * w.cpu()).sum(), xr)
    assert_close_fp64(loss.detach().cpu(), ref.detach(), "loss", rtol=1e-9)
    assert_close_fp64(gx.cpu(), gr, "grad", rtol=1e-9)


def test_opcheck_cuda():
    q, ql, qid, k, kl, kid = _problem(40, 40, 24, True, torch.float32, device="cuda")
    q.requires_grad_(True)
    args = (q, ql, qid, k, kl, kid, 1.2, 0.8, 10.0, 0.0, 0.5, 0.0, None, True, False, True)
    torch.library.opcheck(FWD, args)


def test_auto_never_picks_cuda():
    x = torch.randn(8, 4, device="cuda")
    assert rll_kernels._backends.resolve("rll", "auto", x.device) != "cuda"
