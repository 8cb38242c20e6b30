"""Helpers shared by the OSM test files: one backend's loss and gradient, random attention, and the
float64 / float32 comparisons with the dense reference."""

from __future__ import annotations

import torch
from devices import DEVICE_OF
from tolerance import assert_close_derived, assert_close_fp64

import rll_kernels
from rll_kernels import reference


def run(backend, x, y, att=None, **kw):
    """(loss, dL/dx) of one backend ("reference" for the dense oracle) on a fresh leaf copy of x, on
    the backend's device; the results are returned on the CPU, to be compared across backends."""
    dev = DEVICE_OF[backend]
    y, att = y.to(dev), None if att is None else att.to(dev)
    x = x.detach().to(dev).clone().requires_grad_(True)
    with torch.enable_grad():  # also inside an autograd.Function's backward
        if backend == "reference":
            loss = reference.weighted_contrastive_loss(x, y, att, **kw)
        else:
            loss = rll_kernels.weighted_contrastive_loss(x, y, att, backend=backend, **kw)
        (g,) = torch.autograd.grad(loss, x)
    return loss.detach().cpu(), g.cpu()


def rand_att(n, dtype, lo=0.05, device="cpu"):
    return torch.rand(n, dtype=dtype).clamp_min(lo).to(device)


def check_fp64(backend, x, y, att=None, **kw):
    l_f, g_f = run(backend, x, y, att, **kw)
    l_r, g_r = run("reference", x, y, att, **kw)
    assert torch.isfinite(l_f) and torch.isfinite(g_f).all()
    assert_close_fp64(l_f, l_r, "loss")
    assert_close_fp64(g_f, g_r, "grad")
    return l_f, g_f


def check_fp32(backend, x64, y, att64=None, **kw):
    att32 = None if att64 is None else att64.float()
    l_k, g_k = run(backend, x64.float(), y, att32, **kw)
    l_32, g_32 = run("reference", x64.float(), y, att32, **kw)
    l_64, g_64 = run("reference", x64, y, att64, **kw)
    assert l_k.dtype == torch.float32 and g_k.dtype == torch.float32
    assert_close_derived(l_k, l_32, l_64, "loss")
    assert_close_derived(g_k, g_32, g_64, "grad")
