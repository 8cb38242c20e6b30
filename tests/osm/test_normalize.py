"""OSM's normalisation inside the op (docs/semantics.md §1.4, §4.4) on every fused backend: rows of
norm 1e30 and 1e-30 give the loss and gradient of the unit rows (fp32 and fp64); strided embeddings
give the contiguous result; a zero row stays 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from devices import DEVICE_OF
from osm_cases import rand_att, run
from tolerance import assert_close_derived, assert_close_fp64

import rll_kernels


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_norms_give_the_unit_rows_result(backend, scale, dtype):
    n = 23
    u = F.normalize(torch.randn(n, 7, dtype=torch.float64), dim=1)
    y = torch.randint(0, 3, (n,))
    a = rand_att(n, torch.float64)
    s = torch.where(torch.arange(n) % 2 == 0, scale, 1.0).double()  # scaled and unit rows in one tile
    l_f, g_f = run(backend, (u * s[:, None]).to(dtype), y, a.to(dtype))
    g_f = g_f.double() * s[:, None]  # d/de at e = s u is the unit rows' gradient divided by s
    l_64, g_64 = run("reference", u, y, a)
    if dtype == torch.float64:
        assert_close_fp64(l_f, l_64, "loss")
        assert_close_fp64(g_f, g_64, "grad")
        return
    l_32, g_32 = run("reference", u.float(), y, a.float())
    assert_close_derived(l_f, l_32, l_64, "loss")
    assert_close_derived(g_f, g_32, g_64, "grad")


@pytest.mark.parametrize("layout", ["column_major", "every_other_column", "every_other_row"])
@pytest.mark.parametrize("normalize", [True, False])
def test_strided_inputs_give_the_contiguous_result(backend, layout, normalize):
    x = torch.randn(19, 10, dtype=torch.float64)
    y = torch.randint(0, 3, (19,))
    xs = {
        "column_major": x.t().contiguous().t(),
        "every_other_column": torch.stack([x, torch.zeros_like(x)], 2).flatten(1)[:, ::2],
        "every_other_row": torch.stack([x, torch.zeros_like(x)], 1).flatten(0, 1)[::2],
    }[layout]
    assert not xs.is_contiguous() and torch.equal(xs, x)
    dev = DEVICE_OF[backend]
    l_c, g_c = run(backend, x, y, normalize=normalize)
    xs = xs.to(dev).requires_grad_(True)  # (run's clone would make a non-dense layout contiguous)
    l_s = rll_kernels.weighted_contrastive_loss(xs, y.to(dev), normalize=normalize, backend=backend)
    (g_s,) = torch.autograd.grad(l_s, xs)
    l_s, g_s = l_s.detach().cpu(), g_s.cpu()
    assert_close_fp64(l_s, l_c, "loss")
    assert_close_fp64(g_s, g_c, "grad")


def test_zero_row_stays_zero(backend):
    # a zero row has z = 0 (distance 1 to every unit row) and a zero gradient, where F.normalize's
    # is g / 1e-12 (docs/semantics.md §1.4); every other row as the reference
    x = torch.randn(12, 5, dtype=torch.float64)
    x[4] = 0.0
    y = torch.randint(0, 3, (12,))
    l_f, g_f = run(backend, x, y)
    l_r, g_r = run("reference", x, y)
    assert_close_fp64(l_f, l_r, "loss")
    assert (g_f[4] == 0).all()
    keep = torch.arange(12) != 4
    assert_close_fp64(g_f[keep], g_r[keep], "grad")
