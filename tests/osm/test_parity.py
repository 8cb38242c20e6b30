"""OSM + CAA weighted contrastive loss (docs/semantics.md §4): fused C++ / Triton kernels vs the dense
reference."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import rll_kernels
from rll_kernels import _backends, reference
from tests.tolerance import assert_close_derived, assert_close_fp64

CPP = "cpp"
TRITON = pytest.param("triton", marks=pytest.mark.interpreter)


def run(backend, x, y, att=None, **kw):
    """(loss, dL/dx) of one backend on a fresh leaf copy of x."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():  # also inside an autograd.Function's backward
        if backend == "ref":
            loss = reference.weighted_contrastive_loss(x, y, att, **kw)
        else:
            loss = rll_kernels.weighted_contrastive_loss(x, y, att, backend=backend, **kw)
        (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def rand_att(n, dtype, lo=0.05):
    return torch.rand(n, dtype=dtype).clamp_min(lo)


def check_fp64(backend, x, y, att=None, **kw):
    l_f, g_f = run(backend, x, y, att, **kw)
    l_r, g_r = run("ref", x, y, att, **kw)
    assert torch.isfinite(l_f) and torch.isfinite(g_f).all()
    assert_close_fp64(l_f, l_r, "loss")
    assert_close_fp64(g_f, g_r, "grad")
    return l_f, g_f


def check_fp32(backend, x64, y, att64=None, **kw):
    att32 = None if att64 is None else att64.float()
    l_k, g_k = run(backend, x64.float(), y, att32, **kw)
    l_32, g_32 = run("ref", x64.float(), y, att32, **kw)
    l_64, g_64 = run("ref", x64, y, att64, **kw)
    assert l_k.dtype == torch.float32 and g_k.dtype == torch.float32
    assert_close_derived(l_k, l_32, l_64, "loss")
    assert_close_derived(g_k, g_32, g_64, "grad")


# ------------------------------------------------------------------ the reference itself
def loop_loss(z, y, a, alpha, sigma, lam):
    """docs/semantics.md §4.1 as plain Python loops over the pairs i < j (independent of the reference)."""
    sp = tp = sn = tn = 0.0
    n = len(y)
    for i, j in itertools.combinations(range(n), 2):
        d = math.dist(z[i], z[j])
        aij = min(a[i], a[j])
        if y[i] == y[j]:
            w = math.exp(-d * d / (2 * sigma**2)) * aij
            sp, tp = sp + w, tp + w * d * d
        else:
            h = max(alpha - d, 0.0)
            sn, tn = sn + h * aij, tn + h * aij * h * h
    lp = 0.5 * tp / sp if sp > 0 else 0.0
    ln = 0.5 * tn / sn if sn > 0 else 0.0
    return (1 - lam) * lp + lam * ln


@pytest.mark.parametrize("n,c", [(2, 1), (2, 2), (9, 3), (16, 16)])
def test_reference_matches_pair_loops(n, c):
    x = torch.randn(n, 5, dtype=torch.float64)
    y = torch.randint(0, c, (n,))
    a = rand_att(n, torch.float64)
    z = F.normalize(x, dim=1)
    for alpha, sigma, lam in [(1.2, 0.8, 0.5), (1.7, 0.3, 0.2)]:
        want = loop_loss(z.tolist(), y.tolist(), a.tolist(), alpha, sigma, lam)
        got = reference.weighted_contrastive_loss(x, y, a, alpha, sigma, lam).item()
        assert got == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_reference_gradient_is_the_constant_weight_formula():
    # dL/dd = (1-lam)/S+ w+ d (pos), -lam/S- w- h (neg); dL/dz = diag(G 1) Z - G Z, G = dL/dd / d symmetric
    n, alpha, sigma, lam = 23, 1.3, 0.7, 0.4
    z = F.normalize(torch.randn(n, 6, dtype=torch.float64), dim=1)
    y = torch.randint(0, 4, (n,))
    a = rand_att(n, torch.float64)
    d = torch.cdist(z, z)
    off = ~torch.eye(n, dtype=torch.bool)
    same = (y[:, None] == y[None, :]) & off
    diff = (y[:, None] != y[None, :]) & off
    aij = torch.minimum(a[:, None], a[None, :])
    h = (alpha - d).clamp_min(0)
    wp = torch.where(same, torch.exp(-d * d / (2 * sigma**2)) * aij, 0.0)
    wn = torch.where(diff, h * aij, 0.0)
    s_p, s_n = wp.sum() / 2, wn.sum() / 2  # both orders of every unordered pair
    dldd = torch.where(same, (1 - lam) / s_p * wp * d, 0.0) - torch.where(diff, lam / s_n * wn * h, 0.0)
    G = torch.where(off, dldd / torch.where(off, d, 1.0), 0.0)
    want = G.sum(1, keepdim=True) * z - G @ z
    zz = z.clone().requires_grad_(True)
    loss = reference.weighted_contrastive_loss(zz, y, a, alpha, sigma, lam, normalize=False)
    (got,) = torch.autograd.grad(loss, zz)
    assert_close_fp64(got, want, "grad")


# ------------------------------------------------------------------ fused vs reference
# (n, d, classes, alpha): few classes / a wide margin make dense weight tiles (GEMM path of the C++
# kernel), many classes / a narrow margin sparse ones (sparse update path); n > 128 crosses tiles.
CASES = [
    (2, 3, 1, 1.2),
    (3, 1, 2, 1.2),
    (17, 7, 4, 1.2),
    (130, 33, 3, 2.5),
    (257, 20, 100, 0.6),
    (300, 64, 10, 1.2),
    (301, 5, 2, 1.9),
]


@pytest.mark.parametrize("n,d,c,alpha", CASES)
@pytest.mark.parametrize("with_att", [False, True])
def test_cpp_fp64_matches_reference(n, d, c, alpha, with_att):
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, c, (n,))
    att = rand_att(n, torch.float64) if with_att else None
    # D = 1: normalised embeddings are +-1 and their gradient is identically 0, so test unnormalised
    check_fp64(CPP, x, y, att, alpha=alpha, sigma=0.6, normalize=d > 1)


@pytest.mark.parametrize("n,d,c,alpha", CASES)
def test_cpp_fp32_derived_tolerance(n, d, c, alpha):
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, c, (n,))
    check_fp32(CPP, x, y, rand_att(n, torch.float64), alpha=alpha, normalize=d > 1)


@pytest.mark.parametrize("backend", [CPP, TRITON])
def test_hyper_parameters_and_no_normalize(backend):
    x = 0.4 * torch.randn(41, 9, dtype=torch.float64)
    y = torch.randint(0, 5, (41,))
    for alpha, sigma, lam, norm in [(0.9, 0.3, 0.0, False), (1.5, 2.0, 1.0, True), (1.1, 0.8, 0.7, False)]:
        check_fp64(
            backend,
            x,
            y,
            rand_att(41, torch.float64),
            alpha=alpha,
            sigma=sigma,
            imbalance=lam,
            normalize=norm,
        )


@pytest.mark.interpreter
@pytest.mark.parametrize("n,d,c", [(2, 3, 1), (37, 11, 5), (50, 40, 3)])
def test_triton_fp64_matches_reference(n, d, c):
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, c, (n,))
    check_fp64("triton", x, y, None)
    check_fp64("triton", x, y, rand_att(n, torch.float64), alpha=1.6, sigma=0.5)


@pytest.mark.interpreter
def test_triton_fp32_derived_tolerance():
    x = torch.randn(45, 19, dtype=torch.float64)
    y = torch.randint(0, 4, (45,))
    check_fp32("triton", x, y, rand_att(45, torch.float64))


# ------------------------------------------------------------------ gradient checks
class _FrozenWeights(torch.autograd.Function):
    """Value: docs/semantics.md §4.1 with the weights frozen at x0 (so finite differences see constant
    weights); backward: the backend's gradient at x0. gradcheck compares the two."""

    @staticmethod
    def forward(ctx, x, x0, y, a, backend, alpha, sigma, lam):
        ctx.save_for_backward(x)
        ctx.args = (y, a, backend, alpha, sigma, lam)
        n = x.shape[0]
        z0, z = F.normalize(x0, dim=1), F.normalize(x, dim=1)
        iu = torch.ones(n, n, dtype=torch.bool).triu(1)
        same = (y[:, None] == y[None, :]) & iu
        diff = (y[:, None] != y[None, :]) & iu
        aij = torch.minimum(a[:, None], a[None, :])
        d0, d = torch.cdist(z0, z0), torch.cdist(z, z)
        wp = torch.where(same, torch.exp(-d0 * d0 / (2 * sigma**2)) * aij, 0.0)
        wn = torch.where(diff, (alpha - d0).clamp_min(0) * aij, 0.0)
        lp = 0.5 * (wp * d * d).sum() / wp.sum() if wp.sum() > 0 else 0.0
        ln = 0.5 * (wn * (alpha - d).clamp_min(0) ** 2).sum() / wn.sum() if wn.sum() > 0 else 0.0
        return torch.as_tensor((1 - lam) * lp + lam * ln, dtype=x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        y, a, backend, alpha, sigma, lam = ctx.args
        _, grad = run(backend, x, y, a, alpha=alpha, sigma=sigma, imbalance=lam)
        return (g * grad,) + (None,) * 7


@pytest.mark.parametrize("backend", ["ref", CPP, TRITON])
def test_gradcheck_against_frozen_weight_finite_differences(backend):
    n = 12
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4])
    a = rand_att(n, torch.float64, lo=0.2)
    x0 = x.clone()  # gradcheck perturbs x in place; the weights stay at x0
    x = x.requires_grad_(True)
    fn = lambda xx: _FrozenWeights.apply(xx, x0, y, a, backend, 1.6, 0.7, 0.45)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", [CPP, TRITON])
def test_grad_output_scales_the_gradient(backend):
    x = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (20,))
    (g1,) = torch.autograd.grad(rll_kernels.weighted_contrastive_loss(x, y, backend=backend), x)
    (g3,) = torch.autograd.grad(-3.0 * rll_kernels.weighted_contrastive_loss(x, y, backend=backend), x)
    assert_close_fp64(g3, -3.0 * g1, "grad")
    assert g1.abs().max() > 0


def test_opcheck_cpp_op():
    z = F.normalize(torch.randn(19, 5, dtype=torch.float64), dim=1).requires_grad_(True)
    y = torch.randint(0, 3, (19,))
    a = rand_att(19, torch.float64)
    torch.library.opcheck(torch.ops.rll_kernels.osm_fwd, (z, y, a, 1.2, 0.8, 0.5, True))
    torch.library.opcheck(torch.ops.rll_kernels.osm_fwd, (z.detach(), y, None, 1.2, 0.8, 0.5, False))


@pytest.mark.interpreter
def test_opcheck_triton_op():
    z = F.normalize(torch.randn(18, 5, dtype=torch.float64), dim=1).requires_grad_(True)
    y = torch.randint(0, 3, (18,))
    torch.library.opcheck(
        torch.ops.rll_kernels.osm_triton_fwd, (z, y, rand_att(18, torch.float64), 1.2, 0.8, 0.5, True)
    )


# ------------------------------------------------------------------ attention
@pytest.mark.parametrize("backend", ["ref", CPP, TRITON])
def test_attention_all_ones_equals_none_and_random_differs(backend):
    x = torch.randn(33, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (33,))
    l_none, g_none = run(backend, x, y, None)
    l_ones, g_ones = run(backend, x, y, torch.ones(33, dtype=torch.float64))
    assert_close_fp64(l_ones, l_none, "loss")
    assert_close_fp64(g_ones, g_none, "grad")
    a = rand_att(33, torch.float64)
    l_a, g_a = check_fp64(backend, x, y, a) if backend != "ref" else run(backend, x, y, a)
    assert abs(l_a.item() - l_none.item()) > 1e-6 and (g_a - g_none).abs().max() > 1e-6


def test_attention_uses_the_pair_minimum():
    # two positive pairs (0,1), (2,3) at distances d1 != d2; attention only on sample 1 and 2
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.28, 0.96]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    a = torch.tensor([1.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    d1, d2 = torch.dist(z[0], z[1]).item(), torch.dist(z[2], z[3]).item()
    w1, w2 = (
        0.25 * math.exp(-(d1**2) / 2),
        0.5 * math.exp(-(d2**2) / 2),
    )  # min(a_0, a_1), min(a_2, a_3); sigma 1
    neg = [(i, j) for i in (0, 1) for j in (2, 3)]
    hn = [max(3.0 - torch.dist(z[i], z[j]).item(), 0) for i, j in neg]
    wn = [min(a[i], a[j]).item() * h for (i, j), h in zip(neg, hn)]
    lp = 0.5 * (w1 * d1**2 + w2 * d2**2) / (w1 + w2)
    ln = 0.5 * sum(w * h * h for w, h in zip(wn, hn)) / sum(wn)
    for backend in ("ref", CPP):
        loss, _ = run(backend, z, y, a, alpha=3.0, sigma=1.0, imbalance=0.3, normalize=False)
        assert loss.item() == pytest.approx(0.7 * lp + 0.3 * ln, rel=1e-12)


@pytest.mark.parametrize("backend", ["reference", CPP, TRITON])
@pytest.mark.parametrize("bad", ["long", "short", "2d", "zero", "negative", "above_one", "nan", "int"])
def test_bad_attention_raises(backend, bad):
    n = 6
    x = torch.randn(n, 3)
    y = torch.randint(0, 2, (n,))
    a = torch.full((n,), 0.5)
    att = {
        "long": torch.full((n + 1,), 0.5),
        "short": torch.full((n - 1,), 0.5),
        "2d": a.view(n, 1),
        "zero": a.clone().index_fill_(0, torch.tensor([2]), 0.0),
        "negative": a.clone().index_fill_(0, torch.tensor([0]), -0.1),
        "above_one": a.clone().index_fill_(0, torch.tensor([5]), 1.0001),
        "nan": a.clone().index_fill_(0, torch.tensor([1]), float("nan")),
        "int": torch.ones(n, dtype=torch.int64),
    }[bad]
    with pytest.raises(ValueError, match="attention"):
        rll_kernels.weighted_contrastive_loss(x, y, att, backend=backend)
    if backend == "reference":
        with pytest.raises(ValueError, match="attention"):
            reference.weighted_contrastive_loss(x, y, att)


def test_attention_is_never_differentiated():
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    a = rand_att(10, torch.float64).requires_grad_(True)
    y = torch.randint(0, 2, (10,))
    for backend in ("reference", CPP):
        loss = rll_kernels.weighted_contrastive_loss(x, y, a, backend=backend)
        gx, ga = torch.autograd.grad(loss, (x, a), allow_unused=True)
        assert ga is None and gx is not None


def test_class_aware_attention():
    logits = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (13,))
    a = rll_kernels.class_aware_attention(logits, y)
    want = torch.softmax(logits.detach(), 1)[torch.arange(13), y]
    assert_close_fp64(a, want, "attention")
    assert not a.requires_grad and a.dtype == torch.float64
    g = rll_kernels.class_aware_attention(logits, y, gaussian_sigma=0.68)
    assert_close_fp64(g, torch.exp(-((1 - want) ** 2) / (2 * 0.68**2)), "gaussian attention")
    # an outlier whose true class has probability 0 still gets a valid attention in (0, 1]
    far = torch.tensor([[0.0, 1e4], [5.0, 0.0]])
    a_far = rll_kernels.class_aware_attention(far, torch.tensor([0, 0]))
    assert (a_far > 0).all() and (a_far <= 1).all()
    rll_kernels.weighted_contrastive_loss(torch.randn(2, 3), torch.tensor([0, 0]), a_far)  # accepted
    with pytest.raises(ValueError, match="labels"):
        rll_kernels.class_aware_attention(logits, torch.full((13,), 5))
    with pytest.raises(ValueError, match="logits"):
        rll_kernels.class_aware_attention(logits[0], y[:1])


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("backend", [CPP, TRITON])
def test_no_positive_pair(backend):
    n = 24
    x = torch.randn(n, 5, dtype=torch.float64)
    y = torch.randperm(n)  # every label distinct: L_P = 0
    l_f, g_f = check_fp64(backend, x, y, rand_att(n, torch.float64), alpha=1.5, imbalance=0.3)
    l_n = run("ref", x, y, None, alpha=1.5, imbalance=1.0)[0]  # = L_N with unit attention
    assert l_f.item() > 0 and l_n.item() > 0
    # loss = lam L_N exactly: compare with imbalance = 1 on the same attention
    l_1 = run(backend, x, y, None, alpha=1.5, imbalance=1.0)[0]
    l_3 = run(backend, x, y, None, alpha=1.5, imbalance=0.3)[0]
    assert l_3.item() == pytest.approx(0.3 * l_1.item(), rel=1e-12)


@pytest.mark.parametrize("backend", [CPP, TRITON])
def test_no_negative_inside_the_margin(backend):
    n = 20
    x = torch.randn(n, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    l_1, g_1 = check_fp64(backend, x, y, None, alpha=1e-3, imbalance=0.4)  # every negative has d > alpha
    l_0, _ = run(backend, x, y, None, alpha=1e-3, imbalance=0.0)
    assert l_1.item() == pytest.approx(0.6 * l_0.item(), rel=1e-12) and l_0.item() > 0
    # one class only: no negative pair at all
    check_fp64(backend, x, torch.zeros(n, dtype=torch.int64), None)


@pytest.mark.parametrize("backend", [CPP, TRITON])
def test_single_sample_and_empty_sets_give_zero(backend):
    l, g = run(backend, torch.randn(1, 4, dtype=torch.float64), torch.tensor([3]))
    assert l.item() == 0.0 and (g == 0).all()
    # two samples of different classes far apart: both sets empty
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    l, g = run(backend, x, torch.tensor([0, 1]), alpha=1.0)
    assert l.item() == 0.0 and (g == 0).all()


@pytest.mark.parametrize("backend", [CPP, TRITON])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_duplicates_give_finite_values(backend, dtype):
    base = torch.randn(6, 8, dtype=torch.float64)
    x = base[torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 5])].to(dtype)  # exact duplicates
    y = torch.tensor([0, 0, 1, 2, 3, 3, 4, 4, 5, 5, 6])  # duplicate pairs with same and different labels
    l_f, g_f = run(backend, x, y)
    assert torch.isfinite(l_f) and torch.isfinite(g_f).all()
    if dtype == torch.float64:
        check_fp64(backend, x, y, rand_att(11, dtype))
    # a whole batch of one point: every pair is a duplicate
    same = base[:1].expand(7, 8).contiguous().to(dtype)
    for labels in (torch.zeros(7, dtype=torch.int64), torch.arange(7)):
        l, g = run(backend, same, labels)
        assert torch.isfinite(l) and torch.isfinite(g).all() and (g == 0).all()
    # different labels at d = 0: L_N = alpha^2 / 2, with no gradient direction
    l, _ = run(backend, same, torch.arange(7), imbalance=1.0)
    assert l.item() == pytest.approx(0.5 * 1.2**2, rel=1e-6)


# ------------------------------------------------------------------ API
def test_module_and_dtypes():
    m = rll_kernels.WeightedContrastiveFused()
    assert (m.alpha, m.sigma, m.imbalance) == (1.2, 0.8, 0.5) and "sigma=0.8" in repr(m)
    x = torch.randn(30, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    a = rand_att(30, torch.float64)
    assert_close_fp64(m(x, y, a), reference.weighted_contrastive_loss(x, y, a), "module loss")
    lb = m(x.to(torch.bfloat16), y)  # half types run in fp32
    assert lb.dtype == torch.float32 and torch.isfinite(lb)
    with torch.no_grad():
        assert_close_fp64(m(x, y, a), reference.weighted_contrastive_loss(x, y, a), "no-grad loss")


@pytest.mark.parametrize(
    "kw",
    [
        dict(sigma=0.0),
        dict(sigma=-1.0),
        dict(alpha=0.0),
        dict(imbalance=1.5),
        dict(alpha=float("nan")),
        dict(backend="cuda"),
    ],
)
def test_bad_parameters_raise(kw):
    with pytest.raises(ValueError):
        rll_kernels.WeightedContrastiveFused(**kw)


def test_backend_resolution(monkeypatch):
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (9,))
    real = _backends.available_backends("cpu", "osm")
    monkeypatch.setitem(
        _backends._AVAILABLE, ("osm", "cpu"), {**real, "cpp": "not built (test)", "triton": "no (test)"}
    )
    with pytest.raises(RuntimeError, match="'cpp' is not available"):
        rll_kernels.weighted_contrastive_loss(x, y, backend="cpp")
    with pytest.raises(RuntimeError, match="'triton' is not available"):
        rll_kernels.weighted_contrastive_loss(x, y, backend="triton")
    monkeypatch.setattr(_backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="falling back"):
        l1 = rll_kernels.weighted_contrastive_loss(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        l2 = rll_kernels.weighted_contrastive_loss(x, y)
    assert_close_fp64(l1, reference.weighted_contrastive_loss(x, y), "fallback loss")
    assert l1.item() == l2.item()
    with pytest.raises(ValueError, match="backend"):
        rll_kernels.weighted_contrastive_loss(x, y, backend="cuda")


@pytest.mark.slow
def test_torch_compile_fullgraph_cpp():
    x = torch.randn(40, 9, requires_grad=True)
    y = torch.randint(0, 4, (40,))
    a = rand_att(40, torch.float32)
    f = torch.compile(
        lambda x, y, a: rll_kernels.weighted_contrastive_loss(x, y, a, backend="cpp"), fullgraph=True
    )
    (g_c,) = torch.autograd.grad(f(x, y, a), x)
    l_e, g_e = run(CPP, x, y, a)
    l_64, g_64 = run("ref", x.double(), y, a.double())
    assert_close_derived(f(x, y, a).detach(), l_e, l_64, "loss")
    assert_close_derived(g_c, g_e, g_64, "grad")
