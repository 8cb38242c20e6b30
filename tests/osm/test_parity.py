"""OSM + CAA weighted contrastive loss: every fused backend against the dense reference
(docs/semantics.md §4), backend x dtype x shape: float64 to 1e-10, float32 within the derived
tolerance, bf16/fp16 computed in float32 (§1.2); dense and sparse weight tiles, several tiles,
attention, every hyper-parameter. The backends come from the registry (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from osm_cases import check_fp32, check_fp64, rand_att, run
from tolerance import assert_close_derived, assert_close_fp64

import rll_kernels

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
    (200, 260, 6, 1.2),  # D >= 256: diagonal tiles' Gram in row panels (csrc/cpu_tiles.h, gram_tile_upper)
]


@pytest.mark.parametrize("n,d,c,alpha", CASES)
@pytest.mark.parametrize("with_att", [False, True])
def test_fp64_matches_reference(backend, device, skip_if_interpreted_above, n, d, c, alpha, with_att):
    skip_if_interpreted_above(n, n, d)
    x = torch.randn(n, d, dtype=torch.float64).to(device)
    y = torch.randint(0, c, (n,)).to(device)
    att = rand_att(n, torch.float64, device=device) if with_att else None
    # D = 1: normalised embeddings are +-1 and their gradient is identically 0, so test unnormalised
    check_fp64(backend, x, y, att, alpha=alpha, sigma=0.6, normalize=d > 1)


@pytest.mark.parametrize("n,d,c,alpha", CASES)
def test_fp32_derived_tolerance(backend, device, skip_if_interpreted_above, n, d, c, alpha):
    skip_if_interpreted_above(n, n, d)
    x = torch.randn(n, d, dtype=torch.float64).to(device)
    y = torch.randint(0, c, (n,)).to(device)
    check_fp32(backend, x, y, rand_att(n, torch.float64, device=device), alpha=alpha, normalize=d > 1)


def test_hyper_parameters_and_no_normalize(backend, device):
    x = 0.4 * torch.randn(41, 9, dtype=torch.float64, device=device)
    y = torch.randint(0, 5, (41,), device=device)
    for alpha, sigma, lam, norm in [(0.9, 0.3, 0.0, False), (1.5, 2.0, 1.0, True), (1.1, 0.8, 0.7, False)]:
        check_fp64(
            backend,
            x,
            y,
            rand_att(41, torch.float64, device=device),
            alpha=alpha,
            sigma=sigma,
            imbalance=lam,
            normalize=norm,
        )


@pytest.mark.parametrize("n,d,c", [(2, 3, 1), (37, 11, 5), (50, 40, 3)])
def test_fp64_matches_reference_small_batches(backend, device, n, d, c):
    x = torch.randn(n, d, dtype=torch.float64).to(device)
    y = torch.randint(0, c, (n,)).to(device)
    check_fp64(backend, x, y, None)
    check_fp64(backend, x, y, rand_att(n, torch.float64, device=device), alpha=1.6, sigma=0.5)


def test_fp32_derived_tolerance_n45(backend, device):
    x = torch.randn(45, 19, dtype=torch.float64, device=device)
    y = torch.randint(0, 4, (45,), device=device)
    check_fp32(backend, x, y, rand_att(45, torch.float64, device=device))


def test_grad_output_scales_the_gradient(backend, device):
    x = torch.randn(20, 6, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randint(0, 3, (20,), device=device)
    (g1,) = torch.autograd.grad(rll_kernels.weighted_contrastive_loss(x, y, backend=backend), x)
    (g3,) = torch.autograd.grad(-3.0 * rll_kernels.weighted_contrastive_loss(x, y, backend=backend), x)
    assert_close_fp64(g3, -3.0 * g1, "grad")
    assert g1.abs().max() > 0


# ------------------------------------------------------------------ attention
@pytest.mark.backends("reference", "cpp", "triton")
def test_attention_all_ones_equals_none_and_random_differs(backend, device):
    x = torch.randn(33, 8, dtype=torch.float64, device=device)
    y = torch.randint(0, 4, (33,), device=device)
    l_none, g_none = run(backend, x, y, None)
    l_ones, g_ones = run(backend, x, y, torch.ones(33, dtype=torch.float64, device=device))
    assert_close_fp64(l_ones, l_none, "loss")
    assert_close_fp64(g_ones, g_none, "grad")
    a = rand_att(33, torch.float64, device=device)
    l_a, g_a = check_fp64(backend, x, y, a) if backend != "reference" else run(backend, x, y, a)
    assert abs(l_a.item() - l_none.item()) > 1e-6 and (g_a - g_none).abs().max() > 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_are_computed_in_fp32(backend, device, dtype):
    x = torch.randn(37, 12).to(dtype).to(device)
    y = torch.randint(0, 4, (37,), device=device)
    a = rand_att(37, torch.float32, device=device)
    l_k, g_k = run(backend, x, y, a)
    assert l_k.dtype == torch.float32 and g_k.dtype == dtype and torch.isfinite(g_k.float()).all()
    # the same upcast inputs: the fp32 kernel against the fp32 / fp64 references of those inputs
    l_32, _ = run("reference", x.float(), y, a)
    l_64, _ = run("reference", x.double(), y, a.double())
    assert_close_derived(l_k, l_32, l_64, "loss")
