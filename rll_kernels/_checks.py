"""Every argument check and dtype rule of rll_kernels, in one place.

Errors are ``ValueError`` s whose message names the argument (docs/semantics.md §6). The dtype rule
of every loss and backend: compute in float32, or float64 when an operand is float64
(docs/semantics.md §1.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

__all__ = [
    "check_attention",
    "check_centers",
    "check_choice",
    "check_embeddings",
    "check_gallery",
    "check_label_range",
    "check_labels",
    "check_logits",
    "check_osm_params",
    "check_positive_int",
    "check_rll_params",
    "check_softtriple_params",
    "compute_dtype",
    "dup_rel_tol",
]

# docs/semantics.md §1.3: a pair with d^2 <= 64 eps (|q|^2 + |k|^2) is a duplicate (Gram-form rounding)
DUP_REL_FP32 = 64.0 * 1.1920929e-07
DUP_REL_FP64 = 64.0 * 2.220446049250313e-16


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any operand is float64, else float32 (fp16/bf16 are computed in fp32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def dup_rel_tol(dtype: torch.dtype) -> float:
    """Relative duplicate threshold for the accumulation type of ``dtype``."""
    return DUP_REL_FP64 if dtype == torch.float64 else DUP_REL_FP32


def _check_finite_number(v, name: str) -> None:
    # _finite_number, not math.isfinite: torch.compile(dynamic=True) passes Python floats as
    # SymFloats, which math.isfinite cannot trace
    if not _finite_number(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")


def check_choice(value: object, name: str, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive_int(v: object, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


# ---------------------------------------------------------------- tensors
def check_embeddings(x: object, name: str, *, allow_empty: bool = False, finite: bool = True) -> None:
    """A 2-D floating (N, D) tensor, N > 0 unless ``allow_empty``, D > 0; every entry finite when
    ``finite`` (a device sync: the fused RLL ops check their rows themselves, docs/semantics.md §6)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got {x.dim()}-D with shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (N = 0): a loss needs at least one row")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has embedding size D = 0")
    # a finite sum proves every entry finite without an N x D bool temporary (a sum that overflows
    # falls through to the exact check)
    if (
        finite
        and x.device.type != "meta"
        and not torch.compiler.is_compiling()
        and not bool(torch.isfinite(x.sum()))
        and not bool(torch.isfinite(x).all())
    ):
        raise ValueError(f"{name} contains NaN or Inf")


def check_labels(labels: object, n: int, name: str, device: torch.device) -> torch.Tensor:
    """Labels as a contiguous int64 vector on ``device``."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of shape ({n},), got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per embedding), got {labels.shape[0]}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.dtype == torch.int64 and labels.device == device and labels.is_contiguous():
        return labels  # the usual case, without the two no-op calls
    return labels.to(device=device, dtype=torch.int64).contiguous()


def check_gallery(
    embeddings: torch.Tensor,
    ref_emb: Optional[torch.Tensor],
    ref_labels: Optional[torch.Tensor],
    *,
    finite: bool = True,
) -> Optional[torch.Tensor]:
    """Check an optional (M, D) gallery against the queries; its labels as int64, or None in-batch."""
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError(
            "ref_emb and ref_labels must be given together "
            f"(got ref_emb={'set' if ref_emb is not None else None}, "
            f"ref_labels={'set' if ref_labels is not None else None})"
        )
    if ref_emb is None:
        return None
    if not isinstance(ref_emb, torch.Tensor):
        raise ValueError(f"ref_emb must be a torch.Tensor, got {type(ref_emb).__name__}")
    if ref_emb.device != embeddings.device:
        raise ValueError(
            f"ref_emb must be on the embeddings' device {embeddings.device}, got {ref_emb.device}"
        )
    if ref_emb.dtype != embeddings.dtype:
        raise ValueError(f"ref_emb must have the embeddings' dtype {embeddings.dtype}, got {ref_emb.dtype}")
    check_embeddings(ref_emb, "ref_emb", finite=finite)
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(f"ref_emb must have embedding size {embeddings.shape[1]}, got {ref_emb.shape[1]}")
    return check_labels(ref_labels, ref_emb.shape[0], "ref_labels", embeddings.device)


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Labels in [0, num_classes) (skipped under torch.compile)."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got {bad}")


# ---------------------------------------------------------------- Ranked List Loss
def _finite_number(v) -> bool:
    """A finite int or float, also as the symbolic numbers of torch.compile (no math.isfinite:
    ``v - v == 0`` is false exactly for Inf and NaN and traces)."""
    numbers = (int, float, torch.SymInt, torch.SymFloat)
    return not isinstance(v, bool) and isinstance(v, numbers) and bool(v - v == 0)


def check_rll_params(margin: float, alpha: float, imbalance: float, Tn: float, Tp: float) -> None:
    """PML 2.9.0's domain (docs/semantics.md §2.2), in a form torch.compile traces (dynamic=True too).

    Any finite real number, ``imbalance`` in [0, 1]: ``margin`` may be 0 or negative and ``alpha``
    anything, so the positive boundary ``alpha - margin`` may be 0, negative or above ``alpha``.
    """
    for nm, v in (("margin", margin), ("alpha", alpha), ("imbalance", imbalance), ("Tn", Tn), ("Tp", Tp)):
        if not _finite_number(v):
            raise ValueError(f"{nm} must be a finite number, got {v!r}")
    if not 0.0 <= imbalance <= 1.0:
        raise ValueError(f"imbalance must lie in [0, 1], got {imbalance}")


# ---------------------------------------------------------------- SoftTriple
def check_softtriple_params(
    centers_per_class: int, la: float, gamma: float, margin: float, tau: float
) -> None:
    if isinstance(centers_per_class, bool) or not isinstance(centers_per_class, int) or centers_per_class < 1:
        raise ValueError(f"centers_per_class must be a positive int, got {centers_per_class!r}")
    for nm, v in (("la", la), ("gamma", gamma), ("margin", margin), ("tau", tau)):
        _check_finite_number(v, nm)
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")


def check_centers(centers: object, d: int, k: int, device: torch.device) -> int:
    """Check the (D, C*K) centers; returns the number of classes C."""
    if not isinstance(centers, torch.Tensor):
        raise ValueError(f"centers must be a torch.Tensor, got {type(centers).__name__}")
    if centers.dim() != 2 or centers.shape[0] != d:
        raise ValueError(
            f"centers must be (embedding_size={d}, num_classes * centers_per_class), "
            f"got shape {tuple(centers.shape)}"
        )
    if centers.shape[1] == 0 or centers.shape[1] % k != 0:
        raise ValueError(
            f"centers has {centers.shape[1]} columns, expected a positive multiple of centers_per_class={k}"
        )
    if not centers.is_floating_point():
        raise ValueError(f"centers must be a floating-point tensor, got {centers.dtype}")
    if centers.device != device:
        raise ValueError(f"centers must be on the embeddings' device {device}, got {centers.device}")
    return centers.shape[1] // k


# ---------------------------------------------------------------- OSM + CAA
def check_osm_params(alpha: float, sigma: float, imbalance: float) -> None:
    """alpha > 0 (negative margin), sigma > 0 (OSM bandwidth), imbalance in [0, 1]."""
    for name, v in (("alpha", alpha), ("sigma", sigma), ("imbalance", imbalance)):
        _check_finite_number(v, name)
    if alpha <= 0:
        raise ValueError(f"alpha (the negative margin) must be > 0, got {alpha}")
    if sigma <= 0:
        raise ValueError(f"sigma (the OSM bandwidth) must be > 0, got {sigma}")
    if not 0.0 <= imbalance <= 1.0:
        raise ValueError(f"imbalance must lie in [0, 1], got {imbalance}")


def check_attention(
    attention: Optional[torch.Tensor],
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    check_values: bool = True,
) -> Optional[torch.Tensor]:
    """The per-sample attention a_i as a detached contiguous (n,) tensor of ``dtype``, or None.

    Raises ValueError unless it is a floating (n,) tensor with every value in (0, 1] (the values
    in eager mode only, and only with ``check_values``: the fused ops check them themselves,
    docs/semantics.md §4.5).
    """
    if attention is None:
        return None
    if not isinstance(attention, torch.Tensor):
        raise ValueError(f"attention must be a torch.Tensor or None, got {type(attention).__name__}")
    if attention.dim() != 1 or attention.shape[0] != n:
        raise ValueError(
            f"attention must have shape ({n},) (one value per embedding), got shape {tuple(attention.shape)}"
        )
    if not attention.is_floating_point():
        raise ValueError(f"attention must be a floating-point tensor, got {attention.dtype}")
    if attention.device != device:
        raise ValueError(f"attention must be on the embeddings' device {device}, got {attention.device}")
    a = attention.detach()
    if check_values and not torch.compiler.is_compiling():
        bad = ~((a > 0) & (a <= 1))  # also catches NaN
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            raise ValueError(f"attention values must lie in (0, 1]; attention[{k}] = {a[k].item()!r}")
    return a.to(dtype).contiguous()


def check_logits(logits: object, labels: object, gaussian_sigma: Optional[float]) -> torch.Tensor:
    """Checks of class_aware_attention: (N, C) floating logits, labels in [0, C), sigma > 0 or None."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D (N, C) tensor, got {got}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    n, c = logits.shape
    labels = check_labels(labels, n, "labels", logits.device)
    # CPU tensors only (no device sync): on CUDA an out-of-range label fails the gather's
    # device-side bounds assertion instead (docs/semantics.md §6)
    on_cpu = logits.device.type == "cpu"
    if n and on_cpu and not torch.compiler.is_compiling() and bool(((labels < 0) | (labels >= c)).any()):
        raise ValueError(
            f"labels must be class indices in [0, {c}) for logits with {c} columns, "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    if gaussian_sigma is not None and not (isinstance(gaussian_sigma, (int, float)) and gaussian_sigma > 0):
        raise ValueError(f"gaussian_sigma must be None or a number > 0, got {gaussian_sigma!r}")
    return labels
