"""Input builders shared by the RLL test files."""

from __future__ import annotations

import torch


def make_batch(
    n: int, d: int, dtype=torch.float64, classes: int | None = None, m: int | None = None, device="cpu"
):
    """Random embeddings and labels (~4 per class); with ``m`` also a gallery of m rows."""
    classes = classes or max(1, (n + 3) // 4)
    emb = torch.randn(n, d, dtype=dtype).to(device)
    labels = torch.randint(0, classes, (n,)).to(device)
    if m is None:
        return emb, labels, None, None
    ref = torch.randn(m, d, dtype=dtype).to(device)
    ref_labels = torch.randint(0, classes, (m,)).to(device)
    return emb, labels, ref, ref_labels


def run_loss(fn, emb, labels, ref, ref_labels, grad_out=None, **kw):
    """Loss and gradients (embeddings, ref_emb) of ``fn`` on fresh leaf copies."""
    e = emb.detach().clone().requires_grad_()
    r = ref.detach().clone().requires_grad_() if ref is not None else None
    extra = {} if ref is None else {"ref_emb": r, "ref_labels": ref_labels}
    loss = fn(e, labels, **extra, **kw)
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    loss.backward(g)
    gr = r.grad if r is not None else None
    return loss.detach(), e.grad, gr


def grad_or_zeros(g, like):
    """``g``, or zeros shaped as ``like`` where no gradient reached it (``None``)."""
    return torch.zeros_like(like) if g is None else g
