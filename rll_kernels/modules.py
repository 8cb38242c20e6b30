"""nn.Module wrappers of the fused losses, as torch.nn holds its losses: ``RLLFused``,
``SoftTripleFused`` and ``WeightedContrastiveFused``. Hyper-parameters are checked once, when the
module is built; ``forward`` calls the functional API (rll_kernels/functional.py).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ._backends import BACKENDS
from ._checks import (
    check_choice,
    check_osm_params,
    check_positive_int,
    check_rll_params,
    check_softtriple_params,
)
from .functional import rll_checked, soft_triple_checked, weighted_contrastive_checked

__all__ = ["RLLFused", "SoftTripleFused", "WeightedContrastiveFused", "rll_kwargs"]


# PML's constructor keywords that the native modules do not take (their drop-ins in rll_kernels.pml do)
_PML_BASE_KEYWORDS = ("reducer", "distance", "embedding_regularizer", "embedding_reg_weight", "collect_stats")
_PML_KEYWORDS = {
    "RLLFused": ("RankedListLoss", _PML_BASE_KEYWORDS + ("neg_temperature", "pos_temperature")),
    "SoftTripleFused": (
        "SoftTripleLoss",
        _PML_BASE_KEYWORDS + ("weight_regularizer", "weight_reg_weight", "weight_init_func"),
    ),
}


def _refuse_pml_keywords(owner: str, kwargs: dict[str, Any]) -> None:
    """TypeError for keywords the module does not take, pointing PML's own to the exact drop-in."""
    if not kwargs:
        return
    dropin, known = _PML_KEYWORDS[owner]
    pml = sorted(k for k in kwargs if k in known)
    if pml:
        raise TypeError(
            f"{owner} is the native module and does not take PML's keyword arguments {pml}; "
            f"rll_kernels.pml.{dropin} is the exact PML drop-in that does "
            "(it needs pip install pytorch-metric-learning)"
        )
    raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {sorted(kwargs)[0]!r}")


class RLLFused(nn.Module):
    r"""Ranked List Loss with fused kernels, the native module (the paper's gradient by default).

    PML's ``RankedListLoss`` keyword names and call, with defaults for ``margin`` and ``Tn``;
    ``semantics="pml"`` gives PML's value and gradient. PML's base-class keywords (``reducer=``,
    ``distance=``, ...) raise ``TypeError``: the exact PML drop-in (PML's base class, reducers,
    wrappers) is :class:`rll_kernels.pml.RankedListLoss` (README, "Which class").

    .. math::
        L(i) = (1 - \lambda) \sum_{P_i} \mathrm{softmax}(T_p (d - \beta))(d - \beta)
               + \lambda \sum_{N_i} \mathrm{softmax}(T_n (\alpha - d))(\alpha - d)

    over the non-trivial positives :math:`P_i = \{y_j = y_i, d_{ij} > \beta = \alpha - m\}` and
    negatives :math:`N_i = \{y_j \ne y_i, d_{ij} < \alpha\}` of each query (docs/semantics.md §2).
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
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _refuse_pml_keywords("RLLFused", kwargs)
        check_choice(semantics, "semantics", ("paper", "pml"))
        check_choice(reduction, "reduction", ("mean", "sum", "none"))
        check_choice(backend, "backend", BACKENDS["rll"])
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
        indices_tuple: Optional[tuple] = None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if labels is None:
            raise ValueError("labels are required for this loss function")
        if indices_tuple is not None:
            raise ValueError("indices_tuple is not supported for this loss function (RLL mines its own sets)")
        return rll_checked(
            embeddings,
            labels,
            (self.margin, self.Tn, self.imbalance, self.alpha, self.Tp),  # checked in __init__
            self.semantics,
            self.reduction,
            self.normalize,
            self.backend,
            ref_emb=ref_emb,
            ref_labels=ref_labels,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, Tn={self.Tn}, imbalance={self.imbalance}, alpha={self.alpha}, "
            f"Tp={self.Tp}, semantics={self.semantics!r}, reduction={self.reduction!r}, "
            f"normalize={self.normalize}, backend={self.backend!r}"
        )


class SoftTripleFused(torch.nn.Module):
    r"""Fused SoftTriple loss with its centers as the parameter ``fc`` (D x C*K, PML's name and shape).

    The native module: the official configuration's regulariser weight ``tau=0.2`` by default
    (``tau=0`` equals PML's default, no regulariser). A PML ``SoftTripleLoss`` state_dict loads
    unchanged. ``fc`` stays float32 whatever the input dtype (fp16/bf16 embeddings are computed in
    fp32; PML casts ``fc`` to the input dtype, PML issues #293/#309) unless the module itself is
    converted (``.double()``). See :func:`soft_triple_loss` for the equation. The exact PML drop-in
    (``weight_regularizer=``, reducers, wrappers) is :class:`rll_kernels.pml.SoftTripleLoss`.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        margin: float = 0.01,
        tau: float = 0.2,
        *,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _refuse_pml_keywords("SoftTripleFused", kwargs)
        check_positive_int(num_classes, "num_classes")
        check_positive_int(embedding_size, "embedding_size")
        check_softtriple_params(centers_per_class, la, gamma, margin, tau)
        check_choice(backend, "backend", BACKENDS["softtriple"])
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.centers_per_class = centers_per_class
        self.la, self.gamma, self.margin, self.tau = la, gamma, margin, tau
        self.backend = backend
        self.fc = torch.nn.Parameter(torch.empty(embedding_size, num_classes * centers_per_class))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PML's default init (c_f.TorchInitWrapper(kaiming_uniform_, a=sqrt(5)))
        torch.nn.init.kaiming_uniform_(self.fc, a=math.sqrt(5))

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: Optional[tuple] = None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if labels is None:
            raise ValueError("labels are required for this loss function")
        if indices_tuple is not None:
            raise ValueError("indices_tuple is not supported for this loss function")
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb is not supported for this loss function")
        # the hyper-parameters were checked in __init__: nothing per call but the tensors' checks
        return soft_triple_checked(
            embeddings,
            labels,
            self.fc,
            self.centers_per_class,
            self.la,
            self.gamma,
            self.margin,
            self.tau,
            "mean",
            self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
            f"margin={self.margin}, tau={self.tau}, backend={self.backend!r}"
        )


class WeightedContrastiveFused(nn.Module):
    r"""OSM + CAA weighted contrastive loss with fused kernels (Wang et al., AAAI 2019).

    .. math::
        L = (1-\lambda)\,\tfrac12 \frac{\sum_{pos} w^+ d^2}{\sum_{pos} w^+}
            + \lambda\,\tfrac12 \frac{\sum_{neg} w^- [\alpha - d]_+^2}{\sum_{neg} w^-}

    with :math:`w^+ = e^{-d^2/(2\sigma^2)} \min(a_i, a_j)`, :math:`w^- = [\alpha - d]_+ \min(a_i, a_j)`
    over the unordered pairs of the batch (docs/semantics.md §4).

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
        check_choice(backend, "backend", BACKENDS["osm"])
        self.alpha, self.sigma, self.imbalance = float(alpha), float(sigma), float(imbalance)
        self.normalize, self.backend = normalize, backend

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, attention: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        # the hyper-parameters were checked in __init__
        return weighted_contrastive_checked(
            embeddings,
            labels,
            attention,
            self.alpha,
            self.sigma,
            self.imbalance,
            self.normalize,
            self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, sigma={self.sigma}, imbalance={self.imbalance}, "
            f"normalize={self.normalize}, backend={self.backend!r}"
        )


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
