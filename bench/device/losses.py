"""The losses the device check runs, each through the public API: fused backend, dense reference, PML.

A loss is called as ``fn(leaves, labels, **kw)`` and returns the scalar loss; ``leaves`` are the
tensors that get gradients (the embeddings, and SoftTriple's centers). The dry run swaps the
"cuda" backend of the Ranked List Loss for the CUDA kernels run on the CPU (bench/device/emulated.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from collections.abc import Callable

import torch

import rll_kernels
from rll_kernels import reference

RLL = dict(margin=0.4, Tn=10.0)  # PML's RankedListLoss defaults, except Tn (PML: 10 as well)
SOFTTRIPLE = dict(centers_per_class=10, la=20.0, gamma=0.1, margin=0.01)
SOFTTRIPLE_CLASSES = 100  # C: the reference materialises N x C*K, so C stays at a CUB/Cars-like 100
OSM = dict(alpha=1.2, sigma=0.8, imbalance=0.5)


@dataclasses.dataclass(frozen=True)
class Loss:
    name: str
    backends: tuple[str, ...]  # the fused backends that implement it on a GPU
    fused: Callable  # (backend, leaves, labels, **kw) -> loss
    reference: Callable  # (leaves, labels, **kw) -> loss
    pml: Callable | None  # (leaves, labels) -> the PML loss object's callable, or None
    takes_normalize: bool  # accepts normalize=False (half inputs are then handed over as they are)


def _rll(semantics: str) -> Loss:
    def fused(backend, leaves, y, **kw):
        return rll_kernels.ranked_list_loss(
            leaves[0], y, semantics=semantics, backend=backend, **{**RLL, **kw}
        )

    def ref(leaves, y, **kw):
        return reference.ranked_list_loss(leaves[0], y, semantics=semantics, **{**RLL, **kw})

    return Loss(f"rll-{semantics}", ("triton", "cuda"), fused, ref, _pml_rll, True)


def _pml_rll(leaves, y, Tn: float = RLL["Tn"]):
    from pytorch_metric_learning.losses import RankedListLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PML warns when Tn > 5
        fn = RankedListLoss(margin=RLL["margin"], Tn=Tn)
    return lambda leaves, y: fn(leaves[0], y)


def _softtriple() -> Loss:
    def fused(backend, leaves, y, **kw):
        x, w = leaves
        return rll_kernels.soft_triple_loss(x, y, w, **SOFTTRIPLE, tau=0.2, backend=backend, **kw)

    def ref(leaves, y, **kw):
        x, w = leaves
        return reference.soft_triple_loss(x, y, w, **SOFTTRIPLE, tau=0.2, **kw)

    def pml(leaves, y):
        from pytorch_metric_learning.losses import SoftTripleLoss

        x, w = leaves
        k = SOFTTRIPLE["centers_per_class"]
        fn = SoftTripleLoss(
            w.shape[1] // k, x.shape[1], k, SOFTTRIPLE["la"], SOFTTRIPLE["gamma"], SOFTTRIPLE["margin"]
        )
        fn.fc = torch.nn.Parameter(w.detach().clone())  # the same centers (PML: no regulariser)
        return lambda leaves, y: fn(leaves[0], y)

    return Loss("softtriple", ("triton",), fused, ref, pml, False)


def _osm() -> Loss:
    def fused(backend, leaves, y, **kw):
        return rll_kernels.weighted_contrastive_loss(leaves[0], y, None, **OSM, backend=backend, **kw)

    def ref(leaves, y, **kw):
        return reference.weighted_contrastive_loss(leaves[0], y, None, **OSM, **kw)

    return Loss("osm", ("triton",), fused, ref, None, True)


LOSSES = {loss.name: loss for loss in (_rll("paper"), _rll("pml"), _softtriple(), _osm())}


def fused_fn(loss: Loss, backend: str, dry: bool) -> Callable:
    """``(leaves, labels, **kw) -> loss`` of a fused backend; the CUDA emulation in a dry run."""
    if dry and backend == "cuda":
        from bench.device import emulated

        semantics = loss.name.split("-")[1]
        return lambda leaves, y, **kw: emulated.ranked_list_loss(leaves[0], y, semantics, **{**RLL, **kw})
    return lambda leaves, y, **kw: loss.fused(backend, leaves, y, **kw)


def has_pml() -> bool:
    return importlib.util.find_spec("pytorch_metric_learning") is not None


def not_available(err: Exception) -> bool:
    """True when ``err`` says that a backend is not usable here (as opposed to a failure of it)."""
    return isinstance(err, RuntimeError) and "not available" in str(err)


@dataclasses.dataclass
class Problem:
    """float64 master inputs of one case; ``leaves(dtype)`` rounds them once to ``dtype``."""

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor | None

    def leaves(self, dtype: torch.dtype, normalized: bool = False) -> list[torch.Tensor]:
        x = torch.nn.functional.normalize(self.x, dim=1) if normalized else self.x
        out = [x.to(dtype)]
        if self.w is not None:
            out.append(self.w.to(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype))
        return [t.detach().clone().requires_grad_() for t in out]


def problem(loss: Loss, n: int, d: int, dev: str, seed: int = 0) -> Problem:
    """Random embeddings, about 4 samples per class (P x K batches); SoftTriple's centers (D, C*K)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(n, d, device=dev, dtype=torch.float64, generator=g)
    if loss.name == "softtriple":
        c = min(SOFTTRIPLE_CLASSES, max(2, n // 4))
        y = torch.randint(0, c, (n,), device=dev, generator=g)
        w = torch.randn(d, c * SOFTTRIPLE["centers_per_class"], device=dev, dtype=torch.float64, generator=g)
        return Problem(x, y, w)
    y = torch.randint(0, max(1, n // 4), (n,), device=dev, generator=g)
    return Problem(x, y, None)
