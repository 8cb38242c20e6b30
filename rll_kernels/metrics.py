"""Retrieval metrics for embeddings (docs/semantics.md §5): Recall@K, MAP@R, R-precision and
precision@k (tiled, exact), NMI, and a k-NN function for PML's AccuracyCalculator.

No metric builds the N x M similarity matrix: queries are taken in blocks, the gallery in chunks,
and a running top-k (value, index) list is kept per query block, so memory is
O(query_block x (gallery_block + k)) plus O(N) per-query results, whatever N and M. The ranking is
exact and deterministic: higher cosine similarity first, equal similarities broken by the lower
gallery index (``torch.topk`` alone is not stable, so ties at the top-k boundary are resolved
explicitly).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_labels

__all__ = [
    "TiledKNN",
    "map_at_r",
    "nearest_neighbors",
    "nmi",
    "precision_at_k",
    "r_precision",
    "recall_at_k",
    "retrieval_metrics",
]

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


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / |x| per row for finite rows of any scale (docs/semantics.md §5.1): each row is divided by
    its largest |entry| first, so that its norm neither overflows (rows above ~1.8e19 in float32)
    nor falls under F.normalize's eps (rows below 1e-12); zero rows stay zero."""
    peak = x.abs().amax(dim=1, keepdim=True)
    return F.normalize(x / torch.where(peak > 0, peak, torch.ones_like(peak)), dim=1)


def _normalized_rows(x: torch.Tensor) -> torch.Tensor:
    """Detached rows, L2-normalised, in the similarity dtype: fp64 for fp64 input, else fp32."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _unit_rows(x.detach().to(dtype))


def _tile_candidates(
    sim: torch.Tensor, above: torch.Tensor, n_above: torch.Tensor, width: int, g0: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of a (B, C) tile flagged by ``above``, packed left into (B, width), column order kept.

    Empty slots hold (-inf, ``_NO_INDEX``). Returns (values, gallery indices ``g0 + column``).
    """
    r, c = above.nonzero().unbind(1)  # row-major: ascending columns within a row
    slot = torch.arange(r.numel(), device=sim.device) - (n_above.cumsum(0) - n_above)[r]
    vals = torch.full((sim.shape[0], width), float("-inf"), dtype=sim.dtype, device=sim.device)
    idx = torch.full((sim.shape[0], width), _NO_INDEX, dtype=torch.int64, device=sim.device)
    vals[r, slot] = sim[r, c]
    idx[r, slot] = c + g0
    return vals, idx


def _blocked_topk(
    z: torch.Tensor, g: torch.Tensor, k: int, exclude_self: bool, qb: int, gb: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The top ``k`` gallery rows of each query block: yields ``(q0, similarities, indices)``, (bq, k).

    ``z`` (N, D) and ``g`` (M, D) are normalised rows; ``exclude_self`` leaves gallery row i out for
    query i (the in-batch self-match, or PML's ``ref_includes_query``). Rows are sorted by
    (similarity desc, gallery index asc); peak extra memory is about ``qb * gb + 2 * qb * k`` values.

    Each gallery tile only offers the entries above the running k-th value: an entry equal to it has
    a higher gallery index than every running entry, so it loses the tie. After the first tiles few
    entries qualify and the merge is small; a tile with more than k qualifying entries in a row goes
    through the exact tile top-k first.
    """
    n, m = z.shape[0], g.shape[0]
    for q0 in range(0, n, qb):
        zq = z[q0 : q0 + qb]
        bq = zq.shape[0]
        run_vals = torch.full((bq, k), float("-inf"), dtype=z.dtype, device=z.device)
        run_idx = torch.full((bq, k), _NO_INDEX, dtype=torch.int64, device=z.device)
        for g0 in range(0, m, gb):
            sim = zq @ g[g0 : g0 + gb].T
            if exclude_self and g0 < q0 + bq and q0 < g0 + sim.shape[1]:
                rows = torch.arange(max(q0, g0), min(q0 + bq, g0 + sim.shape[1]), device=z.device)
                sim[rows - q0, rows - g0] = float("-inf")  # the query itself
            if g0 == 0 and sim.shape[1] >= k:  # the first tile alone fills the list: nothing to merge
                run_vals, run_idx = _lexi_topk(*_tile_topk(sim, k), k)
                continue
            above = sim > run_vals[:, k - 1 :]
            n_above = torch.count_nonzero(above, dim=1)
            width = int(n_above.max())
            if width == 0:
                continue
            if width > k:
                t_vals, t_cols = _tile_topk(sim, k)
                # running entries all have lower gallery indices than this tile's, so the index
                # tie-break of the merge is the same as over the whole gallery so far
                run_vals, run_idx = _lexi_topk(
                    torch.cat([run_vals, t_vals], 1), torch.cat([run_idx, t_cols + g0], 1), k
                )
                continue
            t_vals, t_idx = _tile_candidates(sim, above, n_above, width, g0)
            # [running (by value, then index); candidates (by index, all above the running ones)]:
            # one stable sort by value keeps equal values in index order
            vals, idx = torch.cat([run_vals, t_vals], 1), torch.cat([run_idx, t_idx], 1)
            order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
            run_vals, run_idx = vals.gather(1, order), idx.gather(1, order)
        yield q0, run_vals, run_idx


def _check_gallery_matrix(embeddings: torch.Tensor, ref: torch.Tensor, name: str = "ref") -> None:
    _check_matrix(ref, name)
    if ref.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"{name} must have the embedding size D = {embeddings.shape[1]} of the queries, "
            f"got D = {ref.shape[1]}"
        )


def _check_k(k, m_eff: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m_eff:
        raise ValueError(f"k must be an int in [1, {m_eff}] (the gallery size{what}), got {k!r}")
    return k


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
        _check_gallery_matrix(embeddings, ref)
    qb = _check_block(query_block, "query_block")
    gb = _check_block(gallery_block, "gallery_block")
    n = embeddings.shape[0]
    m_eff = n - 1 if in_batch else ref.shape[0]
    k = _check_k(k, m_eff, " N - 1" if in_batch else "")
    z = _normalized_rows(embeddings)
    g = z if in_batch else _normalized_rows(ref)
    out_vals = torch.empty(n, k, dtype=z.dtype, device=z.device)
    out_idx = torch.empty(n, k, dtype=torch.int64, device=z.device)
    for q0, vals, idx in _blocked_topk(z, g, k, in_batch, qb, gb):
        out_vals[q0 : q0 + vals.shape[0]], out_idx[q0 : q0 + vals.shape[0]] = vals, idx
    return out_vals, out_idx


class TiledKNN:
    """An exact, tiled cosine k-NN with the call signature of PML's k-NN functions (docs/semantics.md §5.5).

    Pass it as ``pytorch_metric_learning.utils.accuracy_calculator.AccuracyCalculator(knn_func=
    TiledKNN())``: PML's metrics then run on exact neighbours, ties broken by the lower reference
    index, without faiss and without a query x reference matrix. Use ``k="max_bin_count"`` in the
    AccuracyCalculator: its default ``k=None`` asks for the whole ranking (N x M indices).

    ``__call__(query, k, reference, ref_includes_query=False)`` returns ``(similarities, indices)``,
    both (N, k), by decreasing cosine similarity (PML's metrics read only the indices). With
    ``ref_includes_query=True`` the first ``len(query)`` reference rows are the queries (PML checks
    this) and reference row i is left out for query i, as PML's own k-NN functions do.
    """

    def __init__(self, query_block: int = 256, gallery_block: int = 4096) -> None:
        self.query_block = _check_block(query_block, "query_block")
        self.gallery_block = _check_block(gallery_block, "gallery_block")

    def __call__(
        self, query: torch.Tensor, k: int, reference: torch.Tensor, ref_includes_query: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_matrix(query, "query")
        if reference is None:
            raise ValueError("TiledKNN needs the reference embeddings (it keeps no index between calls)")
        _check_gallery_matrix(query, reference, "reference")
        if ref_includes_query and reference.shape[0] < query.shape[0]:
            raise ValueError(
                "ref_includes_query=True needs the queries as the first rows of reference, got "
                f"{query.shape[0]} queries and {reference.shape[0]} reference rows"
            )
        m_eff = reference.shape[0] - int(bool(ref_includes_query))
        k = _check_k(k, m_eff, " minus the query itself" if ref_includes_query else "")
        z, g = _normalized_rows(query), _normalized_rows(reference)
        blocks = list(_blocked_topk(z, g, k, bool(ref_includes_query), self.query_block, self.gallery_block))
        return torch.cat([b[1] for b in blocks]), torch.cat([b[2] for b in blocks])

    def __repr__(self) -> str:
        return f"TiledKNN(query_block={self.query_block}, gallery_block={self.gallery_block})"


def _check_retrieval(
    embeddings: torch.Tensor, labels: torch.Tensor, ref: Optional[torch.Tensor], ref_labels
) -> tuple[torch.Tensor, torch.Tensor]:
    """The checks every metric shares; returns (labels, gallery labels), int64 on the embeddings' device."""
    _check_matrix(embeddings, "embeddings")
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings is empty (N = 0): a retrieval metric needs at least one query")
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
        return labels, labels
    _check_gallery_matrix(embeddings, ref)
    if ref.shape[0] == 0:
        raise ValueError("ref is empty (M = 0): retrieval needs a gallery")
    return labels, check_labels(ref_labels, ref.shape[0], "ref_labels", embeddings.device)


def _check_ks(ks) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, int) and not isinstance(ks, bool) else tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return ks


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
    labels, gallery_labels = _check_retrieval(embeddings, labels, ref, ref_labels)
    ks = _check_ks(ks)
    m_eff = embeddings.shape[0] - 1 if ref is None else ref.shape[0]
    kmax = min(max(ks), m_eff)
    _, idx = nearest_neighbors(embeddings, kmax, ref, query_block=query_block, gallery_block=gallery_block)
    hit = gallery_labels.to(idx.device)[idx] == labels.to(idx.device)[:, None]  # (N, kmax)
    first = torch.where(hit.any(1), hit.int().argmax(1), torch.full_like(idx[:, 0], kmax))
    return {k: float((first < min(k, kmax)).double().mean()) for k in ks}


# ----------------------------------------------------------------------------- MAP@R, R-precision, P@k
def _relevant_counts(labels: torch.Tensor, gallery_labels: torch.Tensor, in_batch: bool) -> torch.Tensor:
    """R per query: the gallery items with the query's label, the query itself not counted in-batch."""
    uniq, inv = torch.unique(torch.cat([labels, gallery_labels]), return_inverse=True)
    counts = torch.bincount(inv[labels.numel() :], minlength=uniq.numel())
    r = counts[inv[: labels.numel()]]
    return r - 1 if in_batch else r


def _metric_tiles(qb: int, gb: int, k: int, m: int) -> tuple[int, int]:
    """Tiles for a long top-k list: gallery tiles of at least 16k rows, the same qb * gb budget.

    A gallery tile can cost a merge (two sorts) of 2k candidates per query; with tiles not much
    longer than k those sorts, not the similarities, would dominate.
    """
    if 16 * k <= gb:
        return qb, gb
    gb_eff = min(16 * k, m)
    return max(1, (qb * gb) // gb_eff), gb_eff


def _per_query_scores(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: tuple[int, ...],
    ref: Optional[torch.Tensor],
    ref_labels: Optional[torch.Tensor],
    *,
    at_r: bool,
    query_block: int,
    gallery_block: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-query scores (float64, (N,) each) and R, from the top max(R_max, max ks) of each query.

    Keys: ``"recall@k"`` and ``"precision@k"`` for k in ``ks``, and with ``at_r`` ``"map@r"`` and
    ``"r_precision"`` (docs/semantics.md §5.4). Queries with R = 0 score 0 here; the callers leave them
    out. Processed one query block at a time: memory O(N + qb * (gb + K)), never N x K.
    """
    labels, gallery_labels = _check_retrieval(embeddings, labels, ref, ref_labels)
    qb = _check_block(query_block, "query_block")
    gb = _check_block(gallery_block, "gallery_block")
    in_batch = ref is None
    r = _relevant_counts(labels, gallery_labels, in_batch)
    z = _normalized_rows(embeddings)
    g = z if in_batch else _normalized_rows(ref)
    m = g.shape[0]
    m_eff = m - 1 if in_batch else m
    k_top = min(max(max(ks, default=1), int(r.max()) if at_r else 1), m_eff)
    qb, gb = _metric_tiles(qb, gb, k_top, m)
    names = [f"{s}@{k}" for s in ("recall", "precision") for k in ks] + (
        ["map@r", "r_precision"] if at_r else []
    )
    out = {name: torch.zeros(labels.numel(), dtype=torch.float64, device=z.device) for name in names}
    rank = torch.arange(1, k_top + 1, device=z.device, dtype=torch.float64)
    for q0, _, idx in _blocked_topk(z, g, k_top, in_batch, qb, gb):
        rows = slice(q0, q0 + idx.shape[0])
        hit = gallery_labels[idx] == labels[rows, None]  # (bq, K), by rank
        for k in ks:
            out[f"recall@{k}"][rows] = hit[:, :k].any(1).double()
            out[f"precision@{k}"][rows] = hit[:, :k].sum(1).double() / k
        if at_r:
            r_b = r[rows].double()
            hit_r = hit & (rank[None, :] <= r_b[:, None])  # hits within the first R ranks
            per_rank_precision = hit_r.cumsum(1).double() / rank  # P@j at each hit j <= R
            out["map@r"][rows] = (per_rank_precision * hit_r).sum(1) / r_b.clamp_min(1)
            out["r_precision"][rows] = hit_r.sum(1).double() / r_b.clamp_min(1)
    return out, r


def _mean_over_answerable(score: torch.Tensor, r: torch.Tensor, name: str) -> float:
    keep = r > 0
    if not bool(keep.any()):
        raise ValueError(
            f"{name} is undefined: no query has an item of its own label in the gallery "
            "(queries without one are left out, docs/semantics.md §5.4)"
        )
    return float(score[keep].mean())


def retrieval_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: Iterable[int] = (1, 2, 4, 8),
    ref: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    query_block: int = 256,
    gallery_block: int = 4096,
) -> dict[str, float]:
    """MAP@R, R-precision, precision@k and recall@k in one tiled pass (docs/semantics.md §5.4).

    Returns ``{"map@r", "r_precision", "precision@k" and "recall@k" for k in ks}``: each equals its
    function (:func:`map_at_r`, :func:`r_precision`, :func:`precision_at_k`, :func:`recall_at_k`)
    with the same arguments; one ranking serves them all.
    """
    ks = _check_ks(ks)
    scores, r = _per_query_scores(
        embeddings,
        labels,
        ks,
        ref,
        ref_labels,
        at_r=True,
        query_block=query_block,
        gallery_block=gallery_block,
    )
    out = {name: _mean_over_answerable(scores[name], r, name) for name in ("map@r", "r_precision")}
    out.update(
        {f"precision@{k}": _mean_over_answerable(scores[f"precision@{k}"], r, f"precision@{k}") for k in ks}
    )
    out.update({f"recall@{k}": float(scores[f"recall@{k}"].mean()) for k in ks})
    return out


def _one_metric(key: str, embeddings, labels, ks, ref, ref_labels, query_block, gallery_block) -> float:
    """One metric's mean: ``key`` is "map@r", "r_precision" (ks = ()) or "precision@k" (ks = (k,))."""
    scores, r = _per_query_scores(
        embeddings,
        labels,
        ks,
        ref,
        ref_labels,
        at_r=not ks,
        query_block=query_block,
        gallery_block=gallery_block,
    )
    return _mean_over_answerable(scores[key], r, key)


def map_at_r(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    query_block: int = 256,
    gallery_block: int = 4096,
) -> float:
    r"""Mean average precision at R (Musgrave et al., ECCV 2020), exact and tiled (docs/semantics.md §5.4).

    With :math:`R_i` the gallery items of query i's label (the query itself not counted in-batch) and
    :math:`\mathrm{rel}_i(j)` whether its rank-j item has its label:

    .. math::
        \mathrm{MAP@R} = \frac{1}{|Q|} \sum_{i \in Q} \frac{1}{R_i}
            \sum_{j=1}^{R_i} P_i(j)\, \mathrm{rel}_i(j), \qquad
        P_i(j) = \frac{1}{j} \sum_{l \le j} \mathrm{rel}_i(l),

    over the queries :math:`Q` with :math:`R_i > 0` (as PML's AccuracyCalculator). Ranking, ties and
    arguments as :func:`recall_at_k`; memory O(N + query_block * (gallery_block + R_max)).
    """
    return _one_metric("map@r", embeddings, labels, (), ref, ref_labels, query_block, gallery_block)


def r_precision(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    query_block: int = 256,
    gallery_block: int = 4096,
) -> float:
    r"""R-precision: the mean over queries with :math:`R_i > 0` of (hits in the top :math:`R_i`) / R_i.

    Definitions, ranking and arguments as :func:`map_at_r` (docs/semantics.md §5.4).
    """
    return _one_metric("r_precision", embeddings, labels, (), ref, ref_labels, query_block, gallery_block)


def precision_at_k(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    k: int = 1,
    ref: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    query_block: int = 256,
    gallery_block: int = 4096,
) -> float:
    r"""Precision@k: the mean over queries with :math:`R_i > 0` of (hits among the top k) / k.

    k = 1 is PML's ``precision_at_1``. A k larger than the gallery counts the hits of the whole
    gallery, still divided by k. Ranking and arguments as :func:`recall_at_k` (docs/semantics.md §5.4).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return _one_metric(
        f"precision@{k}", embeddings, labels, (k,), ref, ref_labels, query_block, gallery_block
    )


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
        x = _unit_rows(x)
    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    pred = km.fit_predict(x.cpu().numpy())
    return float(normalized_mutual_info_score(labels.cpu().numpy(), pred))
