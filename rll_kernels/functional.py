"""Functional API of the fused losses: argument checks, backend choice, one op call per loss call.

``ranked_list_loss`` (docs/semantics.md §2), ``soft_triple_loss`` (§3), ``weighted_contrastive_loss``
and ``class_aware_attention`` (§4). Each function checks its arguments (rll_kernels/_checks.py),
resolves the backend in the registry (rll_kernels/_backends.py) and calls the loss's op
(rll_kernels/ops/), or the dense reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops as _ops  # noqa: F401  (registers the ops' fake kernels and autograd)
from . import reference
from ._backends import fused_op, resolve
from ._checks import (
    check_attention,
    check_centers,
    check_choice,
    check_embeddings,
    check_gallery,
    check_label_range,
    check_labels,
    check_logits,
    check_osm_params,
    check_rll_params,
    check_softtriple_params,
    compute_dtype,
)
from .ops.softtriple import sparse_centers_raw

__all__ = [
    "class_aware_attention",
    "ranked_list_loss",
    "rll_checked",
    "soft_triple_loss",
    "weighted_contrastive_loss",
]


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


# ---------------------------------------------------------------- Ranked List Loss
_HALF = (torch.float16, torch.bfloat16)


def _rll_operand(x: torch.Tensor, backend: str) -> torch.Tensor:
    """An embedding tensor as the op reads it: the raw rows, whatever their strides (the op normalises
    them itself, docs/semantics.md §1.4). The C++ kernels compute fp16/bf16 inputs in fp32; the Triton
    kernels read them directly (fp32 accumulation)."""
    if x.dtype in _HALF and backend != "triton":
        return x.to(torch.float32)
    return x


def _rll_gallery(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, backend: str):
    """(q_ids, k, k_labels, k_ids) of the op: in-batch (no ``ref_emb``) k is absent unless different
    ids are given for the two sides; the op then excludes equal ids, or the pair i = i."""
    if (query_ids is None) != (ref_ids is None):
        raise ValueError("query_ids and ref_ids must be given together")
    n = embeddings.shape[0]
    q_ids = None if query_ids is None else check_labels(query_ids, n, "query_ids", embeddings.device)
    if ref_emb is None and ref_ids is query_ids:
        return q_ids, None, None, None
    k, k_labels = (embeddings, labels) if ref_emb is None else (_rll_operand(ref_emb, backend), ref_labels)
    k_ids = None if ref_ids is None else check_labels(ref_ids, k.shape[0], "ref_ids", embeddings.device)
    return q_ids, k, k_labels, k_ids


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
    r"""Ranked List Loss, fused (docs/semantics.md §2). Never materialises the N x M distance matrix.

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
        normalize: L2-normalise embeddings (and ``ref_emb``) first, as PML's ``LpDistance``; done
            inside the fused op with scale-safe norms (docs/semantics.md §1.4).
        ref_emb, ref_labels: optional (M, D) gallery; without them the batch is ranked against itself
            (the pair i = i excluded).
        backend: ``"auto"``, ``"cpp"``, ``"triton"``, ``"cuda"`` or ``"reference"``.
        query_ids, ref_ids: optional int64 ids; a pair with equal ids is excluded (the same sample in
            the batch and in a memory bank, or the global self-pair across ranks).
        den_rows: gallery size M used in the PML ``M * 1e-5`` bias (default: the gallery's rows).

    A NaN or Inf in the embeddings raises a ``ValueError`` on the CPU and gives a NaN loss on a GPU
    (``RLL_STRICT_FINITE=1`` raises there too, at the cost of a device sync; docs/semantics.md §6).
    """
    check_choice(semantics, "semantics", ("paper", "pml"))
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    alpha = 1.0 + margin / 2.0 if alpha is None else alpha
    check_rll_params(margin, alpha, imbalance, Tn, Tp)
    return rll_checked(
        embeddings,
        labels,
        (margin, Tn, imbalance, alpha, Tp),
        semantics,
        reduction,
        normalize,
        backend,
        ref_emb=ref_emb,
        ref_labels=ref_labels,
        query_ids=query_ids,
        ref_ids=ref_ids,
        den_rows=den_rows,
    )


def rll_checked(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    hp: tuple,
    semantics: str,
    reduction: str,
    normalize: bool,
    backend: str,
    *,
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    query_ids: Optional[torch.Tensor] = None,
    ref_ids: Optional[torch.Tensor] = None,
    den_rows: Optional[int] = None,
) -> torch.Tensor:
    """:func:`ranked_list_loss` with its hyper-parameters ``hp = (margin, Tn, imbalance, alpha, Tp)``
    and choices already checked (``RLLFused`` checks them once, when it is built): the tensor checks,
    the backend and one op call."""
    margin, Tn, imbalance, alpha, Tp = hp
    name = resolve("rll", backend, embeddings.device)
    finite = name == "reference"  # the fused ops detect non-finite rows themselves
    check_embeddings(embeddings, "embeddings", finite=finite)
    labels = check_labels(labels, embeddings.shape[0], "labels", embeddings.device)
    ref_labels = check_gallery(embeddings, ref_emb, ref_labels, finite=finite)
    if name == "reference":
        return reference.ranked_list_loss(
            embeddings,
            labels,
            *hp,
            semantics=semantics,
            reduction=reduction,
            normalize=normalize,
            ref_emb=ref_emb,
            ref_labels=ref_labels,
            query_ids=query_ids,
            ref_ids=ref_ids,
            den_rows=den_rows,
        )
    q = _rll_operand(embeddings, name)
    q_ids, k, k_labels, k_ids = _rll_gallery(q, labels, ref_emb, ref_labels, query_ids, ref_ids, name)
    attached = semantics == "pml"
    if k is not None and not attached:
        k = k.detach()  # the gallery is fixed ("paper")
    need_grad = torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad))
    # "pml": need_grad also says the upstream gradient of the rows is uniform (the forward may then
    # return the gradient of their mean, rll_kernels/ops/rll.py); with "none" it is any
    need_grad = need_grad and not (attached and reduction == "none")
    rows = fused_op("rll", name)(
        q,
        labels,
        q_ids,
        k,
        k_labels,
        k_ids,
        alpha,
        alpha - margin,
        Tn,
        Tp,
        imbalance,
        1e-5 if attached else 0.0,
        den_rows,
        normalize,
        attached,
        need_grad,
    )[0]
    return _reduce(rows, reduction)


# ---------------------------------------------------------------- SoftTriple
def soft_triple_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    centers_per_class: int = 10,
    la: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    tau: float = 0.2,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""SoftTriple loss (Qian et al., ICCV 2019), fused: never materialises N x C*K (docs/semantics.md §3).

    With :math:`x_i = e_i/\|e_i\|`, :math:`\hat w_{ck} = W_{:, cK+k}/\|W_{:, cK+k}\|`,
    :math:`s_{ick} = x_i^\top \hat w_{ck}`:

    .. math::
        S_{ic} = \sum_k \mathrm{softmax}_k(s_{ick}/\gamma)\, s_{ick}, \qquad
        \ell_i = -\log \mathrm{softmax}_c\big(\lambda (S_{ic} - \delta [c = y_i])\big)_{y_i}

        L = \frac{1}{N}\sum_i \ell_i + \tau R, \qquad
        R = \frac{1}{C K (K-1)} \sum_c \sum_{t<s} \sqrt{2 + 10^{-5} - 2\,\hat w_{ct}^\top \hat w_{cs}}

    Args:
        embeddings: (N, D). labels: (N,) integers in [0, C).
        centers: (D, C*K) centers, column ``c*K + k`` is center k of class c (PML's ``fc``).
        centers_per_class: K. la: lambda. gamma: K-softmax temperature. margin: delta.
        tau: regulariser weight (R is skipped when ``tau == 0`` or K = 1; PML's default is off).
        reduction: ``"mean"`` (the loss above), ``"sum"`` (sum of :math:`\ell_i` + tau R) or
            ``"none"`` (the per-row :math:`\ell_i`, without R).
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpp"``, ``"triton"`` or ``"reference"``.

    Computed (and returned) in float64 if the embeddings or the centers are float64, else float32;
    gradients reach both the embeddings and the centers. The fused ops normalise the raw rows and
    columns themselves (docs/semantics.md §1.4) and check the labels and the values
    (docs/semantics.md §6).
    """
    check_softtriple_params(centers_per_class, la, gamma, margin, tau)
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    return soft_triple_checked(
        embeddings, labels, centers, centers_per_class, la, gamma, margin, tau, reduction, backend
    )


def soft_triple_checked(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    k: int,
    la: float,
    gamma: float,
    margin: float,
    tau: float,
    reduction: str,
    backend: str,
) -> torch.Tensor:
    """:func:`soft_triple_loss` after its hyper-parameter checks (a module checks them when built).

    No host sync on the fused path: the label range and finite values are checked by the op (the
    C++ op raises, the Triton one gives NaN, docs/semantics.md §6); the dense reference checks them
    here."""
    check_embeddings(embeddings, "embeddings", finite=False)
    labels = check_labels(labels, embeddings.shape[0], "labels", embeddings.device)
    num_classes = check_centers(centers, embeddings.shape[1], k, embeddings.device)
    name = resolve("softtriple", backend, embeddings.device)
    dt = compute_dtype(embeddings.dtype, centers.dtype)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        if name == "reference":
            check_embeddings(embeddings, "embeddings")
            check_label_range(labels, num_classes)
            return reference.soft_triple_loss(
                embeddings.to(dt), labels, centers.to(dt), k, la, gamma, margin, tau, reduction=reduction
            )
        w = centers.to(dt)  # raw: the kernel normalises each center column itself
        rows = fused_op("softtriple", name)(
            embeddings.to(dt), labels, w, k, float(la), float(gamma), float(margin), True
        )[0]
        if reduction == "none":
            return rows
        loss = _reduce(rows, reduction)
        if tau > 0 and k > 1:
            loss = loss + tau * sparse_centers_raw(w, k)
        return loss


# ---------------------------------------------------------------- OSM + CAA
def class_aware_attention(
    logits: torch.Tensor, labels: torch.Tensor, *, gaussian_sigma: Optional[float] = None
) -> torch.Tensor:
    r"""Class-aware attention (CAA): :math:`a_i = \mathrm{softmax}(\text{logits}_i)_{y_i}`.

    ``logits`` (N, C) come from a classifier, ``labels`` (N,) are the true classes. The result is
    detached (the loss never differentiates the attention) and clamped below at the smallest
    normal number of its dtype, so it always lies in (0, 1]. Computed in float32 (float64 stays
    float64).

    ``gaussian_sigma``: the official Caffe configuration maps p through a Gaussian kernel centred
    at 1, :math:`a_i = \exp(-(1 - p_i)^2 / (2\sigma^2))` with :math:`\sigma = 0.68`, which keeps
    outliers at >= 0.34 instead of ~0 (docs/semantics.md §4.2); None (default) gives the
    poster's plain probability.
    """
    labels = check_logits(logits, labels, gaussian_sigma)
    dt = compute_dtype(logits.dtype)
    logp = torch.log_softmax(logits.detach().to(dt), dim=1)
    p = logp.gather(1, labels.view(-1, 1)).squeeze(1).exp()
    if gaussian_sigma is not None:
        p = torch.exp(-((1.0 - p) ** 2) / (2.0 * float(gaussian_sigma) ** 2))
    return p.clamp(min=torch.finfo(dt).tiny, max=1.0)


def weighted_contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    attention: Optional[torch.Tensor] = None,
    alpha: float = 1.2,
    sigma: float = 0.8,
    imbalance: float = 0.5,
    *,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    r"""OSM + CAA weighted contrastive loss, fused (docs/semantics.md §4). O(N D) memory.

    Over all unordered pairs :math:`i < j`, with :math:`d_{ij} = \|z_i - z_j\|`,
    :math:`h = [\alpha - d]_+`, :math:`a_{ij} = \min(a_i, a_j)`:

    .. math::
        w^+ = e^{-d^2/(2\sigma^2)} a_{ij},\quad w^- = h\,a_{ij},\quad
        L = (1-\lambda)\,\tfrac12 \frac{\sum_{pos} w^+ d^2}{\sum_{pos} w^+}
            + \lambda\,\tfrac12 \frac{\sum_{neg} w^- h^2}{\sum_{neg} w^-}

    Weights are constants, both ends of a pair get gradient, the normalisers are global, and an
    empty set gives 0. See :func:`rll_kernels.reference.weighted_contrastive_loss`.

    Args:
        embeddings: (N, D) float tensor. labels: (N,) integer labels.
        attention: optional (N,) values in (0, 1] (e.g. :func:`class_aware_attention`); never
            differentiated. None means all ones.
        alpha: negative margin. sigma: OSM bandwidth (code convention exp(-d^2/(2 sigma^2))).
        imbalance: lambda. normalize: L2-normalise the embeddings first (official code).
        backend: ``"auto"`` (cpp on CPU, triton on CUDA), ``"cpp"``, ``"triton"``, ``"reference"``.
    """
    check_osm_params(alpha, sigma, imbalance)
    return weighted_contrastive_checked(
        embeddings, labels, attention, alpha, sigma, imbalance, normalize, backend
    )


def weighted_contrastive_checked(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    attention: Optional[torch.Tensor],
    alpha: float,
    sigma: float,
    imbalance: float,
    normalize: bool,
    backend: str,
) -> torch.Tensor:
    """:func:`weighted_contrastive_loss` after its hyper-parameter checks (a module checks them when
    built). No host sync on the fused path: finite values and the attention range are checked by
    the op (the C++ op raises, the Triton one gives NaN, docs/semantics.md §6); the dense reference
    checks them here."""
    check_embeddings(embeddings, "embeddings", finite=False)
    labels = check_labels(labels, embeddings.shape[0], "labels", embeddings.device)
    dt = compute_dtype(embeddings.dtype)
    name = resolve("osm", backend, embeddings.device)
    att = check_attention(
        attention, embeddings.shape[0], dt, embeddings.device, check_values=name == "reference"
    )
    if name == "reference":
        check_embeddings(embeddings, "embeddings")
        return reference.weighted_contrastive_loss(
            embeddings, labels, att, alpha, sigma, imbalance, normalize=normalize
        )
    x = embeddings.to(dt)  # raw: the op normalises the rows itself when asked (docs/semantics.md §1.4)
    need_grad = torch.is_grad_enabled() and x.requires_grad
    loss, _, _ = fused_op("osm", name)(
        x, labels, att, float(alpha), float(sigma), float(imbalance), bool(normalize), need_grad
    )
    return loss
