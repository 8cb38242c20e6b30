"""OSM + CAA weighted contrastive loss (Wang et al., AAAI 2019): fused backends and module.

Fused forward computes the loss and dL/dz together in one pass over the pair tiles (the weights
are constants, so the gradient needs nothing else); backward only scales it by grad_output.
Backends: ``"cpp"`` (CPU kernel ``rll_kernels::osm_fwd``), ``"triton"`` (``osm_triton_fwd``; GPU,
or CPU tensors under ``TRITON_INTERPRET=1``) and ``"reference"`` (dense, O(N^2) memory).
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _ops
from ._dispatch import warn_once
from ._reference_osm import weighted_contrastive_loss as _reference_loss
from ._validate import check_choice, check_embeddings, check_labels
from ._validate_osm import check_attention, check_osm_params

__all__ = ["WeightedContrastiveFused", "weighted_contrastive_loss", "class_aware_attention", "OSM_BACKENDS"]

OSM_BACKENDS = ("auto", "cpp", "triton", "reference")


def class_aware_attention(
    logits: torch.Tensor, labels: torch.Tensor, *, gaussian_sigma: Optional[float] = None
) -> torch.Tensor:
    r"""Class-aware attention (CAA): :math:`a_i = \mathrm{softmax}(\text{logits}_i)_{y_i}`.

    ``logits`` (N, C) come from a classifier, ``labels`` (N,) are the true classes. The result is
    detached (the loss never differentiates the attention) and clamped below at the smallest
    normal number of its dtype, so it always lies in (0, 1]. Computed in float32 (float64 stays
    float64).

    ``gaussian_sigma``: the official Caffe configuration maps p through a Gaussian kernel centred
    at 1, :math:`a_i = \exp(-(1 - p_i)^2 / (2\sigma^2))` with :math:`\sigma = 0.68`, which keeps
    outliers at >= 0.34 instead of ~0 (SPEC_RESEARCH section 3.2); None (default) gives the
    poster's plain probability.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D (N, C) tensor, got {got}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    n, c = logits.shape
    labels = check_labels(labels, n, "labels", logits.device)
    if n and not torch.compiler.is_compiling() and bool(((labels < 0) | (labels >= c)).any()):
        raise ValueError(
            f"labels must be class indices in [0, {c}) for logits with {c} columns, "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    if gaussian_sigma is not None and not (isinstance(gaussian_sigma, (int, float)) and gaussian_sigma > 0):
        raise ValueError(f"gaussian_sigma must be None or a number > 0, got {gaussian_sigma!r}")
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.detach().to(dt), dim=1)
    p = logp.gather(1, labels.view(-1, 1)).squeeze(1).exp()
    if gaussian_sigma is not None:
        p = torch.exp(-((1.0 - p) ** 2) / (2.0 * float(gaussian_sigma) ** 2))
    return p.clamp(min=torch.finfo(dt).tiny, max=1.0)


# ---------------------------------------------------------------- backends
def _triton_status(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    from .triton import interpret_mode

    if device.type == "cpu" and interpret_mode():
        return None
    return f"Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"


# Probed once per device type (the dispatcher query cannot be traced by torch.compile).
_AVAILABLE: dict[str, dict[str, Optional[str]]] = {}


def osm_available_backends(device: torch.device | str = "cpu") -> dict[str, Optional[str]]:
    """Map OSM backend name -> None if usable on ``device``, else the reason it is not."""
    dev = torch.device(device)
    if dev.type not in _AVAILABLE:
        if dev.type != "cpu":
            cpp = "the cpp backend runs on CPU tensors only"
        elif not _ops.has_kernel("osm_fwd", "cpu"):
            cpp = f"C++ extension not built or without osm_fwd ({_ops.C_IMPORT_ERROR})"
        else:
            cpp = None
        _AVAILABLE[dev.type] = {"reference": None, "cpp": cpp, "triton": _triton_status(dev)}
    return dict(_AVAILABLE[dev.type])


def _resolve(backend: str, device: torch.device) -> str:
    check_choice(backend, "backend", OSM_BACKENDS)
    avail = osm_available_backends(device)
    if backend != "auto":
        why = avail[backend]
        if why is not None:
            raise RuntimeError(f"rll_kernels: backend {backend!r} is not available on {device}: {why}")
        return backend
    name = "cpp" if device.type == "cpu" else "triton"
    if avail[name] is None:
        return name
    warn_once(
        f"osm-fallback-{device.type}",
        f"rll_kernels: no fused OSM backend for {device.type} tensors ({name}: {avail[name]}); "
        "falling back to the dense O(N^2) reference",
    )
    return "reference"


def _fused_op(name: str):
    if name == "triton":
        from .triton import osm as _tosm  # noqa: F401  (registers the Triton custom op)

        return torch.ops.rll_kernels.osm_triton_fwd
    return torch.ops.rll_kernels.osm_fwd


# ---------------------------------------------------------------- functional API
def weighted_contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    attention: Optional[torch.Tensor] = None,
    alpha: float = 1.2,
    sigma: float = 0.8,
    imbalance: float = 0.5,
    *,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    r"""OSM + CAA weighted contrastive loss, fused (SPEC section 3). O(N D) memory.

    Over all unordered pairs :math:`i < j`, with :math:`d_{ij} = \|z_i - z_j\|`,
    :math:`h = [\alpha - d]_+`, :math:`a_{ij} = \min(a_i, a_j)`:

    .. math::
        w^+ = e^{-d^2/(2\sigma^2)} a_{ij},\quad w^- = h\,a_{ij},\quad
        L = (1-\lambda)\,\tfrac12 \frac{\sum_{pos} w^+ d^2}{\sum_{pos} w^+}
            + \lambda\,\tfrac12 \frac{\sum_{neg} w^- h^2}{\sum_{neg} w^-}

    Weights are constants, both ends of a pair get gradient, the normalisers are global, and an
    empty set gives 0. See :func:`rll_kernels.reference.weighted_contrastive_loss`.

    Args:
        embeddings: (N, D) float tensor. labels: (N,) integer labels.
        attention: optional (N,) values in (0, 1] (e.g. :func:`class_aware_attention`); never
            differentiated. None means all ones.
        alpha: negative margin. sigma: OSM bandwidth (code convention exp(-d^2/(2 sigma^2))).
        imbalance: lambda. normalize: L2-normalise the embeddings first (official code).
        backend: ``"auto"`` (cpp on CPU, triton on CUDA), ``"cpp"``, ``"triton"``, ``"reference"``.
    """
    check_osm_params(alpha, sigma, imbalance)
    check_embeddings(embeddings, "embeddings")
    labels = check_labels(labels, embeddings.shape[0], "labels", embeddings.device)
    dt = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    att = check_attention(attention, embeddings.shape[0], dt, embeddings.device)
    name = _resolve(backend, embeddings.device)
    if name == "reference":
        return _reference_loss(embeddings, labels, att, alpha, sigma, imbalance, normalize=normalize)
    z = embeddings.to(dt)
    z = F.normalize(z, dim=1) if normalize else z
    need_grad = torch.is_grad_enabled() and z.requires_grad
    loss, _, _ = _fused_op(name)(
        z.contiguous(), labels, att, float(alpha), float(sigma), float(imbalance), need_grad
    )
    return loss


class WeightedContrastiveFused(nn.Module):
    r"""OSM + CAA weighted contrastive loss with fused kernels (Wang et al., AAAI 2019).

    .. math::
        L = (1-\lambda)\,\tfrac12 \frac{\sum_{pos} w^+ d^2}{\sum_{pos} w^+}
            + \lambda\,\tfrac12 \frac{\sum_{neg} w^- [\alpha - d]_+^2}{\sum_{neg} w^-}

    with :math:`w^+ = e^{-d^2/(2\sigma^2)} \min(a_i, a_j)`, :math:`w^- = [\alpha - d]_+ \min(a_i, a_j)`
    over the unordered pairs of the batch (SPEC section 3).

    Example::

        loss_fn = WeightedContrastiveFused(alpha=1.2, sigma=0.8, imbalance=0.5)
        att = class_aware_attention(classifier_logits, labels)   # optional, in (0, 1]
        loss = loss_fn(embeddings, labels, att)
    """

    def __init__(
        self,
        alpha: float = 1.2,
        sigma: float = 0.8,
        imbalance: float = 0.5,
        *,
        normalize: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_osm_params(alpha, sigma, imbalance)
        check_choice(backend, "backend", OSM_BACKENDS)
        self.alpha, self.sigma, self.imbalance = float(alpha), float(sigma), float(imbalance)
        self.normalize, self.backend = normalize, backend

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, attention: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return weighted_contrastive_loss(
            embeddings,
            labels,
            attention,
            self.alpha,
            self.sigma,
            self.imbalance,
            normalize=self.normalize,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, sigma={self.sigma}, imbalance={self.imbalance}, "
            f"normalize={self.normalize}, backend={self.backend!r}"
        )


# ---------------------------------------------------------------- fake kernels and autograd
def osm_fake(z, labels, attention, alpha, sigma, imbalance, need_grad):
    """Shapes of (loss, dL/dz, sums) for both fused ops."""
    torch._check(z.dim() == 2, lambda: "osm: z must be 2-D")
    grad = torch.empty_like(z) if need_grad else z.new_empty(0)
    return z.new_empty(()), grad, z.new_empty(4, dtype=torch.float64)


def osm_setup_context(ctx, inputs, output):
    _, grad, _ = output
    # the gradient was computed in the forward pass (weights are constants)
    ctx.has_grad = bool(inputs[-1])
    ctx.save_for_backward(grad)


def osm_backward(ctx, g_loss, _g_grad, _g_sums):
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    if not ctx.has_grad:
        raise RuntimeError("osm: the forward ran with need_grad=False; no gradient was computed")
    (grad,) = ctx.saved_tensors
    return (grad * g_loss,) + (None,) * 6


if _ops.HAS_C and hasattr(torch.ops.rll_kernels, "osm_fwd"):
    torch.library.register_fake("rll_kernels::osm_fwd")(osm_fake)
    torch.library.register_autograd("rll_kernels::osm_fwd", osm_backward, setup_context=osm_setup_context)


osm_available_backends("cpu")
