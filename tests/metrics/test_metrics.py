"""rll_kernels.metrics: tiled Recall@K against a brute-force ranking (ties included), and NMI."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rll_kernels.metrics import nearest_neighbors, nmi, recall_at_k


# ----------------------------------------------------------------------------- brute force
def brute_neighbors(emb, k, ref=None):
    """Full similarity matrix in fp64, each row sorted by (-similarity, gallery index)."""
    z = torch.nn.functional.normalize(emb.double(), dim=1).numpy()
    g = z if ref is None else torch.nn.functional.normalize(ref.double(), dim=1).numpy()
    sim = z @ g.T
    cols = np.arange(g.shape[0])
    out = []
    for i in range(z.shape[0]):
        keep = cols != i if ref is None else np.ones_like(cols, dtype=bool)
        order = np.lexsort((cols[keep], -sim[i, keep]))  # last key is primary
        out.append(cols[keep][order][:k])
    return np.stack(out)


def brute_recall(emb, labels, ks, ref=None, ref_labels=None):
    gl = (labels if ref is None else ref_labels).numpy()
    m = emb.shape[0] - 1 if ref is None else ref.shape[0]
    idx = brute_neighbors(emb, m, ref)  # the whole ranking
    hit = gl[idx] == labels.numpy()[:, None]
    return {k: float(np.mean(hit[:, :k].any(1))) for k in ks}


def quantised(n, d=8, nnz=4, gen=None):
    """Rows with exactly ``nnz`` entries of +-1 (nnz a perfect square), scaled by powers of two:
    normalisation and every dot product are exact in fp32, so many similarities tie exactly."""
    e = torch.zeros(n, d)
    for i in range(n):
        pos = torch.randperm(d, generator=gen)[:nnz]
        e[i, pos] = torch.randint(0, 2, (nnz,), generator=gen).float() * 2 - 1
    scale = 2.0 ** torch.randint(-3, 4, (n, 1), generator=gen).float()
    return e * scale


TILES = [(7, 5), (1, 1), (64, 33), (256, 4096)]


# ----------------------------------------------------------------------------- nearest_neighbors
@pytest.mark.parametrize("qb, gb", TILES)
def test_neighbors_match_brute_force_with_exact_ties(qb, gb):
    e = quantised(150)
    sims, idx = nearest_neighbors(e, 9, query_block=qb, gallery_block=gb)
    ref_idx = brute_neighbors(e, 9)
    # the data must really have ties at the top-k boundary, or this tests nothing about the tie rule
    z = torch.nn.functional.normalize(e.double(), dim=1)
    full = z @ z.T
    full.fill_diagonal_(-2)
    top = full.sort(1, descending=True).values
    assert (top[:, 8] == top[:, 9]).float().mean() > 0.5
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    # returned similarities are the cosine similarities of the returned items, non-increasing
    np.testing.assert_allclose(sims.double().numpy(), np.take_along_axis(full.numpy(), ref_idx, 1), atol=1e-6)
    assert bool((sims[:, 1:] <= sims[:, :-1]).all())


@pytest.mark.parametrize("qb, gb", TILES)
def test_neighbors_with_ref_match_brute_force(qb, gb):
    q, g = quantised(60), quantised(130)
    g[100:] = g[:30]  # exact duplicates at higher indices: the lower index must come first
    _, idx = nearest_neighbors(q, 12, g, query_block=qb, gallery_block=gb)
    np.testing.assert_array_equal(idx.numpy(), brute_neighbors(q, 12, g))


def test_neighbors_continuous_fp64_and_fp16():
    e = torch.randn(97, 5, dtype=torch.float64)
    _, idx = nearest_neighbors(e, 96, query_block=10, gallery_block=13)
    np.testing.assert_array_equal(idx.numpy(), brute_neighbors(e, 96))
    # half precision input: computed in fp32, exact for quantised data
    h = quantised(80).half()
    _, idx = nearest_neighbors(h, 5, query_block=9, gallery_block=11)
    np.testing.assert_array_equal(idx.numpy(), brute_neighbors(h.float(), 5))


def test_all_identical_rows_rank_by_index():
    e = torch.ones(20, 3)
    _, idx = nearest_neighbors(e, 19, query_block=3, gallery_block=4)
    for i in range(20):
        assert idx[i].tolist() == [j for j in range(20) if j != i]


# ----------------------------------------------------------------------------- recall_at_k
def test_recall_tie_rule_hand_example():
    # query 0 is equally similar to items 1 and 2; the lower index (1) ranks first
    e = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 0.0]])
    q = e[:1]
    assert recall_at_k(q, torch.tensor([0]), (1, 2), ref=e[1:3], ref_labels=torch.tensor([1, 0])) == {
        1: 0.0,
        2: 1.0,
    }
    assert recall_at_k(q, torch.tensor([0]), (1, 2), ref=e[1:3], ref_labels=torch.tensor([0, 1])) == {
        1: 1.0,
        2: 1.0,
    }
    # and a scaled copy is still a tie (cosine similarity)
    g = torch.stack([e[1] * 4, e[2]])
    assert recall_at_k(q, torch.tensor([0]), (1,), ref=g, ref_labels=torch.tensor([1, 0])) == {1: 0.0}


@pytest.mark.parametrize("qb, gb", [(7, 5), (256, 4096)])
def test_recall_matches_brute_force_in_batch(qb, gb):
    e = quantised(140)
    labels = torch.randint(0, 6, (140,))
    ks = (1, 2, 4, 8, 16, 500)  # 500 > gallery: the whole gallery counts
    got = recall_at_k(e, labels, ks, query_block=qb, gallery_block=gb)
    want = brute_recall(e, labels, ks)
    assert list(got) == list(ks)
    assert got == pytest.approx(want, abs=1e-12)
    assert got[500] == 1.0  # every label occurs at least twice here
    assert 0.0 < got[1] < got[16]


def test_recall_matches_brute_force_with_ref():
    q, g = quantised(50), quantised(90)
    ql, gl = torch.randint(0, 4, (50,)), torch.randint(0, 4, (90,))
    ks = (1, 3, 8)
    got = recall_at_k(q, ql, ks, ref=g, ref_labels=gl, query_block=16, gallery_block=17)
    assert got == pytest.approx(brute_recall(q, ql, ks, g, gl), abs=1e-12)


def test_recall_perfect_and_tile_invariant():
    # two well-separated clusters: R@1 = 1
    e = torch.cat([torch.randn(30, 4) * 0.01 + 5, torch.randn(30, 4) * 0.01 - 5])
    lab = torch.tensor([0] * 30 + [1] * 30)
    assert recall_at_k(e, lab, (1,)) == {1: 1.0}
    assert recall_at_k(e, lab, 3) == {3: 1.0}
    x, y = torch.randn(300, 6), torch.randint(0, 10, (300,))
    results = [
        recall_at_k(x, y, (1, 2, 4, 8), query_block=qb, gallery_block=gb)
        for qb, gb in [(7, 5), (64, 33), (256, 4096), (300, 1)]
    ]
    assert all(r == results[0] for r in results)


def test_recall_errors():
    e, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        recall_at_k(e[0], y)
    with pytest.raises(ValueError, match="labels must have 5 entries"):
        recall_at_k(e, y[:4])
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        recall_at_k(e, y.float())
    with pytest.raises(ValueError, match="ref and ref_labels must be given together"):
        recall_at_k(e, y, ref=e)
    with pytest.raises(ValueError, match="ks must be"):
        recall_at_k(e, y, ks=(0, 1))
    with pytest.raises(ValueError, match="ks must be"):
        recall_at_k(e, y, ks=())
    with pytest.raises(ValueError, match="at least 2 rows"):
        recall_at_k(e[:1], y[:1])
    with pytest.raises(ValueError, match="NaN or Inf"):
        recall_at_k(torch.full((3, 2), float("nan")), y[:3])
    with pytest.raises(ValueError, match="query_block must be a positive int"):
        recall_at_k(e, y, query_block=0)
    with pytest.raises(ValueError, match="ref must have the embedding size D = 3"):
        recall_at_k(e, y, ref=torch.randn(4, 2), ref_labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\]"):
        nearest_neighbors(e, 5)


# ----------------------------------------------------------------------------- row scale
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_of_any_scale_rank_as_their_unit_rows(dtype):
    """Rows of norm 1e30 and 1e-30 (F.normalize alone gives 0 rows and unnormalised rows there) and a
    zero row: neighbours, recall, MAP@R and NMI equal those of the unit rows (docs/semantics.md §5.1)."""
    from rll_kernels.metrics import retrieval_metrics

    gen = torch.Generator().manual_seed(7)
    unit = torch.nn.functional.normalize(torch.randn(60, 12, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 5, (60,), generator=gen)
    scale = torch.tensor([1e30, 1e-30, 1.0], dtype=torch.float64)[torch.arange(60) % 3]
    unit[59] = 0.0  # a zero row stays zero: similarity 0 to every row
    e = (unit * scale[:, None]).to(dtype)
    assert bool(torch.isfinite(e).all()) and float(e[1].abs().max()) > 0  # no under/overflow in the input
    want_v, want_i = nearest_neighbors(unit.to(dtype), 10)
    got_v, got_i = nearest_neighbors(e, 10)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(got_v, want_v, atol=tol, rtol=0)
    assert torch.equal(got_i, want_i)
    ks = (1, 4)
    assert retrieval_metrics(e, labels, ks) == retrieval_metrics(unit.to(dtype), labels, ks)
    assert nmi(e, labels) == pytest.approx(nmi(unit.to(dtype), labels), abs=1e-12)


# ----------------------------------------------------------------------------- nmi
def test_nmi_separated_clusters_and_random():
    centers = torch.eye(5) * 10
    lab = torch.arange(5).repeat_interleave(40)
    e = centers[lab] + torch.randn(200, 5) * 0.1
    assert nmi(e, lab) == pytest.approx(1.0)
    assert nmi(e, (lab + 3) % 5) == pytest.approx(1.0)  # label names do not matter
    assert nmi(torch.randn(200, 5), lab) < 0.15
    with pytest.raises(ValueError, match="labels must have 3 entries"):
        nmi(e[:3], lab)


# ----------------------------------------------------------------------------- 60k x 60k
_LARGE = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np, torch
    import rll_kernels.metrics as M
    torch.set_num_threads(1)
    n, d = 60000, 16
    gen = torch.Generator().manual_seed(1234)
    x = (torch.randint(0, 2, (n, d), generator=gen) * 2 - 1).float()  # +-1: 17 exact similarity values
    y = torch.randint(0, 10, (n,), generator=gen)
    captured = {}
    real = M.nearest_neighbors
    def spy(*a, **kw):
        out = real(*a, **kw)
        captured["idx"] = out[1]
        return out
    M.nearest_neighbors = spy
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    r = M.recall_at_k(x, y, (1, 2, 4, 8))
    sec = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(sys.argv[1], captured["idx"].numpy())
    out = {"recall": {str(k): v for k, v in r.items()}, "rss_growth_kb": after - before, "sec": sec}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_recall_60k_by_60k_bounded_memory_and_exact(tmp_path):
    out = tmp_path / "idx.npy"
    # one thread: the run time stays predictable (~30 s) on a shared machine, where two contending
    # OpenMP threads can be several times slower
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _LARGE, str(out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # an N x N fp32 matrix would be 60000^2 * 4 B = 14.4 GB; the tiles are 256 x 4096 x 4 B = 4 MB
    assert res["rss_growth_kb"] < 512 * 1024, res
    idx = np.load(out)
    n = 60000
    gen = torch.Generator().manual_seed(1234)
    x = (torch.randint(0, 2, (n, 16), generator=gen) * 2 - 1).float()
    y = torch.randint(0, 10, (n,), generator=gen).numpy()
    # recall from the returned neighbours
    hit = y[idx] == y[:, None]
    for k in (1, 2, 4, 8):
        assert res["recall"][str(k)] == pytest.approx(hit[:, :k].any(1).mean(), abs=1e-12)
    # the neighbours of sampled queries equal the brute-force ranking over all 60,000 items
    rows = np.random.default_rng(0).choice(n, 40, replace=False)
    xd = x.double().numpy()
    sim = (xd[rows] @ xd.T) / 16.0
    cols = np.arange(n)
    for r, s in zip(rows, sim):
        keep = cols != r
        want = cols[keep][np.lexsort((cols[keep], -s[keep]))][:8]
        np.testing.assert_array_equal(idx[r], want)
