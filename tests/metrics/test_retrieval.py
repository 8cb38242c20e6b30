"""MAP@R, R-precision, precision@k (docs/semantics.md §5.4) and the k-NN function for PML (§5.5).

Against a brute-force computation (full fp64 similarity matrix, each row ranked by np.lexsort on
(-similarity, index), the metrics written out from their definitions) on data with exact ties,
duplicates and classes of one element, in-batch and with ``ref``; against PML 2.9.0's
AccuracyCalculator, both with our TiledKNN and with PML's own CustomKNN; and at 60,000 rows in a
subprocess (bounded memory, exact on sampled queries).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rll_kernels import metrics as M

KS = (1, 3, 5, 500)  # 500 > every gallery here: the whole gallery counts, divided by 500


# ----------------------------------------------------------------------------- brute force
def ranked_relevance(sim_row, gallery_labels, label, keep):
    """Relevance (same label) of the kept gallery items, in rank order (-similarity, then index)."""
    cols = np.arange(sim_row.shape[0])[keep]
    order = np.lexsort((cols, -sim_row[keep]))  # the last key is the primary one
    return gallery_labels[cols[order]] == label


def row_scores(rel, ks):
    """Every metric of one query from its ranked relevance vector, straight from the definitions."""
    r = int(rel.sum())
    out = {f"recall@{k}": float(rel[:k].any()) for k in ks}
    out.update({f"precision@{k}": rel[:k].sum() / k for k in ks})
    hits_at = [j for j in range(1, r + 1) if rel[j - 1]]  # ranks j <= R holding a hit
    out["map@r"] = sum(rel[:j].sum() / j for j in hits_at) / r if r else 0.0
    out["r_precision"] = rel[:r].sum() / r if r else 0.0
    return out, r


def brute_force(emb, labels, ks, ref=None, ref_labels=None):
    """The means of §5.4: recall over all queries, the others over queries with R > 0."""
    z = torch.nn.functional.normalize(emb.double(), dim=1).numpy()
    g = z if ref is None else torch.nn.functional.normalize(ref.double(), dim=1).numpy()
    gl = (labels if ref is None else ref_labels).numpy()
    sim = z @ g.T
    rows, rs = [], []
    for i in range(z.shape[0]):
        keep = np.arange(g.shape[0]) != i if ref is None else np.ones(g.shape[0], dtype=bool)
        scores, r = row_scores(ranked_relevance(sim[i], gl, labels[i].item(), keep), ks)
        rows.append(scores)
        rs.append(r)
    answerable = [s for s, r in zip(rows, rs) if r > 0]
    out = {
        key: float(np.mean([s[key] for s in answerable])) for key in rows[0] if not key.startswith("recall")
    }
    out.update({f"recall@{k}": float(np.mean([s[f"recall@{k}"] for s in rows])) for k in ks})
    return out


def quantised(n, d=8, nnz=4, gen=None):
    """Rows of +-1 in ``nnz`` (a perfect square) places, scaled by powers of two: normalisation and
    every dot product are exact in fp32, so many similarities tie exactly."""
    e = torch.zeros(n, d)
    for i in range(n):
        pos = torch.randperm(d, generator=gen)[:nnz]
        e[i, pos] = torch.randint(0, 2, (nnz,), generator=gen).float() * 2 - 1
    return e * 2.0 ** torch.randint(-3, 4, (n, 1), generator=gen).float()


def tie_data(n, n_cls):
    """Quantised rows with exact duplicates and a few classes of one element."""
    e = quantised(n)
    e[n - 10 :] = e[:10]  # duplicates at higher indices
    y = torch.randint(0, n_cls, (n,))
    y[:4] = torch.arange(1000, 1004)  # singletons: no same-label item in-batch
    return e, y


def assert_metrics_equal(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


TILES = [(7, 5), (1, 3), (64, 33), (256, 4096)]


# ----------------------------------------------------------------------------- against brute force
@pytest.mark.parametrize("qb, gb", TILES)
def test_matches_brute_force_in_batch_with_ties(qb, gb):
    e, y = tie_data(300, 40)
    got = M.retrieval_metrics(e, y, KS[:3], query_block=qb, gallery_block=gb)
    assert_metrics_equal(got, brute_force(e, y, KS[:3]))
    # short lists (K = R_max): small tiles really split the gallery, so the merges are exercised
    r_max = int(M._relevant_counts(y, y, True).max())
    if gb < 100:
        assert M._metric_tiles(qb, gb, r_max, 300)[1] < 299, r_max
    # the data has ties among the ranked lists, or this would test nothing about the tie rule
    z = torch.nn.functional.normalize(e.double(), dim=1)
    full = (z @ z.T).fill_diagonal_(-2).sort(1, descending=True).values
    assert (full[:, :-1] == full[:, 1:]).any(1).float().mean() > 0.9
    assert 0.0 < got["map@r"] < got["r_precision"] < 1.0


def test_k_beyond_the_gallery_counts_the_whole_gallery():
    e, y = tie_data(120, 9)
    assert_metrics_equal(M.retrieval_metrics(e, y, KS, query_block=7, gallery_block=5), brute_force(e, y, KS))


@pytest.mark.parametrize("qb, gb", [(7, 5), (256, 4096)])
def test_matches_brute_force_with_ref(qb, gb):
    q, g = quantised(70), quantised(130)
    g[100:] = g[:30]
    ql, gl = torch.randint(0, 6, (70,)), torch.randint(0, 5, (130,))  # label 5: not in the gallery
    assert bool((ql == 5).any())
    got = M.retrieval_metrics(q, ql, KS, ref=g, ref_labels=gl, query_block=qb, gallery_block=gb)
    assert_metrics_equal(got, brute_force(q, ql, KS, g, gl))


def test_matches_brute_force_continuous_fp64_and_long_lists():
    # R up to ~120 with gallery tiles of 8: the tiles widen to 16 R, the product qb * gb is kept
    e = torch.randn(230, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (230,))
    got = M.retrieval_metrics(e, y, (1, 7), query_block=16, gallery_block=8)
    assert_metrics_equal(got, brute_force(e, y, (1, 7)))
    assert M._metric_tiles(16, 8, 120, 230) == (1, 230)
    assert M._metric_tiles(256, 4096, 100, 10**6) == (256, 4096)
    assert M._metric_tiles(256, 4096, 1000, 10**6) == (65, 16000)


def test_single_metric_functions_equal_the_combined_pass():
    e, y = tie_data(90, 7)
    q, g = quantised(40), quantised(60)
    ql, gl = torch.randint(0, 4, (40,)), torch.randint(0, 4, (60,))
    for args, kw in (((e, y), {}), ((q, ql), dict(ref=g, ref_labels=gl))):
        all_ = M.retrieval_metrics(*args, ks=(1, 4), **kw, query_block=9, gallery_block=11)
        assert M.map_at_r(*args, **kw, query_block=9, gallery_block=11) == all_["map@r"]
        assert M.r_precision(*args, **kw) == pytest.approx(all_["r_precision"], abs=1e-15)
        assert M.precision_at_k(*args, 4, **kw) == pytest.approx(all_["precision@4"], abs=1e-15)
        assert M.precision_at_k(*args, **kw) == pytest.approx(all_["precision@1"], abs=1e-15)
        recall = M.recall_at_k(*args, (1, 4), **kw)
        assert recall == {1: all_["recall@1"], 4: all_["recall@4"]}


def test_hand_example():
    # query 0 (label 0); gallery ranked by cosine: g1 (label 0), g2 and g3 tie (labels 1, 0: the
    # lower index, g2, ranks first), g4 (label 0). R = 3, relevance 1 0 1 | 1.
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[1.0, 0.1], [1.0, 0.5], [1.0, -0.5], [0.0, 1.0]])
    gl = torch.tensor([0, 1, 0, 0])
    kw = dict(ref=g, ref_labels=gl)
    assert M.map_at_r(q, torch.tensor([0]), **kw) == pytest.approx((1 + 2 / 3) / 3)
    assert M.r_precision(q, torch.tensor([0]), **kw) == pytest.approx(2 / 3)
    assert M.precision_at_k(q, torch.tensor([0]), 2, **kw) == 0.5
    assert M.precision_at_k(q, torch.tensor([0]), 8, **kw) == 3 / 8  # k > M: the whole gallery / k
    # swapping the tied pair's labels moves the hit up: relevance 1 1 0 | 1
    gl2 = torch.tensor([0, 0, 1, 0])
    assert M.map_at_r(q, torch.tensor([0]), ref=g, ref_labels=gl2) == pytest.approx(2 / 3)


def test_queries_without_positives_are_left_out():
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 2])  # labels 1 and 2 occur once: those queries are left out
    assert M.map_at_r(e, y) == 1.0 and M.r_precision(e, y) == 1.0 and M.precision_at_k(e, y, 1) == 1.0
    assert M.recall_at_k(e, y, 1) == {1: 0.5}  # recall counts every query (§5.1)
    with pytest.raises(ValueError, match="map@r is undefined: no query has an item of its own label"):
        M.map_at_r(e, torch.arange(4))
    with pytest.raises(ValueError, match="precision@2 is undefined"):
        M.precision_at_k(e[:2], torch.tensor([0, 1]), 2, ref=e[2:], ref_labels=torch.tensor([2, 3]))


def test_errors():
    e, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="k must be a positive int"):
        M.precision_at_k(e, y, 0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        M.precision_at_k(e, y, (1, 2))
    with pytest.raises(ValueError, match="ref and ref_labels must be given together"):
        M.map_at_r(e, y, ref=e)
    with pytest.raises(ValueError, match="labels must have 5 entries"):
        M.r_precision(e, y[:4])
    with pytest.raises(ValueError, match="at least 2 rows"):
        M.map_at_r(e[:1], y[:1])
    with pytest.raises(ValueError, match="ref must have the embedding size D = 3"):
        M.map_at_r(e, y, ref=torch.randn(4, 2), ref_labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="gallery_block must be a positive int"):
        M.retrieval_metrics(e, y, gallery_block=0)
    with pytest.raises(ValueError, match="ks must be"):
        M.retrieval_metrics(e, y, ks=())


# ----------------------------------------------------------------------------- PML 2.9.0
PML_METRICS = ("precision_at_1", "mean_average_precision_at_r", "r_precision")


def pml_calculator(knn_func, k="max_bin_count"):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    return AccuracyCalculator(include=PML_METRICS, k=k, knn_func=knn_func, device=torch.device("cpu"))


def as_pml(ours):
    return {
        "precision_at_1": ours["precision@1"],
        "mean_average_precision_at_r": ours["map@r"],
        "r_precision": ours["r_precision"],
    }


def assert_pml_equal(pml, ours):
    for key, v in as_pml(ours).items():
        assert pml[key] == pytest.approx(v, abs=1e-12), key


def test_pml_accuracy_calculator_with_tiled_knn_matches_brute_force():
    knn = M.TiledKNN(query_block=7, gallery_block=13)
    e, y = tie_data(120, 9)
    # reference=None: PML ranks the queries against themselves (ref_includes_query), self left out
    assert_pml_equal(pml_calculator(knn).get_accuracy(e, y), brute_force(e, y, (1,)))
    # separate reference, some query labels absent from it
    q, g = quantised(50), quantised(110)
    g[90:] = g[:20]
    ql, gl = torch.randint(0, 6, (50,)), torch.randint(0, 5, (110,))
    assert_pml_equal(pml_calculator(knn).get_accuracy(q, ql, g, gl), brute_force(q, ql, (1,), g, gl))
    # ref_includes_query with a larger reference: query i is reference row i, and only it is left out
    ref, ref_l = torch.cat([q, g]), torch.cat([ql, gl])
    got = pml_calculator(knn).get_accuracy(q, ql, ref, ref_l, ref_includes_query=True)
    sim = (
        torch.nn.functional.normalize(q.double(), dim=1)
        @ torch.nn.functional.normalize(ref.double(), dim=1).T
    )
    rows = [
        row_scores(ranked_relevance(sim[i].numpy(), ref_l.numpy(), ql[i].item(), np.arange(160) != i), (1,))
        for i in range(50)
    ]
    kept = [s for s, r in rows if r > 0]
    want = {key: float(np.mean([s[key] for s in kept])) for key in ("precision@1", "map@r", "r_precision")}
    assert_pml_equal(got, want)
    # and our functions agree with PML on the first two set-ups
    assert_pml_equal(pml_calculator(knn).get_accuracy(e, y), M.retrieval_metrics(e, y, (1,)))


def well_separated(n, d, gen, gap=1e-5):
    """Gaussian rows whose cosine similarities differ by more than ``gap`` within every row (drawn
    again until they do), so an fp32 k-NN of any summation order ranks them as fp64 does."""
    for _ in range(100):
        x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        z = torch.nn.functional.normalize(x, dim=1)
        s = (z @ z.T).fill_diagonal_(float("inf")).sort(1).values[:, :-1]
        if bool((s[:, 1:] - s[:, :-1]).min() > gap):
            return x.float()
    raise AssertionError("no well-separated draw")


def test_pml_accuracy_calculator_with_its_own_knn_matches_ours():
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    gen = torch.Generator().manual_seed(5)
    x = well_separated(60, 3, gen)
    y = torch.randint(0, 5, (60,), generator=gen)
    y[0] = 99  # a query with no positive
    for k in ("max_bin_count", None):
        got = pml_calculator(CustomKNN(CosineSimilarity()), k=k).get_accuracy(x, y)
        assert_pml_equal(got, M.retrieval_metrics(x, y, (1,)))


def test_pml_default_knn_needs_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        # PML's default k-NN (FaissKNN) cannot even be built without faiss; TiledKNN is the way out
        with pytest.raises(NameError, match="faiss"):
            pml_calculator(None)
        pytest.skip("faiss is not installed: PML's default k-NN cannot run here (checked that it fails)")
    gen = torch.Generator().manual_seed(6)
    x = well_separated(60, 3, gen)
    y = torch.randint(0, 5, (60,), generator=gen)
    assert_pml_equal(pml_calculator(None).get_accuracy(x, y), M.retrieval_metrics(x, y, (1,)))


def test_tiled_knn_contract():
    knn = M.TiledKNN(query_block=5, gallery_block=7)
    q, g = quantised(30), quantised(50)
    sims, idx = knn(q, 6, g)
    want = M.nearest_neighbors(q, 6, g)
    assert torch.equal(idx, want[1]) and torch.equal(sims, want[0])
    # ref_includes_query with reference = queries: the in-batch ranking
    assert torch.equal(knn(q, 29, q, True)[1], M.nearest_neighbors(q, 29)[1])
    with pytest.raises(ValueError, match="needs the reference embeddings"):
        knn(q, 3, None)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 29\]"):
        knn(q, 30, q, True)
    with pytest.raises(ValueError, match="queries as the first rows of reference"):
        knn(q, 3, q[:10], True)
    with pytest.raises(ValueError, match="query_block must be a positive int"):
        M.TiledKNN(query_block=0)
    assert repr(knn) == "TiledKNN(query_block=5, gallery_block=7)"


# ----------------------------------------------------------------------------- 60k x 60k
_LARGE = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np, torch
    import rll_kernels.metrics as M
    torch.set_num_threads(1)
    n, d, n_cls = 60000, 16, 6000  # about 10 items per class, as Stanford Online Products
    gen = torch.Generator().manual_seed(4321)
    x = (torch.randint(0, 2, (n, d), generator=gen) * 2 - 1).float()  # +-1: 17 exact similarity values
    y = torch.randint(0, n_cls, (n,), generator=gen)
    captured = {}
    real = M._per_query_scores
    def spy(*a, **kw):
        out = real(*a, **kw)
        captured["scores"], captured["r"] = out
        return out
    M._per_query_scores = spy
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = M.retrieval_metrics(x, y, ks=(1, 5))
    sec = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    arrays = {k: v.numpy() for k, v in captured["scores"].items()}
    np.savez(sys.argv[1], r=captured["r"].numpy(), **{k.replace("@", "_at_"): v for k, v in arrays.items()})
    print(json.dumps({"metrics": res, "rss_growth_kb": after - before, "sec": sec}))
""")


@pytest.mark.slow
def test_metrics_60k_by_60k_bounded_memory_and_exact(tmp_path):
    out = tmp_path / "scores.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # predictable on a shared machine
    proc = subprocess.run(
        [sys.executable, "-c", _LARGE, str(out)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # an N x N fp32 matrix would be 14.4 GB; the tiles are 256 x 4096 x 4 B = 4 MB
    assert res["rss_growth_kb"] < 512 * 1024, res
    scores = np.load(out)
    n = 60000
    gen = torch.Generator().manual_seed(4321)
    x = (torch.randint(0, 2, (n, 16), generator=gen) * 2 - 1).double().numpy()
    y = torch.randint(0, 6000, (n,), generator=gen).numpy()
    r = scores["r"]
    assert r.max() >= 20 and (r == 0).any() and (r == np.bincount(y, minlength=6000)[y] - 1).all()
    # the returned means are the means of the per-query scores
    keep = r > 0
    for key in ("map@r", "r_precision", "precision@1", "precision@5"):
        assert res["metrics"][key] == pytest.approx(scores[key.replace("@", "_at_")][keep].mean(), abs=1e-12)
    # the scores of sampled queries equal the brute force over all 60,000 items
    rows = np.random.default_rng(0).choice(n, 30, replace=False)
    sim = (x[rows] @ x.T) / 16.0
    for i, s in zip(rows, sim):
        want, r_i = row_scores(ranked_relevance(s, y, y[i], np.arange(n) != i), (1, 5))
        assert r_i == r[i]
        for key, v in want.items():
            assert scores[key.replace("@", "_at_")][i] == pytest.approx(v, abs=1e-12), (i, key)
