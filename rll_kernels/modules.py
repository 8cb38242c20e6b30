"""nn.Module wrappers: drop-in replacements for pytorch-metric-learning's losses."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._dispatch import BACKENDS
from ._validate import check_choice, check_rll_params
from .functional import ranked_list_loss

__all__ = ["RLLFused"]


class RLLFused(nn.Module):
    r"""Ranked List Loss with fused kernels; a drop-in for PML's ``RankedListLoss``.

    .. math::
        L(i) = (1 - \lambda) \sum_{P_i} \mathrm{softmax}(T_p (d - \beta))(d - \beta)
               + \lambda \sum_{N_i} \mathrm{softmax}(T_n (\alpha - d))(\alpha - d)

    over the non-trivial positives :math:`P_i = \{y_j = y_i, d_{ij} > \beta = \alpha - m\}` and
    negatives :math:`N_i = \{y_j \ne y_i, d_{ij} < \alpha\}` of each query (SPEC section 1).
    ``alpha=None`` means ``1 + margin / 2`` (PML's default). See
    :func:`rll_kernels.functional.ranked_list_loss` for ``semantics``, ``reduction`` and ``backend``.

    Example::

        loss_fn = RLLFused(margin=0.4, Tn=10.0)
        loss = loss_fn(embeddings, labels)                       # in-batch
        loss = loss_fn(queries, q_labels, ref_emb=bank, ref_labels=bank_labels)  # vs a memory bank
    """

    def __init__(
        self,
        margin: float = 0.4,
        Tn: float = 10.0,
        imbalance: float = 0.5,
        alpha: Optional[float] = None,
        Tp: float = 0.0,
        *,
        semantics: str = "paper",
        reduction: str = "mean",
        normalize: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_choice(semantics, "semantics", ("paper", "pml"))
        check_choice(reduction, "reduction", ("mean", "sum", "none"))
        check_choice(backend, "backend", BACKENDS)
        alpha_eff = 1.0 + margin / 2.0 if alpha is None else alpha
        check_rll_params(margin, alpha_eff, imbalance, Tn, Tp)
        self.margin, self.Tn, self.imbalance, self.alpha, self.Tp = margin, Tn, imbalance, alpha_eff, Tp
        self.semantics, self.reduction, self.normalize, self.backend = (
            semantics,
            reduction,
            normalize,
            backend,
        )

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple=None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if labels is None:
            raise ValueError("labels are required for this loss function")
        if indices_tuple is not None:
            raise ValueError("indices_tuple is not supported for this loss function (RLL mines its own sets)")
        return ranked_list_loss(
            embeddings,
            labels,
            self.margin,
            self.Tn,
            self.imbalance,
            self.alpha,
            self.Tp,
            semantics=self.semantics,
            reduction=self.reduction,
            normalize=self.normalize,
            ref_emb=ref_emb,
            ref_labels=ref_labels,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, Tn={self.Tn}, imbalance={self.imbalance}, alpha={self.alpha}, "
            f"Tp={self.Tp}, semantics={self.semantics!r}, reduction={self.reduction!r}, "
            f"normalize={self.normalize}, backend={self.backend!r}"
        )
