"""Benchmark providers: the fused backends and the baselines a user would otherwise run.

Every provider turns a :class:`~bench.cases.Case` and its inputs into a zero-argument callable that
returns the scalar loss (mean over queries); the callers time it under ``torch.no_grad()``
(forward), or call ``.backward()`` on its result (backward, full).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from collections.abc import Callable
from typing import Optional

import torch

from bench.cases import Case

MARGIN, TN = 0.4, 10.0  # the hyper-parameters of every provider (PML's names and defaults)
ALPHA = 1.0 + MARGIN / 2.0

LossFn = Callable[[], torch.Tensor]


@dataclasses.dataclass
class Inputs:
    """The tensors of one case: queries (leaf, requires grad), labels, optional bank (no grad)."""

    emb: torch.Tensor
    labels: torch.Tensor
    ref_emb: Optional[torch.Tensor] = None
    ref_labels: Optional[torch.Tensor] = None


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """Random embeddings with about 4 samples per class (labels ``arange(N) // 4`` shuffled).

    With a bank, the bank holds ``M / 4`` classes of 4 rows and the queries are 4 rows each of
    ``N / 4`` of those classes, so every query has positives in the bank.
    """
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    emb = torch.randn(case.N, case.D, generator=g, dtype=dtype).to(device).requires_grad_(True)
    if case.in_batch:
        labels = (torch.arange(case.N) // 4)[torch.randperm(case.N, generator=g)]
        return Inputs(emb, labels.to(device))
    n_bank_classes = max(1, case.M // 4)
    ref_labels = (torch.arange(case.M) // 4)[torch.randperm(case.M, generator=g)]
    classes = torch.randperm(n_bank_classes, generator=g)[: max(1, case.N // 4)]
    labels = classes.repeat_interleave(4)[: case.N]
    if labels.numel() < case.N:
        labels = torch.cat([labels, classes[: case.N - labels.numel()]])
    labels = labels[torch.randperm(case.N, generator=g)]
    ref_emb = torch.randn(case.M, case.D, generator=g, dtype=dtype).to(device)
    return Inputs(emb, labels.to(device), ref_emb, ref_labels.to(device))


class Unsupported(Exception):
    """The provider cannot run this case; the message goes into the table."""


@dataclasses.dataclass
class Provider:
    """A named way to compute the loss.

    ``family`` groups providers for the memory model (``fused``, ``reference``, ``compile``,
    ``pml``, ``keops``). ``semantics_free`` providers compute the same thing for both semantics
    (PML), so one measurement serves both rows.
    """

    name: str
    family: str
    build: Callable[[Case, Inputs], LossFn]
    status: Optional[str] = None  # None if usable on this machine, else why not
    semantics_free: bool = False
    note: Callable[[Case], str] = lambda case: ""

    @property
    def fused(self) -> bool:
        return self.family == "fused"


# ----------------------------------------------------------------------------------- fused
def _fused(backend: str) -> Callable[[Case, Inputs], LossFn]:
    def build(case: Case, x: Inputs) -> LossFn:
        import rll_kernels

        def fn() -> torch.Tensor:
            return rll_kernels.ranked_list_loss(
                x.emb,
                x.labels,
                MARGIN,
                TN,
                semantics=case.semantics,
                ref_emb=x.ref_emb,
                ref_labels=x.ref_labels,
                backend=backend,
            )

        return fn

    return build


def fused_backends(device: torch.device) -> list[str]:
    """Usable fused backends on ``device``, best first (the first is the one ratios refer to).

    Triton on CPU is the interpreter (a correctness tool), so it is never benchmarked there.
    """
    import rll_kernels

    avail = rll_kernels.available_backends(device, "rll")
    order = ("cuda", "triton", "cpp")
    names = [b for b in order if avail.get(b, "absent") is None]
    if device.type == "cpu":
        names = [b for b in names if b != "triton"]
    return names


# ------------------------------------------------------------------------------- baselines
def _reference(case: Case, x: Inputs) -> LossFn:
    from rll_kernels import reference

    def fn() -> torch.Tensor:
        return reference.ranked_list_loss(
            x.emb, x.labels, MARGIN, TN, semantics=case.semantics, ref_emb=x.ref_emb, ref_labels=x.ref_labels
        )

    return fn


def _compiled(case: Case, x: Inputs) -> LossFn:
    from rll_kernels import reference

    compiled = torch.compile(reference.ranked_list_loss, dynamic=False)

    def fn() -> torch.Tensor:
        return compiled(
            x.emb, x.labels, MARGIN, TN, semantics=case.semantics, ref_emb=x.ref_emb, ref_labels=x.ref_labels
        )

    return fn


def _pml(case: Case, x: Inputs) -> LossFn:
    if not case.in_batch:
        raise Unsupported("unsupported (PML rejects ref_emb)")
    from pytorch_metric_learning.losses import RankedListLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PML warns that Tn > 5
        loss_fn = RankedListLoss(margin=MARGIN, Tn=TN)

    def fn() -> torch.Tensor:
        return loss_fn(x.emb, x.labels)

    return fn


def _keops(case: Case, x: Inputs) -> LossFn:
    """RLL with KeOps LazyTensors: one symbolic N x M sum reduction, never materialised.

    Per query i, the reduction sums four values over j: w (alpha - d), w, p (d - beta), p, with
    w = [negative, d < alpha] exp(Tn (alpha - d) - Tn alpha) (max-subtracted by the upper bound
    Tn alpha, as d >= 0) and p = [positive, d > beta] (Tp = 0). Then L_N = sum w (alpha - d) / sum w
    and L_P = sum p (d - beta) / sum p. "paper" takes the weights and the gallery from detached
    copies (stop-gradient); "pml" differentiates everything and adds PML's M * 1e-5 to the
    denominators. d = sqrt(|q - k|^2 + 1e-12) keeps the gradient finite on the diagonal.
    """
    import torch.nn.functional as F
    from pykeops.torch import LazyTensor

    beta = ALPHA - MARGIN
    pml = case.semantics == "pml"

    def dist(a, b):
        return (((a - b) ** 2).sum(-1) + 1e-12).sqrt()

    def fn() -> torch.Tensor:
        zq = F.normalize(x.emb, dim=1)
        zk = zq if x.ref_emb is None else F.normalize(x.ref_emb, dim=1)
        if not pml:
            zk = zk.detach()
        lq = x.labels.to(zq.dtype)
        lk = lq if x.ref_labels is None else x.ref_labels.to(zq.dtype)
        qi, kj = LazyTensor(zq[:, None, :]), LazyTensor(zk[None, :, :])
        li, lj = LazyTensor(lq[:, None, None]), LazyTensor(lk[None, :, None])
        d = dist(qi, kj)
        dw = d if pml else dist(LazyTensor(zq.detach()[:, None, :]), kj)  # weights: constants
        same = 1.0 - (li - lj).abs().sign()
        w = (1.0 - same) * (ALPHA - dw).step() * (-TN * dw).exp()
        p = same * (dw - beta).step()
        s = (w * (ALPHA - d)).concat(w).concat(p * (d - beta)).concat(p).sum(dim=1)  # (N, 4)
        num_n, den_n, num_p, den_p = s.unbind(1)
        if pml:
            bias = zk.shape[0] * 1e-5
            den_n = den_n + bias * torch.exp(torch.tensor(-TN * ALPHA, dtype=zq.dtype))
            den_p = den_p + bias
        ln = torch.where(den_n > 0, num_n / den_n.clamp_min(1e-30), torch.zeros_like(num_n))
        lp = torch.where(den_p > 0, num_p / den_p.clamp_min(1e-30), torch.zeros_like(num_p))
        return (0.5 * lp + 0.5 * ln).mean()

    return fn


def keops_status() -> Optional[str]:
    """None if pykeops imports, else why not (shown in the table)."""
    if importlib.util.find_spec("pykeops") is None:
        return "pykeops not installed"
    try:
        with open(os.devnull, "w"):
            import pykeops  # noqa: F401
    except Exception as e:
        return f"pykeops import failed: {type(e).__name__}: {e}"[:120]
    return None


def all_providers(device: torch.device, with_keops: bool = True, probe: bool = True) -> list[Provider]:
    """Every provider, fused first; unusable ones carry their reason in ``status``.

    ``probe=False`` skips importing optional packages (children: the parent already probed).
    """
    fused = [Provider(b, "fused", _fused(b)) for b in fused_backends(device)]

    def pml_note(case):
        return "PML's own semantics (pml)" if case.semantics == "paper" else ""

    base = [
        Provider("reference", "reference", _reference),
        Provider("compile", "compile", _compiled),
        Provider("pml", "pml", _pml, semantics_free=True, note=pml_note),
    ]
    if with_keops:
        base.append(Provider("keops", "keops", _keops, status=keops_status() if probe else None))
    return fused + base
