"""Ranked List Loss: every fused backend against the dense reference, backend x dtype x shape.

float64 to a relative error of 1e-10, float32 within the tolerance derived from the float32
reference's own error (tests/tolerance.py), fp16/bf16 against the reference on what the kernel reads
(docs/semantics.md §1.2); odd sizes, ``ref_emb`` galleries, every reduction with a per-row upstream
gradient, hyper-parameters across the domain (§2.2), ids and the bias row count (§1.5, §2.7).
The backends come from the registry (tests/conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F
from rll_cases import grad_or_zeros, make_batch, run_loss
from tolerance import assert_close_derived, assert_close_fp64

import rll_kernels
from rll_kernels import reference

fused = rll_kernels.ranked_list_loss
SIZES_N = [1, 2, 3, 37, 129, 1000]
SIZES_D = [1, 3, 64, 300]
FP64, FP32 = torch.float64, torch.float32


def _runs(backend, emb, labels, ref, ref_labels, sem, red, dtype, grad_out=None, **hp):
    """(loss, grad emb, grad ref) of ``backend`` and of the reference, on the inputs cast to ``dtype``."""
    kw = dict(semantics=sem, reduction=red, **hp)
    args = (emb.to(dtype), labels, None if ref is None else ref.to(dtype), ref_labels, grad_out)
    a = run_loss(lambda *x, **k: fused(*x, backend=backend, **k), *args, **kw)
    b = run_loss(reference.ranked_list_loss, *args, **kw)
    return a, b


def _check(backend, emb, labels, ref, ref_labels, sem, red, **hp):
    """float64 to 1e-10, then float32 within the derived tolerance (D = 1: see _check_d1)."""
    n = emb.shape[0]
    g = torch.rand(n, dtype=torch.float64, device=emb.device) + 0.5 if red == "none" else None
    if emb.shape[1] == 1:
        for dt in (torch.float64, torch.float32):
            _check_d1(backend, emb, labels, ref, ref_labels, sem, red, g, dt, **hp)
        return
    (l64, e64, r64), (L64, E64, R64) = _runs(backend, emb, labels, ref, ref_labels, sem, red, FP64, g, **hp)
    assert_close_fp64(l64, L64, "loss fp64")
    assert_close_fp64(e64, E64, "grad emb fp64")
    if sem == "pml" and ref is not None:
        assert_close_fp64(r64, R64, "grad ref fp64")
    (l32, e32, r32), (L32, E32, R32) = _runs(backend, emb, labels, ref, ref_labels, sem, red, FP32, g, **hp)
    assert torch.isfinite(l32).all() and torch.isfinite(e32).all()
    assert_close_derived(l32, L32, L64, "loss fp32")
    assert_close_derived(e32, E32, E64, "grad emb fp32")
    if sem == "pml" and ref is not None:
        assert_close_derived(r32, R32, R64, "grad ref fp32")


def _check_d1(backend, emb, labels, ref, ref_labels, sem, red, g, dt, **hp):
    # D = 1: normalised embeddings are +-1, every pair is a duplicate (d = 0) or opposite (d = 2),
    # and the tangent space of the sphere is empty, so the true gradient is exactly 0: both the
    # kernel and the reference return rounding noise of the pre-projection gradient (O(N) terms),
    # which the normalisation's backward divides by |e_i| (docs/semantics.md §1.4)
    (l, e, r), (L, E, R) = _runs(backend, emb, labels, ref, ref_labels, sem, red, dt, g, **hp)
    assert_close_fp64(l.double(), L.double(), f"loss D=1 {dt}", rtol=10 * torch.finfo(dt).eps)
    m = emb.shape[0] + (0 if ref is None else ref.shape[0])
    noise = 8 * m * torch.finfo(dt).eps / emb.double().abs().clamp_max(1.0)
    assert (e.abs() <= noise).all() and (E.abs() <= noise).all(), (e, E, noise)


@pytest.mark.parametrize("d", SIZES_D)
@pytest.mark.parametrize("n", SIZES_N)
@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_in_batch_sizes(backend, device, skip_if_interpreted_above, n, d, sem):
    skip_if_interpreted_above(n, n, d)
    emb, labels, _, _ = make_batch(n, d, device=device)
    for red in ("mean", "sum", "none"):
        _check(backend, emb, labels, None, None, sem, red, Tp=0.0)


@pytest.mark.parametrize("d", SIZES_D)
@pytest.mark.parametrize("n", SIZES_N)
@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_ref_emb_sizes(backend, device, skip_if_interpreted_above, n, d, sem):
    m = {1: 5, 2: 1, 3: 700, 37: 64, 129: 513, 1000: 1031}[n]
    skip_if_interpreted_above(n, m, d)
    emb, labels, ref, ref_labels = make_batch(n, d, m=m, device=device)
    for red in ("mean", "none"):
        _check(backend, emb, labels, ref, ref_labels, sem, red, Tp=0.0)


@pytest.mark.parametrize("sem", ["paper", "pml"])
@pytest.mark.parametrize(
    "hp",
    [
        dict(margin=0.4, Tn=10.0, Tp=0.0, imbalance=0.5),
        dict(margin=0.2, Tn=3.0, Tp=-10.0, imbalance=0.3, alpha=1.4),
        dict(margin=0.6, Tn=0.0, Tp=7.0, imbalance=0.9, alpha=1.0),
        dict(margin=0.4, Tn=100.0, Tp=50.0, imbalance=0.5),
    ],
    ids=["default", "negTp", "Tn0", "hot"],
)
def test_hyper_parameters(backend, device, sem, hp):
    emb, labels, _, _ = make_batch(77, 24, device=device)
    _check(backend, emb, labels, None, None, sem, "mean", **hp)


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_clustered_embeddings_many_active_pairs(backend, device, skip_if_interpreted_above, sem):
    # tight classes, so most negatives and positives are non-trivial: every tile path is exercised
    n, d = 300, 16
    skip_if_interpreted_above(n, n, d)
    centers = torch.randn(8, d, dtype=torch.float64)
    labels = torch.randint(0, 8, (n,))
    emb = centers[labels] + 0.6 * torch.randn(n, d, dtype=torch.float64)
    _check(backend, emb.to(device), labels.to(device), None, None, sem, "mean")


@pytest.mark.parametrize("n, d", [(256, 512), (255, 512), (320, 40), (319, 40)])
@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_in_batch_kernel_thresholds(backend, device, skip_if_interpreted_above, sem, n, d):
    # either side of the sizes where the in-batch "paper" forward takes tile pairs (N = 320, and 256
    # from D = 512: csrc/rll_cpu.cpp symmetric_grad_fits) and the "pml" one (N = 256), on classes
    # around one shared direction (66-90% of the negatives inside alpha, 47-69% of the positives
    # beyond beta)
    skip_if_interpreted_above(n, n, d)
    g = torch.Generator().manual_seed(n + d)
    u = F.normalize(torch.randn(d, dtype=torch.float64, generator=g), dim=0)
    centers = u + torch.randn(16, d, dtype=torch.float64, generator=g) / d**0.5
    labels = torch.randint(0, 16, (n,), generator=g)
    emb = centers[labels] + torch.randn(n, d, dtype=torch.float64, generator=g) / d**0.5
    for red in ("mean", "none"):
        _check(backend, emb.to(device), labels.to(device), None, None, sem, red)


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_all_same_labels_dense_positive_tiles(backend, device, skip_if_interpreted_above, sem):
    # every pair is a positive: the dense (GEMM) positive path of the paper kernel
    skip_if_interpreted_above(700, 700, 32)
    emb, _, _, _ = make_batch(700, 32, device=device)
    labels = torch.zeros(700, dtype=torch.long, device=device)
    _check(backend, emb, labels, None, None, sem, "mean", margin=1.2, alpha=1.3)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sem", ["paper", "pml"])
@pytest.mark.parametrize(
    "n, tight, neg_dup, pos_dup",
    [(301, 90, (150, 250), (200, 201)), (120, 40, (45, 50), (100, 101)), (517, 200, (300, 450), (400, 401))],
)
def test_tiles_with_and_without_negatives(
    backend, device, skip_if_interpreted_above, sem, threads, n, tight, neg_dup, pos_dup
):
    # the first `tight` rows in tight classes around one direction (their negatives inside
    # alpha = 0.9), the rest iid in D = 96 (d ~ 1.4: no negative inside), one duplicate pair of two
    # classes among them (d = 0, a negative) and one of one class: the in-batch kernels' tile pairs
    # (N = 301, 517; at 517 the "paper" forward's too) and blocks of rows (N = 120) with and without
    # negative members (csrc/rll_cpu.cpp, same_label_tile), each thread's partial row states merged,
    # ragged N
    d = 96
    skip_if_interpreted_above(n, n, d)
    labels = torch.arange(n) // 4
    emb = torch.randn(n, d, dtype=torch.float64)
    u = F.normalize(torch.randn(d, dtype=torch.float64), dim=0)
    emb[:tight] = u + 0.3 * emb[:tight] / d**0.5
    emb[neg_dup[1]], emb[pos_dup[1]] = emb[neg_dup[0]], emb[pos_dup[0]]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hp = dict(margin=0.4, alpha=0.9, Tp=5.0)
        _check(backend, emb.to(device), labels.to(device), None, None, sem, "none", **hp)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_in_batch_paper_gradient_from_every_thread(
    backend, device, skip_if_interpreted_above, threads, normalize
):
    # "paper" in-batch from N = 512: each unordered tile pair feeds the query gradient of both its
    # sides, each thread keeps its own accumulators of every row, rescaled to the merged running
    # maximum at the end (csrc/rll_cpu.cpp, merge_row_set). Tn = Tp = 300 in tight classes makes
    # the maxima differ by far between the threads' parts; ids with repeats exclude more than i = i
    # (docs/semantics.md §1.5); raw rows of mixed scale when not normalised
    n, d = 777, 24
    skip_if_interpreted_above(n, n, d)
    g = torch.Generator().manual_seed(11)
    labels = torch.randint(0, 60, (n,), generator=g)
    centers = torch.randn(60, d, dtype=torch.float64, generator=g)
    emb = centers[labels] + 0.5 * torch.randn(n, d, dtype=torch.float64, generator=g)
    if not normalize:
        emb = (
            emb
            / emb.norm(dim=1, keepdim=True)
            * (1.0 + 0.2 * torch.rand(n, 1, dtype=torch.float64, generator=g))
        )
    emb[500] = emb[17]  # a duplicate in another tile
    ids = torch.arange(n) // 2 * 2  # rows 2k and 2k + 1 share an id: neither is a pair of the other
    w = torch.rand(n, dtype=torch.float64, generator=g) + 0.5
    ii = ids.to(device)
    hp = dict(Tn=300.0, Tp=300.0, margin=0.3, normalize=normalize, query_ids=ii, ref_ids=ii)
    x, y, w = emb.to(device), labels.to(device), w.to(device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = {dt: _runs(backend, x, y, None, None, "paper", "none", dt, w, **hp) for dt in (FP64, FP32)}
        (l64, e64, _), (L64, E64, _) = runs[FP64]
        assert_close_fp64(l64, L64, "loss fp64")
        assert_close_fp64(e64, E64, "grad emb fp64")
        (l32, e32, _), (L32, E32, _) = runs[FP32]
        assert torch.isfinite(e32).all()
        assert_close_derived(l32, L32, L64, "loss fp32")
        assert_close_derived(e32, E32, E64, "grad emb fp32")
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ random upstream gradients, Tp != 0
CASES = [  # (N, M or None for in-batch, D, classes)
    (37, None, 24, 5),  # ragged: N not a multiple of the blocks, D not a power of 2
    (64, None, 16, 8),  # exact blocks
    (33, 45, 50, 4),  # ref_emb, ragged both ways
    (1, 70, 8, 3),  # a single query against a gallery
]


def _case(case, device, dtype=torch.float64):
    n, m, d, c = case
    x = torch.randn(n, d, dtype=dtype)
    y = torch.randint(0, c, (n,))
    ref = torch.randn(m, d, dtype=dtype) if m else None
    ref_y = torch.randint(0, c, (m,)) if m else None
    w = torch.randn(n, dtype=dtype)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(x), mv(y), mv(ref), mv(ref_y), mv(w)


def _upstream(w, reduction):
    # "none": a per-row upstream gradient; a scalar loss is scaled (not the last layer)
    return w if reduction == "none" else torch.tensor(1.7, dtype=w.dtype, device=w.device)


@pytest.mark.parametrize("semantics", ["paper", "pml"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-M{c[1]}-D{c[2]}-C{c[3]}")
def test_parity_fp64_upstream_gradient(backend, device, semantics, reduction, case):
    x, y, ref, ref_y, w = _case(case, device)
    kw = dict(semantics=semantics, reduction=reduction, Tn=10.0, Tp=2.0 if semantics == "pml" else 0.0)
    g = _upstream(w, reduction)
    lt, gxt, grt = run_loss(lambda *a, **k: fused(*a, backend=backend, **k), x, y, ref, ref_y, g, **kw)
    lr, gxr, grr = run_loss(reference.ranked_list_loss, x, y, ref, ref_y, g, **kw)
    assert_close_fp64(lt, lr, "loss")
    assert_close_fp64(gxt, gxr, "grad embeddings")
    if ref is not None:
        assert_close_fp64(grad_or_zeros(grt, ref), grad_or_zeros(grr, ref), "grad ref_emb")


@pytest.mark.parametrize("semantics", ["paper", "pml"])
@pytest.mark.parametrize("case", [(70, None, 32, 6), (29, 61, 40, 3)], ids=["inbatch", "ref_emb"])
def test_parity_fp32_derived_upstream_gradient(backend, device, semantics, case):
    x, y, ref, ref_y, w = _case(case, device)
    kw = dict(semantics=semantics, reduction="none")
    f32 = lambda t: t.float() if t is not None else None  # noqa: E731
    fn = lambda *a, **k: fused(*a, backend=backend, **k)  # noqa: E731
    lt, gxt, grt = run_loss(fn, f32(x), y, f32(ref), ref_y, w.float(), **kw)
    l32, gx32, gr32 = run_loss(reference.ranked_list_loss, f32(x), y, f32(ref), ref_y, w.float(), **kw)
    l64, gx64, gr64 = run_loss(reference.ranked_list_loss, x, y, ref, ref_y, w, **kw)
    assert lt.dtype == torch.float32 and gxt.dtype == torch.float32
    assert_close_derived(lt, l32, l64, "loss")
    assert_close_derived(gxt, gx32, gx64, "grad embeddings")
    if ref is not None and semantics == "pml":
        assert_close_derived(grt, gr32, gr64, "grad ref_emb")


# ------------------------------------------------------------------ fp16 / bf16
def _kernel_view(backend, x):
    """The rows the backend's kernel reads for half input ``x`` (docs/semantics.md §1.2): normalised in
    float32, then rounded back to the half type for Triton; kept in float32 by the C++ kernels."""
    z = F.normalize(x.float(), dim=1)
    return z.to(x.dtype) if backend == "triton" else z


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sem", ["paper", "pml"])
@pytest.mark.parametrize("m", [None, 41], ids=["inbatch", "ref_emb"])
def test_half_inputs_are_computed_in_fp32(backend, device, dtype, sem, m):
    emb, labels, ref, ref_labels = make_batch(50, 16, dtype=dtype, classes=10, m=m, device=device)
    e = emb.clone().requires_grad_()
    extra = {} if m is None else dict(ref_emb=ref, ref_labels=ref_labels)
    loss = fused(e, labels, Tn=10.0, semantics=sem, backend=backend, **extra)
    assert loss.dtype == torch.float32
    loss.backward()
    assert e.grad.dtype == dtype and torch.isfinite(e.grad.float()).all()

    # the fp32 kernel against the fp32 / fp64 references of the rows it reads
    def ref_loss(dt):
        gallery = {} if m is None else dict(ref_emb=_kernel_view(backend, ref).to(dt), ref_labels=ref_labels)
        z = _kernel_view(backend, emb).to(dt)
        return reference.ranked_list_loss(z, labels, Tn=10.0, semantics=sem, normalize=False, **gallery)

    assert_close_derived(loss, ref_loss(torch.float32), ref_loss(torch.float64), "loss")


# ------------------------------------------------------------------ ids, the bias row count, other inputs
@pytest.mark.parametrize("semantics", ["paper", "pml"])
def test_ids_and_den_rows_match_reference(backend, device, semantics):
    n, m, d = 30, 50, 16
    x = torch.randn(n, d, dtype=torch.float64)
    # bank rows 0..19 carry the ids of queries 0..19 (an older copy of the same samples, moved and
    # relabelled here so that the pairs would count if the ids did not exclude them)
    bank = torch.cat(
        [x[:20] + 0.8 * torch.randn(20, d, dtype=torch.float64), torch.randn(m - 20, d, dtype=torch.float64)]
    )
    y, by = torch.randint(0, 4, (n,)), torch.randint(0, 4, (m,))
    qid, bid = torch.arange(n), torch.cat([torch.arange(20), torch.arange(100, 100 + m - 20)])
    w = torch.randn(n, dtype=torch.float64)
    x, bank, y, by, qid, bid, w = (t.to(device) for t in (x, bank, y, by, qid, bid, w))
    kw = dict(semantics=semantics, reduction="none", query_ids=qid, ref_ids=bid, den_rows=77)
    fn = lambda *a, **k: fused(*a, backend=backend, **k)  # noqa: E731
    lt, gxt, grt = run_loss(fn, x, y, bank, by, w, **kw)
    lr, gxr, grr = run_loss(reference.ranked_list_loss, x, y, bank, by, w, **kw)
    assert_close_fp64(lt, lr, "loss")
    assert_close_fp64(gxt, gxr, "grad embeddings")
    assert_close_fp64(grad_or_zeros(grt, bank), grad_or_zeros(grr, bank), "grad bank")
    # the ids matter: without them the moved copies are pairs and the loss changes
    lz, _, _ = run_loss(fn, x, y, bank, by, w, semantics=semantics, reduction="none", den_rows=77)
    assert (lz - lt).abs().max().item() > 1e-3


@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_not_last_layer_grad_output(backend, device, sem):
    # loss * 2 before backward: the saved forward gradient must be scaled by grad_output
    emb, labels, _, _ = make_batch(50, 12, device=device)
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    (2.0 * fused(e1, labels, semantics=sem, backend=backend) + 0.0).backward()
    (2.0 * reference.ranked_list_loss(e2, labels, semantics=sem)).backward()
    assert_close_fp64(e1.grad, e2.grad, "grad of 2 * loss")


def test_backend_equals_reference_to_1e12(backend, device):
    emb, labels = torch.randn(20, 6, dtype=torch.float64), torch.arange(20) // 4
    emb, labels = emb.to(device), labels.to(device)
    assert torch.allclose(
        fused(emb, labels, backend="reference"), fused(emb, labels, backend=backend), rtol=1e-12, atol=0
    )


def test_labels_on_other_int_dtypes_and_non_contiguous_inputs(backend, device):
    emb = torch.randn(10, 16, dtype=torch.float64, device=device)[:, ::2]  # non-contiguous view
    labels = (torch.arange(10, device=device) // 2).to(torch.int32)
    a = fused(emb, labels, backend=backend)
    b = reference.ranked_list_loss(emb, labels.long())
    assert abs(a.item() - b.item()) <= 1e-12
