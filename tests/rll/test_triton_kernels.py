"""Triton backend of the Ranked List Loss: the cases that reach into the backend (block sizes, the
two-pass paths, the ops called directly with half inputs, launch configurations, the GPU compiler).
The public-API cases, on every backend, are in test_parity.py, test_edge_cases.py and
test_gradcheck.py.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py), so the sizes stay small (N <= ~100) and the blocks large. On a CUDA machine the same
tests run on the GPU; bench/device_check.sh adds the large sizes and the timings.
"""

from __future__ import annotations

import pytest
import torch
from rll_cases import grad_or_zeros, run_loss
from tolerance import assert_close_derived, assert_close_fp64, max_abs

import rll_kernels
from rll_kernels import reference
from rll_kernels._checks import compute_dtype

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_why = rll_kernels.available_backends(DEV, "rll")["triton"]
pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(_why is not None, reason=f"Triton backend unusable here: {_why}"),
]

if _why is None:
    from rll_kernels.triton import rll as trl


def _labels(n: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), device=DEV)


def _triton(x, y, **kw):
    return rll_kernels.ranked_list_loss(x, y, backend="triton", **kw)


@pytest.mark.parametrize("semantics", ["paper", "pml"])
@pytest.mark.parametrize("k_chunk", [0, 16], ids=["resident", "d_chunks"])
def test_many_small_tiles(semantics, k_chunk, monkeypatch):
    # 16 x 16 blocks: many gallery tiles per row, so the online max moves between tiles (Tn = 30);
    # d_chunks: the Gram tile accumulated over D in chunks of 16 (the large-D GPU configs), D ragged
    blk = (16, 16, k_chunk)
    monkeypatch.setattr(trl, "_INTERP_BLOCKS", {"fwd": blk, "bwd_q": blk, "bwd_k": blk})
    n, m, d = 21, 83, 40
    # unnormalised: F.normalize's backward would project out the radial terms (G 1) z of the gradients
    x = 0.2 * torch.randn(n, d, dtype=torch.float64, device=DEV)
    ref = 0.2 * torch.randn(m, d, dtype=torch.float64, device=DEV)
    y, ry = _labels(n, 3), _labels(m, 3)
    w = torch.randn(n, dtype=torch.float64, device=DEV)
    kw = dict(
        semantics=semantics,
        reduction="none",
        Tn=30.0,
        Tp=-3.0 if semantics == "pml" else 0.0,
        normalize=False,
        alpha=1.8,
        margin=0.6,
    )
    lt, gxt, grt = run_loss(_triton, x, y, ref, ry, w, **kw)
    lr, gxr, grr = run_loss(reference.ranked_list_loss, x, y, ref, ry, w, **kw)
    assert_close_fp64(lt, lr, "loss")
    assert_close_fp64(gxt, gxr, "grad embeddings")
    assert_close_fp64(grad_or_zeros(grt, ref), grad_or_zeros(grr, ref), "grad ref_emb")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paper_two_pass_path(dtype, monkeypatch):
    # large D takes the stats pass + detached dq pass instead of the one-pass forward: force it here
    monkeypatch.setenv("RLL_TRITON_PAPER_ONE_PASS_MAX_D", "0")
    n, m, d = 37, 52, 24
    x = torch.randn(n, d, dtype=torch.float64, device=DEV)
    ref = torch.randn(m, d, dtype=torch.float64, device=DEV)
    y, ry = _labels(n, 3), _labels(m, 3)
    w = torch.randn(n, dtype=torch.float64, device=DEV)
    kw = dict(semantics="paper", reduction="none", Tn=25.0)
    lt, gxt, _ = run_loss(_triton, x.to(dtype), y, ref.to(dtype), ry, w.to(dtype), **kw)
    l64, gx64, _ = run_loss(reference.ranked_list_loss, x, y, ref, ry, w, **kw)
    if dtype == torch.float64:
        assert_close_fp64(lt, l64, "loss")
        assert_close_fp64(gxt, gx64, "grad embeddings")
    else:
        l32, gx32, _ = run_loss(reference.ranked_list_loss, x.float(), y, ref.float(), ry, w.float(), **kw)
        assert_close_derived(lt, l32, l64, "loss")
        assert_close_derived(gxt, gx32, gx64, "grad embeddings")


# ------------------------------------------------------------------ half inputs (op called directly)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("semantics", ["paper", "pml"])
@pytest.mark.parametrize("Tn", [10.0, 100.0])
def test_half_inputs(dtype, semantics, Tn):
    """Half inputs read directly by the kernel: fp32 accumulation, fp32 loss, no overflow at Tn."""
    n, d = 45, 32
    z = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, device=DEV), dim=1).to(dtype)
    y = _labels(n, 5)
    attached = semantics == "pml"
    alpha, margin, lam = 1.2, 0.4, 0.5
    args = (alpha, alpha - margin, Tn, 0.0, lam, 1e-5 if attached else 0.0, None, False, attached)
    zq = z.clone().requires_grad_()
    # in-batch (no k): the pair i = i excluded by its row index, one tensor for both sides
    rows, gradq, stats, _, _ = torch.ops.rll_kernels.rll_triton_fwd(
        zq, y, None, None, None, None, *args, True
    )
    assert rows.dtype == torch.float32 and stats.dtype == torch.float32
    assert torch.isfinite(rows).all() and torch.isfinite(stats[:, [1, 3]]).all()
    w = torch.randn(n, device=DEV)
    (gk,) = torch.autograd.grad((rows * w).sum(), [zq])
    assert gk.dtype == dtype and torch.isfinite(gk).all()

    # the reference on the same (half-rounded) points, without re-normalising, in fp32 and fp64
    def ref(t):
        t = t.detach().clone().requires_grad_()
        r = reference.ranked_list_loss(
            t, y, margin, Tn, lam, alpha, 0.0, semantics=semantics, reduction="none", normalize=False
        )
        (g,) = torch.autograd.grad((r * w.to(r.dtype)).sum(), [t])
        return r.detach(), g

    r32, g32 = ref(z.float())
    r64, g64 = ref(z.double())
    assert_close_derived(rows, r32, r64, f"{dtype} loss")
    # the gradient leaves the op in the input dtype: allow its final rounding (half an ulp of the scale)
    round_err = torch.finfo(dtype).eps * g64.abs().max().item()
    err = max_abs(gk, g64)
    bound = 4.0 * max_abs(g32, g64) + round_err
    assert err <= bound, f"{dtype} grad error {err:.3e} > {bound:.3e}"


def test_detached_backward_pass_equals_forward_gradient():
    # rll_triton_bwd(attached=False) recomputes what the one-pass "paper" forward accumulates online
    n, m, d = 50, 77, 20
    q = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, device=DEV), dim=1)
    k = torch.nn.functional.normalize(torch.randn(m, d, dtype=torch.float64, device=DEV), dim=1)
    ql, kl = _labels(n, 4), _labels(m, 4)
    g = torch.randn(n, dtype=torch.float64, device=DEV)
    p = (1.2, 0.8, 20.0, 0.0, 0.3, 0.0, None, True)  # ... bias_per_row, den_rows, normalize
    out = {}
    for dt in (torch.float64, torch.float32):
        _, gradq, stats, z, norms = torch.ops.rll_kernels.rll_triton_fwd(
            q.to(dt), ql, None, k.to(dt), kl, None, *p, False, True
        )
        gq, gk = torch.ops.rll_kernels.rll_triton_bwd(
            g.to(dt), q.to(dt), ql, None, k.to(dt), kl, None, stats, z, norms, *p, False, True, False
        )
        assert gk.numel() == 0
        out[dt] = (gradq * g.to(dt)[:, None], gq)
    assert_close_fp64(out[torch.float64][1], out[torch.float64][0], "fp64 bwd vs fwd gradient")
    # fp32: the backward pass is as close to fp64 as the forward's own fp32 gradient is
    assert_close_derived(out[torch.float32][1], out[torch.float32][0], out[torch.float64][0], "fp32 bwd")


# ------------------------------------------------------------------ empty inputs, errors, dispatch
def test_empty_gallery_and_queries():
    q = torch.randn(5, 8, device=DEV)
    lab = torch.zeros(5, dtype=torch.int64, device=DEV)
    k0 = torch.empty(0, 8, device=DEV)
    l0 = torch.empty(0, dtype=torch.int64, device=DEV)
    hp = (1.2, 0.8, 10.0, 0.0, 0.5, 0.0, None, True, False)
    rows, g, st, z, norms = torch.ops.rll_kernels.rll_triton_fwd(q, lab, None, k0, l0, None, *hp, True)
    assert (rows == 0).all() and (g == 0).all() and torch.isneginf(st[:, [0, 2]]).all()
    assert z.shape == (5, 8) and norms.shape == (5,)
    rows, g, st, _, _ = torch.ops.rll_kernels.rll_triton_fwd(k0, l0, None, q, lab, None, *hp, True)
    assert rows.shape == (0,) and g.shape == (0, 8) and st.shape == (0, 4)
    gq, gk = torch.ops.rll_kernels.rll_triton_bwd(
        torch.ones(5, device=DEV),
        q,
        lab,
        None,
        k0,
        l0,
        None,
        st.new_zeros(5, 4),
        q.new_empty(0),
        q.new_empty(0),
        *hp[:7],
        False,
        True,
        True,
        True,
    )
    assert (gq == 0).all() and gk.shape == (0, 8)


# ------------------------------------------------------------------ GPU launch configurations (CPU-checkable)
@pytest.mark.parametrize("cap", [80, 90])
@pytest.mark.parametrize("kind", ["fwd", "bwd_q", "bwd_k"])
def test_launch_config_pruning(cap, kind):
    configs = trl._configs(cap)
    prune = trl._prune(kind, cap)
    for dtype in (torch.float32, torch.float16, torch.float64):
        for bd in (16, 64, 128, 256, 512, 1024, 2048):
            named = {"Q": torch.empty(0, dtype=dtype), "PRM": torch.empty(0, dtype=compute_dtype(dtype))}
            kept = prune(configs, named, BLOCK_D=bd, PAPER_GRAD=True)
            assert len(kept) >= 1
            if bd <= 128 and dtype != torch.float64:
                assert len(kept) >= 3, (kind, cap, dtype, bd, kept)  # small D: a real choice to tune
            if bd == 512 and dtype == torch.float32 and kind != "fwd":
                # large D: the D-chunked configs stay in the race, on sm_90 with wgmma-sized (>= 64-row) tiles
                rows = 64 if cap == 90 else 16
                assert any(
                    c.kwargs["K_CHUNK"] > 0 and c.kwargs["BLOCK_M" if kind != "bwd_k" else "BLOCK_N"] >= rows
                    for c in kept
                ), kept


def test_pick_config_without_timing():
    # RLL_TRITON_AUTOTUNE=0 (the GPU test run): the first config that fits, from the real argument list
    q = torch.empty(10, 512)
    prm = torch.empty(7)
    args = (q, q, None, None, None, None, prm, None, None, None, None, 10, 10, 512, 10, 512, 512, 512)
    c = trl.pick_config("fwd", 90, args, dict(BLOCK_D=512, PAPER_GRAD=False, HAS_IDS=0, NORMALIZE=True))
    assert c.kwargs["K_CHUNK"] > 0 or c.kwargs["BLOCK_M"] <= 32
    args_bwd = (None, q, q, None, None, None, None, None, prm, None, None, 10, 10, 64, 64, 64, 64)  # GR first
    c = trl.pick_config("bwd_q", 80, args_bwd, dict(BLOCK_D=64, HAS_IDS=0, ATTACHED=True, NORMALIZE=True))
    assert c.kwargs["K_CHUNK"] == 0 and c.kwargs["BLOCK_M"] >= 64


# ------------------------------------------------------------------ the GPU compiler, without a GPU
_AOT_SCRIPT = """
import sys
from rll_kernels.triton._aot import compile_kernel, summary
cases = [("fwd_paper", "fp32", 90, 0), ("fwd_stats", "fp32", 90, 0), ("bwd_q", "fp32", 90, 32),
         ("bwd_k", "fp32", 90, 0), ("fwd_paper", "fp16", 80, 32), ("bwd_k", "bf16", 80, 32),
         ("fwd_paper", "fp64", 80, 0)]
for kind, dt, cap, kc in cases:
    info = summary(compile_kernel(kind, dt, cap, 32, 32, 64, 4, 2, k_chunk=kc))
    assert info["mma"] + info["wgmma"] > 0, (kind, dt, cap, info)  # the tile GEMMs reach the tensor cores
    print(kind, dt, cap, info, flush=True)
from rll_kernels.triton._aot import SIBLINGS, compile_sibling
for kernel in SIBLINGS:  # the SoftTriple and OSM kernels compile too
    print("sibling", kernel, compile_sibling(kernel, "fp32", 90).metadata.shared, flush=True)
"""


@pytest.mark.slow
def test_aot_compile_for_sm80_sm90():
    # Triton's compiler + bundled ptxas for sm_80/sm_90, no GPU or driver needed: catches kernels that
    # the interpreter runs but the GPU compiler rejects (it did: a plain float global)
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("{'shared'") == 7
    assert r.stdout.count("sibling ") == 4
