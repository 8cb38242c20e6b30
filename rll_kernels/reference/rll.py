"""Dense Ranked List Loss: the ground truth every fused backend is tested against (docs/semantics.md §2).

It materialises N x M matrices on purpose (clarity over memory); never use it at scale.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._checks import compute_dtype
from ._common import id_exclusion, pairwise_distance

__all__ = ["ranked_list_loss"]


def _weighted_mean(logits, values, mask, bias: float):
    """sum_j softmax(logits)_j values_j over ``mask`` with ``bias`` added to the denominator.

    Max-subtracted, so no overflow at any temperature. An empty set gives 0.
    """
    neg_inf = torch.finfo(logits.dtype).min
    s = torch.where(mask, logits, torch.full_like(logits, neg_inf))
    # the ratio is invariant to the shift, so the max carries no gradient
    m = s.amax(dim=1, keepdim=True).clamp_min(neg_inf / 2).detach()  # finite even for empty rows
    w = torch.where(mask, torch.exp(s - m), torch.zeros_like(s))
    num = (w * values).sum(1)
    den = w.sum(1)
    if bias > 0.0:
        # den_true = e^m (sum w) + bias  ->  in units of e^m: sum w + bias e^{-m}
        den = den + bias * torch.exp(-m.squeeze(1))
    empty = ~mask.any(1)
    return torch.where(empty, torch.zeros_like(num), num / torch.where(empty, torch.ones_like(den), den))


def ranked_list_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.4,
    Tn: float = 10.0,
    imbalance: float = 0.5,
    alpha: Optional[float] = None,
    Tp: float = 0.0,
    *,
    semantics: str = "paper",
    reduction: str = "mean",
    normalize: bool = True,
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    query_ids: Optional[torch.Tensor] = None,
    ref_ids: Optional[torch.Tensor] = None,
    den_rows: Optional[int] = None,
) -> torch.Tensor:
    r"""Ranked List Loss (Wang et al., CVPR 2019 / TPAMI 2021), dense reference (docs/semantics.md §2).

    With :math:`z = e/\|e\|`, :math:`d_{ij} = \|z_i - g_j\|`, :math:`\beta = \alpha - m`:

    .. math::
        P_i = \{j \ne i: y_j = y_i,\ d_{ij} > \beta\},\quad N_i = \{j: y_j \ne y_i,\ d_{ij} < \alpha\}

        L_P(i) = \sum_{P_i} \mathrm{softmax}(T_p (d - \beta)) (d - \beta),\quad
        L_N(i) = \sum_{N_i} \mathrm{softmax}(T_n (\alpha - d)) (\alpha - d)

        L(i) = (1 - \lambda) L_P(i) + \lambda L_N(i)

    ``semantics="paper"``: softmax weights and the gallery are constants (gradient reaches the
    query only). ``semantics="pml"``: plain autograd through everything, and ``M * 1e-5`` added
    to each denominator, as PML 2.9.0 ``RankedListLoss``. ``query_ids`` / ``ref_ids``: a pair with
    equal ids is excluded (default: the pair i = i in-batch; docs/semantics.md §1.5); ``den_rows``: the
    gallery size M of the bias (default: the gallery's rows).
    """
    if semantics not in ("paper", "pml"):
        raise ValueError(f"semantics must be 'paper' or 'pml', got {semantics!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if alpha is None:
        alpha = 1.0 + margin / 2.0
    beta = alpha - margin
    in_batch = ref_emb is None
    if in_batch:
        ref_emb, ref_labels = embeddings, labels
    acc = compute_dtype(embeddings.dtype)
    q = embeddings.to(acc)
    k = ref_emb.to(acc)
    if normalize:
        q = F.normalize(q, dim=1)
        k = q if in_batch else F.normalize(k, dim=1)
    pml = semantics == "pml"
    if not pml:
        k = k.detach()

    n, m_cols = q.shape[0], k.shape[0]
    exclude = id_exclusion(query_ids, ref_ids, n, m_cols, in_batch, q.device)
    d = pairwise_distance(q, k, exclude)
    same = labels.view(-1, 1) == ref_labels.view(1, -1)
    valid = ~exclude if exclude is not None else torch.ones_like(same)
    pos = same & valid & (d > beta)
    neg = ~same & valid & (d < alpha)

    vp, vn = d - beta, alpha - d
    sp, sn = Tp * vp, Tn * vn
    if not pml:
        sp, sn = sp.detach(), sn.detach()
    bias = (m_cols if den_rows is None else int(den_rows)) * 1e-5 if pml else 0.0
    lp = _weighted_mean(sp, vp, pos, bias)
    ln = _weighted_mean(sn, vn, neg, bias)
    rows = (1.0 - imbalance) * lp + imbalance * ln
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows
