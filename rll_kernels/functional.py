"""Functional API of the fused losses."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import reference
from ._dispatch import fused_ops, resolve_backend
from ._validate import check_choice, check_embeddings, check_labels, check_rll_params

__all__ = ["ranked_list_loss"]

PML_EPS = 1e-5  # PML adds 1e-5 per gallery column to each softmax denominator


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 are computed in fp32 (the loss is returned in fp32); fp64 stays fp64
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    backend: str = "auto",
    query_ids: Optional[torch.Tensor] = None,
    ref_ids: Optional[torch.Tensor] = None,
    den_rows: Optional[int] = None,
) -> torch.Tensor:
    r"""Ranked List Loss, fused (SPEC section 1). Never materialises the N x M distance matrix.

    With :math:`z = e/\|e\|`, :math:`d_{ij} = \|z_i - g_j\|_2`, :math:`\beta = \alpha - m`:

    .. math::
        P_i = \{j \ne i: y_j = y_i,\ d_{ij} > \beta\}, \qquad N_i = \{j: y_j \ne y_i,\ d_{ij} < \alpha\}

        L_P(i) = \sum_{j \in P_i} \frac{e^{T_p (d_{ij} - \beta)}}{\sum_{k \in P_i} e^{T_p (d_{ik} - \beta)}}
                 (d_{ij} - \beta), \qquad
        L_N(i) = \sum_{j \in N_i} \frac{e^{T_n (\alpha - d_{ij})}}{\sum_{k \in N_i} e^{T_n (\alpha - d_{ik})}}
                 (\alpha - d_{ij})

        L(i) = (1 - \lambda) L_P(i) + \lambda L_N(i), \qquad \text{empty sets give } 0.

    Args:
        embeddings: (N, D) queries. labels: (N,) integer labels.
        margin, Tn, imbalance, alpha, Tp: PML's names; ``alpha=None`` means ``1 + margin/2``.
        semantics: ``"paper"`` (weights constant, gradient to the query only, as the official code)
            or ``"pml"`` (everything differentiated, ``M * 1e-5`` in the denominators: PML 2.9.0).
        reduction: ``"mean"`` over all N queries, ``"sum"`` or ``"none"`` (per-query losses).
        normalize: L2-normalise embeddings (and ``ref_emb``) first, as PML's ``LpDistance``.
        ref_emb, ref_labels: optional (M, D) gallery; without them the batch is ranked against itself
            (the pair i = i excluded).
        backend: ``"auto"``, ``"cpp"``, ``"triton"``, ``"cuda"`` or ``"reference"``.
        query_ids, ref_ids: optional int64 ids; a pair with equal ids is excluded (the same sample in
            the batch and in a memory bank, or the global self-pair across ranks).
        den_rows: gallery size M used in the PML ``M * 1e-5`` bias (default: the gallery's rows).
    """
    check_choice(semantics, "semantics", ("paper", "pml"))
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    alpha = 1.0 + margin / 2.0 if alpha is None else alpha
    check_rll_params(margin, alpha, imbalance, Tn, Tp)
    check_embeddings(embeddings, "embeddings")
    labels = check_labels(labels, embeddings.shape[0], "labels", embeddings.device)
    in_batch = ref_emb is None
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError(
            "ref_emb and ref_labels must be given together "
            f"(got ref_emb={'set' if ref_emb is not None else None}, "
            f"ref_labels={'set' if ref_labels is not None else None})"
        )
    if not in_batch:
        if not isinstance(ref_emb, torch.Tensor):
            raise ValueError(f"ref_emb must be a torch.Tensor, got {type(ref_emb).__name__}")
        if ref_emb.device != embeddings.device:
            raise ValueError(
                f"ref_emb must be on the embeddings' device {embeddings.device}, got {ref_emb.device}"
            )
        if ref_emb.dtype != embeddings.dtype:
            raise ValueError(
                f"ref_emb must have the embeddings' dtype {embeddings.dtype}, got {ref_emb.dtype}"
            )
        check_embeddings(ref_emb, "ref_emb")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb must have embedding size {embeddings.shape[1]}, got {ref_emb.shape[1]}"
            )
        ref_labels = check_labels(ref_labels, ref_emb.shape[0], "ref_labels", embeddings.device)
    if (query_ids is None) != (ref_ids is None):
        raise ValueError("query_ids and ref_ids must be given together")

    name = resolve_backend(backend, embeddings.device)
    if name == "reference":
        if query_ids is not None or den_rows is not None:
            raise ValueError("query_ids/ref_ids/den_rows need a fused backend")
        return reference.ranked_list_loss(
            embeddings,
            labels,
            margin,
            Tn,
            imbalance,
            alpha,
            Tp,
            semantics=semantics,
            reduction=reduction,
            normalize=normalize,
            ref_emb=ref_emb,
            ref_labels=ref_labels,
        )

    dt = _compute_dtype(embeddings.dtype)
    # the Triton kernels read fp16/bf16 directly (fp32 accumulation): normalise in fp32, hand over half;
    # the C++ CPU kernel computes half inputs in fp32
    half = (
        embeddings.dtype
        if (name == "triton" and embeddings.dtype in (torch.float16, torch.bfloat16))
        else None
    )
    q = embeddings.to(dt)
    q = F.normalize(q, dim=1) if normalize else q
    q = q.to(half) if half is not None else q
    if in_batch:
        k, k_labels = q, labels
        if query_ids is None:
            query_ids = torch.arange(q.shape[0], device=q.device)
            ref_ids = query_ids
    else:
        k = ref_emb.to(dt)
        k = F.normalize(k, dim=1) if normalize else k
        k = k.to(half) if half is not None else k
        k_labels = ref_labels
    if query_ids is not None:
        query_ids = check_labels(query_ids, q.shape[0], "query_ids", q.device)
        ref_ids = check_labels(ref_ids, k.shape[0], "ref_ids", q.device)
    attached = semantics == "pml"
    if not attached:
        k = k.detach()  # the gallery is fixed ("paper")
    m_rows = k.shape[0] if den_rows is None else int(den_rows)
    bias = m_rows * 1e-5 if attached else 0.0
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    fwd, _ = fused_ops(name)
    rows, _, _ = fwd(
        q.contiguous(),
        labels,
        query_ids,
        k.contiguous(),
        k_labels,
        ref_ids,
        float(alpha),
        float(alpha - margin),
        float(Tn),
        float(Tp),
        float(imbalance),
        float(bias),
        attached,
        need_grad,
    )
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows
