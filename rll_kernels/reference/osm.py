"""Dense reference of the OSM + CAA weighted contrastive loss (Wang et al., AAAI 2019; docs/semantics.md §4).

Materialises the N x N distance matrix on purpose (clarity over memory); never use it at scale.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._checks import check_attention, check_osm_params, compute_dtype
from ._common import pairwise_distance

__all__ = ["weighted_contrastive_loss"]


def weighted_contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    attention: Optional[torch.Tensor] = None,
    alpha: float = 1.2,
    sigma: float = 0.8,
    imbalance: float = 0.5,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    r"""OSM + CAA weighted contrastive loss, dense reference (docs/semantics.md §4).

    Over all unordered pairs :math:`i < j` of the batch, with :math:`z = e/\|e\|` (``normalize``),
    :math:`d_{ij} = \|z_i - z_j\|_2`, :math:`h_{ij} = [\alpha - d_{ij}]_+` and the pair attention
    :math:`a_{ij} = \min(a_i, a_j)` (:math:`a \equiv 1` when ``attention`` is None):

    .. math::
        w^+_{ij} = e^{-d_{ij}^2 / (2\sigma^2)} a_{ij}, \qquad w^-_{ij} = h_{ij}\, a_{ij}

        L_P = \frac{1}{2} \frac{\sum_{pos} w^+ d^2}{\sum_{pos} w^+}, \qquad
        L_N = \frac{1}{2} \frac{\sum_{neg} w^- h^2}{\sum_{neg} w^-}, \qquad
        L = (1 - \lambda) L_P + \lambda L_N

    An empty set (no positive pair; no negative pair inside the margin) gives 0. The weights are
    constants (stop-gradient, as the official code computes them in Backward); both ends of every
    pair receive gradient. Distances use the Gram form with the duplicate rule of docs/semantics.md
    §1.3 (a pair with :math:`d^2 \le 64\epsilon(|z_i|^2 + |z_j|^2)` has ``d = 0`` and no gradient direction).
    ``attention`` is an input in (0, 1], never differentiated.
    """
    check_osm_params(alpha, sigma, imbalance)
    acc = compute_dtype(embeddings.dtype)
    z = embeddings.to(acc)
    if normalize:
        z = F.normalize(z, dim=1)
    n = z.shape[0]
    a = check_attention(attention, n, acc, z.device)

    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    d = pairwise_distance(z, z, eye)
    upper = torch.ones(n, n, dtype=torch.bool, device=z.device).triu(1)  # unordered pairs i < j
    same = labels.view(-1, 1) == labels.view(1, -1)
    pos = same & upper
    neg = ~same & upper

    aij = torch.ones_like(d) if a is None else torch.minimum(a.view(-1, 1), a.view(1, -1))
    h = (alpha - d).clamp_min(0.0)
    zero = torch.zeros_like(d)
    wp = torch.where(pos, torch.exp(-(d * d) / (2.0 * sigma * sigma)) * aij, zero).detach()
    wn = torch.where(neg, h * aij, zero).detach()

    sp, sn = wp.sum(), wn.sum()
    lp = 0.5 * (wp * d * d).sum() / torch.where(sp > 0, sp, torch.ones_like(sp))
    ln = 0.5 * (wn * h * h).sum() / torch.where(sn > 0, sn, torch.ones_like(sn))
    lp = torch.where(sp > 0, lp, torch.zeros_like(lp))
    ln = torch.where(sn > 0, ln, torch.zeros_like(ln))
    return (1.0 - imbalance) * lp + imbalance * ln
