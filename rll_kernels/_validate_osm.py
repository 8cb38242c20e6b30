"""Argument checks of the OSM + CAA weighted contrastive loss (SPEC section 3)."""

from __future__ import annotations

import math
from typing import Optional

import torch


def check_osm_params(alpha: float, sigma: float, imbalance: float) -> None:
    """alpha > 0 (negative margin), sigma > 0 (OSM bandwidth), imbalance in [0, 1]."""
    for name, v in (("alpha", alpha), ("sigma", sigma), ("imbalance", imbalance)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if alpha <= 0:
        raise ValueError(f"alpha (the negative margin) must be > 0, got {alpha}")
    if sigma <= 0:
        raise ValueError(f"sigma (the OSM bandwidth) must be > 0, got {sigma}")
    if not 0.0 <= imbalance <= 1.0:
        raise ValueError(f"imbalance must lie in [0, 1], got {imbalance}")


def check_attention(
    attention: Optional[torch.Tensor], n: int, dtype: torch.dtype, device: torch.device
) -> Optional[torch.Tensor]:
    """The per-sample attention a_i as a detached contiguous (n,) tensor of ``dtype``, or None.

    Raises ValueError unless it is a floating (n,) tensor with every value in (0, 1].
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
    if not torch.compiler.is_compiling():
        bad = ~((a > 0) & (a <= 1))  # also catches NaN
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            raise ValueError(f"attention values must lie in (0, 1]; attention[{k}] = {a[k].item()!r}")
    return a.to(dtype).contiguous()
