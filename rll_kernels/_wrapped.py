"""Shared helper of the scale-out wrappers: read an ``RLLFused``'s hyper-parameters once."""

from __future__ import annotations

from typing import Any

from .modules import RLLFused


def rll_kwargs(loss: RLLFused, owner: str) -> dict[str, Any]:
    """Keyword arguments of :func:`rll_kernels.ranked_list_loss` equal to ``loss``'s settings.

    Raises ValueError when ``loss`` is not an :class:`RLLFused` (``owner`` names the wrapper).
    """
    if not isinstance(loss, RLLFused):
        raise ValueError(f"{owner}: loss must be an rll_kernels.RLLFused, got {type(loss).__name__}")
    return dict(
        margin=loss.margin,
        Tn=loss.Tn,
        imbalance=loss.imbalance,
        alpha=loss.alpha,
        Tp=loss.Tp,
        semantics=loss.semantics,
        normalize=loss.normalize,
        backend=loss.backend,
    )
