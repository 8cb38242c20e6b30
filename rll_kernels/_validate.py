"""Argument checks shared by every loss: clear ValueErrors that name the argument."""

from __future__ import annotations

import torch

# SPEC section 1: a pair with d^2 <= 64 eps (|q|^2 + |k|^2) is a duplicate (Gram-form rounding).
DUP_REL_FP32 = 64.0 * 1.1920929e-07
DUP_REL_FP64 = 64.0 * 2.220446049250313e-16


def dup_rel_tol(dtype: torch.dtype) -> float:
    """Relative duplicate threshold for the accumulation type of ``dtype``."""
    return DUP_REL_FP64 if dtype == torch.float64 else DUP_REL_FP32


def check_embeddings(x, name: str, *, allow_empty: bool = False) -> None:
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
        x.device.type != "meta"
        and not torch.compiler.is_compiling()
        and not bool(torch.isfinite(x.sum()))
        and not bool(torch.isfinite(x).all())
    ):
        raise ValueError(f"{name} contains NaN or Inf")


def check_labels(labels, n: int, name: str, device: torch.device) -> torch.Tensor:
    """Labels as a contiguous int64 vector on ``device``."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of shape ({n},), got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per embedding), got {labels.shape[0]}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    return labels.to(device=device, dtype=torch.int64).contiguous()


def check_rll_params(margin: float, alpha: float, imbalance: float, Tn: float, Tp: float) -> None:
    import math

    for nm, v in (("margin", margin), ("alpha", alpha), ("imbalance", imbalance), ("Tn", Tn), ("Tp", Tp)):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{nm} must be a finite number, got {v!r}")
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if alpha <= margin:
        raise ValueError(
            f"alpha must be > margin (the positive boundary alpha - margin must be > 0), "
            f"got alpha={alpha}, margin={margin}"
        )
    if not 0.0 <= imbalance <= 1.0:
        raise ValueError(f"imbalance must lie in [0, 1], got {imbalance}")


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
