"""OSM: the dense reference against plain-Python pair loops (docs/semantics.md §4.1), its gradient
against the constant-weight formula (§4.3), and the pair attention min(a_i, a_j) by hand (§4.2)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from osm_cases import rand_att, run
from tolerance import assert_close_fp64

from rll_kernels import reference


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


@pytest.mark.backends("reference", "cpp", "triton")
def test_attention_uses_the_pair_minimum(backend, device):
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
    z, y, a = z.to(device), y.to(device), a.to(device)
    loss, _ = run(backend, z, y, a, alpha=3.0, sigma=1.0, imbalance=0.3, normalize=False)
    assert loss.item() == pytest.approx(0.7 * lp + 0.3 * ln, rel=1e-12)
