"""Input builders shared by the SoftTriple test files."""

from __future__ import annotations

import torch


def problem(n, c, k, d, dtype=torch.float64, all_classes=False, device="cpu"):
    """Embeddings (n, d), labels in [0, c) (every class present when ``all_classes`` and n >= c),
    raw centers (d, c * k)."""
    e = torch.randn(n, d, dtype=dtype)
    y = torch.randint(0, c, (n,))
    if all_classes and n >= c:
        y[:c] = torch.arange(c)
    w = torch.randn(d, c * k, dtype=dtype)
    return e.to(device), y.to(device), w.to(device)


def loss_and_grads(fn, e, y, w, *args, **kw):
    """(loss, d loss / d e, d loss / d w) of ``fn(e, y, w, *args, **kw)`` on fresh leaf copies."""
    e = e.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(e, y, w, *args, **kw)
    ge, gw = torch.autograd.grad(loss, (e, w))
    return loss.detach(), ge, gw
