"""Exact drop-ins for pytorch-metric-learning 2.9.0 (PML): ``RankedListLoss`` and ``SoftTripleLoss``.

Each class subclasses PML's own class (so PML's ``BaseMetricLossFunction``): PML's name, signature,
defaults and keyword arguments (``reducer=``, ``distance=``, ``embedding_regularizer=``,
``weight_regularizer=``, ``collect_stats=``, ...), so PML's wrappers and reducers take it, and a
config dict of PML keyword arguments builds it. Only ``compute_loss`` differs: the per-anchor losses
come from the fused kernels (:mod:`rll_kernels.functional`) with PML's gradient semantics, and PML's
reducer reduces them as it reduces PML's own. Importing this module needs PML 2.x; the differences
from PML 2.9.0 are listed in docs/semantics.md §2.8 and §3.6.

Example::

    from rll_kernels.pml import RankedListLoss           # was: from pytorch_metric_learning.losses import ...
    loss_fn = RankedListLoss(margin=0.4, Tn=10.0, reducer=AvgNonZeroReducer())
"""

from __future__ import annotations

from typing import Any, Optional

import torch

try:
    from pytorch_metric_learning import losses as _pml_losses
    from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance
    from pytorch_metric_learning.reducers import (
        BaseReducer,
        DivisorReducer,
        MultipleReducers,
        PerAnchorReducer,
    )
    from pytorch_metric_learning.regularizers import SparseCentersRegularizer
    from pytorch_metric_learning.utils import common_functions as c_f
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
except ImportError as e:  # pragma: no cover - exercised by a test that hides PML
    raise ImportError(
        "rll_kernels.pml needs pytorch-metric-learning 2.x (tested with 2.9.0): "
        f"pip install pytorch-metric-learning==2.9.0 ({e})"
    ) from e

from ._backends import BACKENDS
from ._checks import check_choice, check_positive_int, check_rll_params, check_softtriple_params
from .functional import ranked_list_loss, soft_triple_loss
from .ops.softtriple import sparse_centers_raw

__all__ = ["RankedListLoss", "SoftTripleLoss"]


class _NotPassed(float):
    """PML's default 0 that also tells whether the argument was passed (for the PML 3 alias check)."""

    def __repr__(self) -> str:
        return "0"


_TP_DEFAULT = _NotPassed(0.0)


def _temperature(value, alias, name: str, alias_name: str):
    """``value`` or its PML 3 alias; both given is an error (``None``: not given)."""
    if alias is None:
        return value
    if value is not None:
        raise TypeError(f"RankedListLoss got both {name} and {alias_name} (its PML 3 name): pass one of them")
    return alias


def _describe(obj) -> str:
    if isinstance(obj, (LpDistance, DotProductSimilarity)):
        args = f"p={obj.p}, power={obj.power}, normalize_embeddings={obj.normalize_embeddings}"
        return f"{type(obj).__name__}({args})"
    return type(obj).__name__


def _rll_normalize(distance) -> bool:
    """The ``normalize`` flag of the fused RLL for PML's ``distance``, or ValueError."""
    if type(distance) is LpDistance and distance.p == 2 and distance.power == 1:
        return bool(distance.normalize_embeddings)
    raise ValueError(
        "rll_kernels.pml.RankedListLoss computes with the fused kernels, which support "
        "distance=LpDistance(p=2, power=1) with normalize_embeddings=True (PML's default) or False; "
        f"got distance={_describe(distance)}"
    )


def _check_softtriple_distance(distance) -> None:
    if (
        type(distance) in (CosineSimilarity, DotProductSimilarity)
        and distance.normalize_embeddings
        and distance.p == 2
        and distance.power == 1
    ):
        return
    raise ValueError(
        "rll_kernels.pml.SoftTripleLoss computes with the fused kernels, which support "
        "distance=CosineSimilarity() (PML's default; DotProductSimilarity with normalize_embeddings=True "
        f"is the same); got distance={_describe(distance)}"
    )


def _check_element_reducer(reducer, owner: str) -> None:
    """The reducer of the ``"loss"`` entry must reduce per-anchor losses (reduction type "element")."""
    if isinstance(reducer, MultipleReducers):
        subs = reducer.reducers  # a ModuleDict: no .get()
        reducer = subs["loss"] if "loss" in subs else reducer.default_reducer  # noqa: SIM401
    while isinstance(reducer, PerAnchorReducer):
        reducer = reducer.reducer

    def overrides(name: str) -> bool:
        return getattr(type(reducer), name) is not getattr(BaseReducer, name)

    needs_more = isinstance(reducer, DivisorReducer) or (
        isinstance(reducer, BaseReducer) and not (overrides("element_reduction") or overrides("forward"))
    )
    if needs_more:
        raise ValueError(
            f"{owner} returns one loss per anchor (PML's reduction type 'element'); reducer="
            f"{type(reducer).__name__} needs pairs, triplets or a divisor. Use a reducer of elements: "
            "MeanReducer (the default), AvgNonZeroReducer, ThresholdReducer, SumReducer, "
            "ClassWeightedReducer, PerAnchorReducer or DoNothingReducer"
        )


def _record_distance_stats(distance, query: torch.Tensor, ref: torch.Tensor) -> None:
    """What PML's distance object records when ``collect_stats`` is on (the fused kernels skip it)."""
    if not distance.collect_stats:
        return
    distance.reset_stats()
    with torch.no_grad():
        distance.set_default_stats(query, ref, distance.maybe_normalize(query), distance.maybe_normalize(ref))


def _is_same_class_mask(mask: torch.Tensor, ck: int, k: int) -> bool:
    """``mask`` is SparseCentersRegularizer's mask for ``ck // k`` classes of ``k`` centers: exactly the
    pairs t < s of one class (checked from its ``C K (K-1) / 2`` true entries, never a second CK x CK)."""
    if tuple(mask.shape) != (ck, ck):
        return False
    t, s = mask.nonzero(as_tuple=True)
    return t.numel() == ck * (k - 1) // 2 and bool(((t < s) & (t // k == s // k)).all())


def _element_losses(rows: torch.Tensor) -> dict[str, Any]:
    return {"losses": rows, "indices": c_f.torch_arange_from_size(rows), "reduction_type": "element"}


class RankedListLoss(_pml_losses.RankedListLoss):
    r"""PML 2.9.0's ``RankedListLoss``, computed by the fused kernels (docs/semantics.md §2).

    ``RankedListLoss(margin, Tn, imbalance=0.5, alpha=None, Tp=0, **kwargs)`` with PML's base-class
    keywords; PML 3's names ``neg_temperature`` and ``pos_temperature`` are accepted for ``Tn`` and
    ``Tp``. Value and gradient equal PML's (``semantics="pml"``: weights differentiated, ``M * 1e-5``
    in each denominator) over PML's whole parameter domain (§2.2), without the N x N matrices.
    ``backend`` (keyword only) chooses the kernels as in :func:`rll_kernels.ranked_list_loss`.
    Beyond PML: ``ref_emb``/``ref_labels`` rank the batch against a gallery.
    """

    def __init__(
        self,
        margin: float,
        Tn: Optional[float] = None,
        imbalance: float = 0.5,
        alpha: Optional[float] = None,
        Tp: float = _TP_DEFAULT,
        *,
        neg_temperature: Optional[float] = None,
        pos_temperature: Optional[float] = None,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        Tn = _temperature(Tn, neg_temperature, "Tn", "neg_temperature")
        if Tn is None:
            raise TypeError("RankedListLoss() missing 1 required argument: 'Tn' (PML 3: 'neg_temperature')")
        Tp = _temperature(None if Tp is _TP_DEFAULT else Tp, pos_temperature, "Tp", "pos_temperature")
        Tp = 0 if Tp is None else Tp
        alpha = 1 + margin / 2 if alpha is None else alpha
        check_rll_params(margin, alpha, imbalance, Tn, Tp)  # ValueError where PML asserts (imbalance)
        check_choice(backend, "backend", BACKENDS["rll"])
        # PML's own __init__ is skipped: its "Tp or Tn > 5" overflow warning does not apply here
        super(_pml_losses.RankedListLoss, self).__init__(**kwargs)
        _rll_normalize(self.distance)
        self.margin, self.imbalance, self.alpha, self.Tp, self.Tn = margin, imbalance, alpha, Tp, Tn
        self.backend = backend
        self.add_to_recordable_attributes(
            list_of_names=["imbalance", "alpha", "margin", "Tp", "Tn"], is_stat=False
        )

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: Optional[tuple],
        ref_emb: Optional[torch.Tensor],
        ref_labels: Optional[torch.Tensor],
    ) -> dict[str, Any]:
        c_f.labels_required(labels)
        c_f.indices_tuple_not_supported(indices_tuple)
        normalize = _rll_normalize(self.distance)
        _check_element_reducer(self.reducer, "RankedListLoss")
        in_batch = ref_emb is embeddings and ref_labels is labels
        _record_distance_stats(self.distance, embeddings, ref_emb)
        rows = ranked_list_loss(
            embeddings,
            labels,
            self.margin,
            self.Tn,
            self.imbalance,
            self.alpha,
            self.Tp,
            semantics="pml",
            reduction="none",
            normalize=normalize,
            ref_emb=None if in_batch else ref_emb,
            ref_labels=None if in_batch else ref_labels,
            backend=self.backend,
        )
        return {"loss": _element_losses(rows)}


class SoftTripleLoss(_pml_losses.SoftTripleLoss):
    r"""PML 2.9.0's ``SoftTripleLoss``, computed by the fused kernels (docs/semantics.md §3).

    ``SoftTripleLoss(num_classes, embedding_size, centers_per_class=10, la=20, gamma=0.1,
    margin=0.01, **kwargs)``: no regulariser unless ``weight_regularizer=`` is given, as in PML.
    ``weight_regularizer=SparseCentersRegularizer(num_classes, centers_per_class)`` (its default
    distance and reducer, ``collect_stats`` off) runs fused, with PML's epsilon; any other
    regulariser is applied as PML applies it. The centers ``fc`` are PML's parameter (a PML
    state_dict loads); they follow the embeddings' device as in PML, but keep their dtype.
    Miner output (``indices_tuple``) weighs the rows as in PML.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        la: float = 20,
        gamma: float = 0.1,
        margin: float = 0.01,
        *,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        check_positive_int(num_classes, "num_classes")
        check_positive_int(embedding_size, "embedding_size")
        check_softtriple_params(centers_per_class, la, gamma, margin, 0.0)
        check_choice(backend, "backend", BACKENDS["softtriple"])
        if kwargs.get("distance") is not None:
            _check_softtriple_distance(kwargs["distance"])
        super().__init__(num_classes, embedding_size, centers_per_class, la, gamma, margin, **kwargs)
        self.backend = backend
        self._checked_mask, self._mask_fits = None, False

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: Optional[tuple],
        ref_emb: Optional[torch.Tensor],
        ref_labels: Optional[torch.Tensor],
    ) -> dict[str, Any]:
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        _check_softtriple_distance(self.distance)
        _check_element_reducer(self.reducer, "SoftTripleLoss")
        if self.fc.device != embeddings.device:  # as PML's cast_types, without its dtype cast
            self.fc.data = self.fc.data.to(embeddings.device)
        _record_distance_stats(self.distance, embeddings, self.fc.t())
        rows = soft_triple_loss(
            embeddings,
            labels,
            self.fc,
            self.centers_per_class,
            self.la,
            1.0 / self.gamma,  # PML keeps 1 / gamma in self.gamma
            self.margin,
            0.0,
            reduction="none",
            backend=self.backend,
        )
        if indices_tuple is not None:
            rows = rows * lmu.convert_to_weights(indices_tuple, labels, dtype=rows.dtype)
        loss_dict = {"loss": _element_losses(rows)}
        if self.weight_regularizer is not None:
            loss_dict["weight_reg_loss"] = self._weight_reg_loss(rows.dtype)
        return loss_dict

    def _fused_regularizer(self) -> bool:
        """Whether the weight regulariser is PML's default ``SparseCentersRegularizer`` for these centers."""
        reg = self.weight_regularizer
        if not (
            type(reg) is SparseCentersRegularizer
            and not reg.collect_stats
            and type(reg.distance) is CosineSimilarity
            and reg.distance.normalize_embeddings
            and reg.distance.p == 2
            and reg.distance.power == 1
            and type(reg.reducer) is DivisorReducer
        ):
            return False
        mask = reg.same_class_mask  # the regulariser keeps no centers_per_class of its own
        if self._checked_mask is not mask:
            self._mask_fits = _is_same_class_mask(mask, self.fc.shape[1], self.centers_per_class)
            self._checked_mask = mask
        return self._mask_fits

    def _weight_reg_loss(self, dtype: torch.dtype) -> dict[str, Any]:
        if not self._fused_regularizer():
            return self.weight_regularization_loss(self.fc.t())
        # PML smooths the square root with finfo(dtype).tiny (the official code: 1e-5), docs/semantics.md §3.2
        reg = sparse_centers_raw(self.fc.to(dtype), self.centers_per_class, reg_eps=torch.finfo(dtype).tiny)
        return {"losses": reg * self.weight_reg_weight, "indices": None, "reduction_type": "already_reduced"}
