"""Helpers shared by the dense references: Gram-form distances with the duplicate rule, and pair
exclusion by ids (docs/semantics.md §1.3 and §1.5)."""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import dup_rel_tol

__all__ = ["id_exclusion", "pairwise_distance"]


def pairwise_distance(
    q: torch.Tensor,
    k: torch.Tensor,
    exclude: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Euclidean distance matrix from the Gram form, with the duplicate rule (docs/semantics.md §1.3).

    :math:`d^2_{ij} = |q_i|^2 + |k_j|^2 - 2 q_i \cdot k_j`, clamped at 0. A pair with
    :math:`d^2 \le 64\,\epsilon\,(|q_i|^2 + |k_j|^2)` is a duplicate: it gets ``d = 0`` and a zero
    gradient (no ``sqrt`` is ever taken at 0, so no NaN). ``exclude`` (bool, N x M) marks pairs
    that are not pairs at all (the diagonal in-batch); they also get ``d = 0`` and no gradient.
    """
    nq = (q * q).sum(1, keepdim=True)
    nk = (k * k).sum(1, keepdim=True).t()
    d2 = (nq + nk - 2.0 * (q @ k.t())).clamp_min(0.0)
    dead = d2 <= dup_rel_tol(q.dtype) * (nq + nk)
    if exclude is not None:
        dead = dead | exclude
    return torch.where(dead, torch.zeros_like(d2), torch.where(dead, torch.ones_like(d2), d2).sqrt())


def id_exclusion(
    query_ids: Optional[torch.Tensor],
    ref_ids: Optional[torch.Tensor],
    n: int,
    m: int,
    in_batch: bool,
    device: torch.device,
) -> Optional[torch.Tensor]:
    """The (N, M) bool mask of pairs that are not pairs: equal ids, else the diagonal in-batch, else None."""
    if (query_ids is None) != (ref_ids is None):
        raise ValueError("query_ids and ref_ids must be given together")
    if query_ids is not None:
        return query_ids.to(device).view(-1, 1) == ref_ids.to(device).view(1, -1)
    return torch.eye(n, m, dtype=torch.bool, device=device) if in_batch else None
