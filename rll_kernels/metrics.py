"""Retrieval metrics for embeddings: Recall@K (tiled, exact) and NMI (docs/semantics.md §5).

``recall_at_k`` never builds the N x M similarity matrix: queries are taken in blocks, the gallery
in chunks, and a running top-k (value, index) list is kept per query, so memory is
O(query_block x gallery_block) whatever N and M. The ranking is exact and deterministic: higher
cosine similarity first, equal similarities broken by the lower gallery index (``torch.topk`` alone
is not stable, so ties at the top-k boundary are resolved explicitly).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_labels

__all__ = ["recall_at_k", "nmi", "nearest_neighbors"]

_NO_INDEX = torch.iinfo(torch.int64).max  # index of an empty running slot: loses every tie


def _check_matrix(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got {x.dim()}-D with shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has embedding size D = 0")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_block(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _lexi_topk(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` per row of small (B, C) candidate lists, by (value desc, index asc), exactly.

    Two stable sorts: by index, then by value (descending); equal values keep index order.
    """
    order = torch.sort(idx, dim=1, stable=True).indices
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    return vals.gather(1, order), idx.gather(1, order)


def _tile_topk(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` columns per row of a (B, C) tile, by (value desc, column asc), exactly.

    ``torch.topk`` gives the right k-th value but may pick any of several equal values at the
    boundary. A row has such a tie only when its (k+1)-th value equals its k-th; only those rows are
    redone: keep every value above the k-th, plus the lowest-column values equal to it.
    Returns (values, columns), both (B, k), in no particular order.
    """
    b, c = sim.shape
    if c <= k:
        cols = torch.arange(c, device=sim.device).expand(b, c)
        return sim, cols
    vals, cols = torch.topk(sim, k + 1, dim=1, largest=True, sorted=True)
    tied = vals[:, k] == vals[:, k - 1]
    vals, cols = vals[:, :k], cols[:, :k]
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        sub = sim if rows.numel() == b else sim.index_select(0, rows)
        top = vals.index_select(0, rows)
        kth = top[:, k - 1 : k]
        need = k - (top > kth).sum(1)  # slots left for values equal to the k-th
        r, col = (sub >= kth).nonzero().unbind(1)  # row-major: column order within a row
        is_eq = sub[r, col] == kth[r, 0]
        n_eq = torch.bincount(r[is_eq], minlength=rows.numel())
        rank = is_eq.cumsum(0) - (n_eq.cumsum(0) - n_eq)[r]  # 1-based rank among a row's ties
        keep = ~is_eq | (rank <= need[r])  # exactly k per row
        sub_cols = col[keep].view(-1, k)
        vals[rows] = sub.gather(1, sub_cols)
        cols[rows] = sub_cols
    return vals, cols


def nearest_neighbors(
    embeddings: torch.Tensor,
    k: int,
    ref: Optional[torch.Tensor] = None,
    *,
    query_block: int = 256,
    gallery_block: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most cosine-similar gallery items of every query, computed in tiles.

    Args:
        embeddings: (N, D) queries.
        k: neighbours per query; must not exceed the gallery size (M, or N - 1 when ``ref`` is None).
        ref: optional (M, D) gallery; when None the gallery is the queries themselves and each
            query's own row is excluded.
        query_block, gallery_block: tile sizes; peak extra memory is about
            ``query_block * gallery_block`` floats.

    Returns:
        (similarities, indices), both (N, k): row i lists its neighbours by decreasing cosine
        similarity, equal similarities ordered by increasing gallery index. Similarities are computed
        in fp32 (fp64 for fp64 inputs).
    """
    _check_matrix(embeddings, "embeddings")
    in_batch = ref is None
    if not in_batch:
        _check_matrix(ref, "ref")
        if ref.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref must have the embedding size D = {embeddings.shape[1]} of embeddings, "
                f"got D = {ref.shape[1]}"
            )
    qb = _check_block(query_block, "query_block")
    gb = _check_block(gallery_block, "gallery_block")
    n = embeddings.shape[0]
    m = n if in_batch else ref.shape[0]
    m_eff = m - 1 if in_batch else m
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m_eff:
        raise ValueError(
            f"k must be an int in [1, {m_eff}] (the gallery size{' N - 1' if in_batch else ''}), got {k!r}"
        )

    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    z = F.normalize(embeddings.detach().to(dtype), dim=1)
    g = z if in_batch else F.normalize(ref.detach().to(dtype), dim=1)
    out_vals = torch.empty(n, k, dtype=dtype, device=z.device)
    out_idx = torch.empty(n, k, dtype=torch.int64, device=z.device)
    for q0 in range(0, n, qb):
        zq = z[q0 : q0 + qb]
        bq = zq.shape[0]
        run_vals = torch.full((bq, k), float("-inf"), dtype=dtype, device=z.device)
        run_idx = torch.full((bq, k), _NO_INDEX, dtype=torch.int64, device=z.device)
        for g0 in range(0, m, gb):
            sim = zq @ g[g0 : g0 + gb].T
            if in_batch and g0 < q0 + bq and q0 < g0 + sim.shape[1]:
                rows = torch.arange(max(q0, g0), min(q0 + bq, g0 + sim.shape[1]), device=z.device)
                sim[rows - q0, rows - g0] = float("-inf")  # the query itself
            t_vals, t_cols = _tile_topk(sim, k)
            # running entries all have lower gallery indices than this tile's, so the index
            # tie-break of the merge is the same as over the whole gallery so far
            run_vals, run_idx = _lexi_topk(
                torch.cat([run_vals, t_vals], 1), torch.cat([run_idx, t_cols + g0], 1), k
            )
        out_vals[q0 : q0 + bq], out_idx[q0 : q0 + bq] = run_vals, run_idx
    return out_vals, out_idx


def recall_at_k(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: Iterable[int] = (1, 2, 4, 8),
    ref: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    query_block: int = 256,
    gallery_block: int = 4096,
) -> dict[int, float]:
    """Recall@K of cosine-similarity retrieval (docs/semantics.md §5.1), exact, without an N x M matrix.

    For each query the gallery (``ref``, or the other queries when ``ref`` is None, the query itself
    excluded) is ranked by cosine similarity, higher first, ties broken by the lower gallery index.
    Recall@k is the fraction of queries with an item of their own label among the top k. A k larger
    than the gallery counts the whole gallery.

    Args:
        embeddings: (N, D) query embeddings; labels: (N,) integer labels.
        ks: the cut-offs, positive ints (or a single int).
        ref, ref_labels: optional (M, D) gallery and its (M,) labels, given together.
        query_block, gallery_block: tile sizes (see :func:`nearest_neighbors`).

    Returns:
        ``{k: recall}`` with Python floats in [0, 1], in the order of ``ks``.
    """
    _check_matrix(embeddings, "embeddings")
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings is empty (N = 0): recall needs at least one query")
    labels = check_labels(labels, embeddings.shape[0], "labels", embeddings.device)
    if (ref is None) != (ref_labels is None):
        raise ValueError(
            "ref and ref_labels must be given together "
            f"(got ref={'set' if ref is not None else None}, "
            f"ref_labels={'set' if ref_labels is not None else None})"
        )
    if ref is None:
        if embeddings.shape[0] < 2:
            raise ValueError(
                "embeddings must have at least 2 rows when ref is None (each query needs "
                f"another item to retrieve), got {embeddings.shape[0]}"
            )
        gallery_labels = labels
    else:
        _check_matrix(ref, "ref")
        if ref.shape[0] == 0:
            raise ValueError("ref is empty (M = 0): recall needs a gallery")
        gallery_labels = check_labels(ref_labels, ref.shape[0], "ref_labels", ref.device)
    ks = (ks,) if isinstance(ks, int) and not isinstance(ks, bool) else tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")

    m_eff = embeddings.shape[0] - 1 if ref is None else ref.shape[0]
    kmax = min(max(ks), m_eff)
    _, idx = nearest_neighbors(embeddings, kmax, ref, query_block=query_block, gallery_block=gallery_block)
    hit = gallery_labels.to(idx.device)[idx] == labels.to(idx.device)[:, None]  # (N, kmax)
    first = torch.where(hit.any(1), hit.int().argmax(1), torch.full_like(idx[:, 0], kmax))
    return {k: float((first < min(k, kmax)).double().mean()) for k in ks}


def nmi(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    normalize: bool = True,
    n_init: int = 3,
    seed: int = 0,
) -> float:
    """Normalised mutual information between k-means clusters and the labels (docs/semantics.md §5.2).

    k-means (scikit-learn, ``n_init`` restarts, fixed ``seed``) with as many clusters as distinct
    labels, then ``sklearn.metrics.normalized_mutual_info_score`` (arithmetic mean normaliser).
    With ``normalize=True`` (default) the embeddings are L2-normalised first, matching the cosine
    geometry that :func:`recall_at_k` ranks by.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    _check_matrix(embeddings, "embeddings")
    labels = check_labels(labels, embeddings.shape[0], "labels", embeddings.device)
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings is empty (N = 0): nmi needs at least one row")
    n_clusters = int(torch.unique(labels).numel())
    x = embeddings.detach().to(torch.float64)
    if normalize:
        x = F.normalize(x, dim=1)
    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    pred = km.fit_predict(x.cpu().numpy())
    return float(normalized_mutual_info_score(labels.cpu().numpy(), pred))
