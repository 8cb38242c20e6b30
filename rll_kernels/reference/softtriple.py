"""Dense SoftTriple reference (docs/semantics.md §3).

It materialises N x C*K on purpose; never use it at scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import compute_dtype

__all__ = ["REG_EPS", "soft_triple_loss", "soft_triple_regularizer", "sparse_centers_term"]

REG_EPS = 1e-5  # the official code's smoothing inside the regulariser's sqrt


def soft_triple_regularizer(
    centers: torch.Tensor, centers_per_class: int, *, reg_eps: float = REG_EPS
) -> torch.Tensor:
    r"""Center-sparsity regulariser of SoftTriple over the normalised centers.

    .. math:: R = \frac{1}{C K (K-1)} \sum_c \sum_{t<s} \sqrt{2 + \epsilon - 2\,\hat w_{ct}^\top \hat w_{cs}}

    ``centers`` is the raw (D, C*K) parameter (column ``c*K + k`` is center k of class c); it is
    normalised per column here. ``reg_eps`` is the official 1e-5; PML 2.9.0's
    ``SparseCentersRegularizer`` uses ``torch.finfo(dtype).tiny`` (and clamps 2 w.w <= 2).
    Returns 0 for K = 1.
    """
    return sparse_centers_term(F.normalize(centers, dim=0), centers_per_class, reg_eps=reg_eps)


def sparse_centers_term(w: torch.Tensor, centers_per_class: int, *, reg_eps: float = REG_EPS) -> torch.Tensor:
    """R of :func:`soft_triple_regularizer` for already normalised centers ``w`` (D, C*K)."""
    k = int(centers_per_class)
    d, ck = w.shape
    c = ck // k
    if k == 1:
        return w.new_zeros(())
    wc = w.reshape(d, c, k).permute(1, 2, 0)  # (C, K, D)
    gram = wc @ wc.transpose(1, 2)  # (C, K, K)
    iu = torch.triu_indices(k, k, offset=1, device=w.device)
    sims = gram[:, iu[0], iu[1]]
    return torch.sqrt(2.0 + reg_eps - 2.0 * sims).sum() / (c * k * (k - 1))


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
    reg_eps: float = REG_EPS,
) -> torch.Tensor:
    r"""SoftTriple loss (Qian et al., ICCV 2019), dense reference.

    With :math:`x_i = e_i/\|e_i\|`, :math:`\hat w_{ck} = W_{:, cK+k}/\|W_{:, cK+k}\|`,
    :math:`s_{ick} = x_i^\top \hat w_{ck}`:

    .. math::
        S_{ic} = \sum_k \mathrm{softmax}_k(s_{ick}/\gamma)\, s_{ick}, \qquad
        \ell_i = -\log \mathrm{softmax}_c\big(\lambda (S_{ic} - \delta [c = y_i])\big)_{y_i}

        L = \frac{1}{N} \sum_i \ell_i + \tau R \quad (R \text{ skipped when } \tau = 0 \text{ or } K = 1)

    Args:
        embeddings: (N, D). labels: (N,) integers in [0, C).
        centers: the (D, C*K) center parameter (PML's ``fc``), normalised per column here.
        centers_per_class: K. la: lambda. gamma: the K-softmax temperature. margin: delta.
        tau: regulariser weight. reduction: ``"mean"`` (the loss above), ``"sum"`` or ``"none"``
            (per-row :math:`\ell_i`; the regulariser is added only for ``"mean"``/``"sum"``).
        reg_eps: the regulariser's smoothing (1e-5 official; see :func:`soft_triple_regularizer`).

    Computed in float64 if the embeddings or the centers are float64, else in float32.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    k = int(centers_per_class)
    acc = compute_dtype(embeddings.dtype, centers.dtype)
    x = F.normalize(embeddings.to(acc), dim=1)
    w = F.normalize(centers.to(acc), dim=0)
    n = x.shape[0]
    c = w.shape[1] // k
    s = (x @ w).view(n, c, k)
    q = torch.softmax(s / gamma, dim=2)
    sim = (q * s).sum(2)  # S_ic
    logits = la * (sim - margin * F.one_hot(labels, c).to(acc))
    rows = F.cross_entropy(logits, labels, reduction="none")
    if reduction == "none":
        return rows
    loss = rows.mean() if reduction == "mean" else rows.sum()
    if tau > 0 and k > 1:
        loss = loss + tau * soft_triple_regularizer(centers.to(acc), k, reg_eps=reg_eps)
    return loss
