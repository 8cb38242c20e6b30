"""The CUDA kernels' logic, run on the CPU: csrc/cuda/rll_kernels.cu compiled by the host C++
compiler against the emulation headers of tests/cuda_emu/ (one host thread per CUDA thread,
std::barrier for __syncthreads/__syncwarp, warp shuffles through a buffer), driven the way the glue
drives it, and compared with the CPU kernel on the same inputs.

What this covers without a GPU: tiling and edge tiles, Gram distances and duplicates, label/id
masks, the online softmax across gallery tiles, the gradient coefficients, the owned-row gradient
products, barrier placement around reused shared memory, and the tensor-core branch's tile layout
(tests/cuda_emu/mma.h emulates the nvcuda::wmma calls). What it does not: the MMA units
themselves, the GPU memory model, timings. Those need a GPU run (tests/rll/test_cuda_kernels.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_derived, assert_close_fp64, max_abs

import rll_kernels  # noqa: F401  (loads the C++ ops: the CPU kernel is the oracle)

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emu"
CXX = shutil.which("g++") or shutil.which("c++")
FWD = torch.ops.rll_kernels.rll_fwd
BWD = torch.ops.rll_kernels.rll_bwd

# alpha, beta, Tn, Tp, lambda, bias per gallery row, attached
SEMANTICS = {"paper": (1.2, 0.8, 10.0, 0.0, 0.5, 0.0, False), "pml": (1.2, 0.8, 10.0, -2.0, 0.4, 2e-5, True)}
# (N, M, D, in_batch): edge tiles in every direction (tiles are 64 x 64 or 32 x 32, D staged by 16/32)
SHAPES = [(70, 70, 40, True), (37, 90, 20, False)]


def _build(tmp: Path, defines: list[str]) -> Path:
    if CXX is None:
        pytest.fail("no host C++ compiler (g++/c++) to build the CUDA emulation harness")
    exe = tmp / "harness"
    cmd = [
        CXX,
        "-std=c++20",
        "-O1",
        "-pthread",
        *defines,
        f"-I{EMU}",
        f"-I{ROOT / 'csrc'}",
        "-x",
        "c++",
        str(ROOT / "csrc" / "cuda" / "rll_kernels.cu"),
        "-x",
        "none",
        str(EMU / "harness.cpp"),
        "-o",
        str(exe),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"emulation build failed:\n{' '.join(cmd)}\n{r.stderr[-5000:]}"
    return exe


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """fp16/bf16 take the CUDA-core branch (as on GPUs older than sm_80)."""
    return _build(tmp_path_factory.mktemp("emu"), [])


@pytest.fixture(scope="module")
def harness_wmma(tmp_path_factory):
    """fp16/bf16 take the tensor-core (WMMA) branch, with nvcuda::wmma emulated (tests/cuda_emu/mma.h)."""
    return _build(tmp_path_factory.mktemp("emu_wmma"), ["-DRLL_EMULATE_WMMA"])


def _problem(n, m, d, in_batch, classes=4, raw=False, ids=True):
    """(q, q_labels, q_ids, k, k_labels, k_ids): unit rows, or ``raw`` rows of norms from 1e-3 to 1e3
    for the op to normalise; in-batch k is None (with ids arange(n) unless not ``ids``)."""
    q = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    ql = torch.randint(0, classes, (n,))
    if raw:
        q = q * torch.logspace(-3, 3, n, dtype=torch.float64).unsqueeze(1)
    if in_batch:
        return q, ql, torch.arange(n) if ids else None, None, None, None
    k = F.normalize(torch.randn(m, d, dtype=torch.float64), dim=1)
    r = min(3, n, m)
    k[:r] = q[:r]  # exact duplicates across the two sides (d = 0 negatives / positives)
    return q, ql, None, k, torch.randint(0, classes, (m,)), None


def _cpu(prob, params, g, dtype, normalize=False):
    q, ql, qid, k, kl, kid = prob
    a, b, tn, tp, lam, bias, att = params
    q, k = q.to(dtype), (None if k is None else k.to(dtype))
    hp = (a, b, tn, tp, lam, bias, None, normalize, att)
    # "pml": need_grad=False, the statistics-only forward that the CUDA kernels run (on the CPU,
    # need_grad in-batch would run both passes in the forward, docs/semantics.md §2.6)
    loss, gq_fwd, stats, z, norms = FWD(q, ql, qid, k, kl, kid, *hp, not att)
    gq, gk = BWD(g.to(dtype), q, ql, qid, k, kl, kid, stats, z, norms, *hp, True, att)
    return {"loss": loss, "stats": stats, "gq_fwd": gq_fwd, "gq": gq, "gk": gk}


def _emu(exe, tmp, prob, params, g, dtype: str, normalize=False):
    q, ql, qid, k, kl, kid = prob
    in_batch = k is None
    (n, d), m = q.shape, (q.shape[0] if in_batch else k.shape[0])
    for name, t in (("q", q), ("k", k), ("g", g)):
        if t is not None:
            t.double().numpy().tofile(tmp / f"{name}.bin")
    for name, t in (("ql", ql), ("kl", kl), ("qid", qid), ("kid", kid)):
        if t is not None:
            t.numpy().astype(np.int64).tofile(tmp / f"{name}.bin")
    a, b, tn, tp, lam, bias, att = params
    args = [
        str(exe),
        str(tmp),
        dtype,
        str(n),
        str(m),
        str(d),
        str(int(qid is not None)),
        str(int(att)),
        "1",
        str(int(normalize)),
        str(int(in_batch)),
        *(repr(float(v)) for v in (a, b, tn, tp, lam, bias * m)),
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    def rd(name, *shape):
        return torch.from_numpy(np.fromfile(tmp / f"{name}.bin", dtype=np.float64)).reshape(*shape)

    return {
        "loss": rd("loss", n),
        "stats": rd("stats", n, 4),
        "gq_fwd": rd("gq_fwd", 0) if att else rd("gq_fwd", n, d),  # the CPU op returns (0,) for "pml"
        "gq": rd("gq", n, d),
        "gk": rd("gk", m, d) if (att and not in_batch) else rd("gk", 0),
    }


def _no_inf(st):
    return torch.where(torch.isinf(st), torch.zeros_like(st), st)


@pytest.mark.parametrize("shape", SHAPES + [(1, 1, 3, False), (3, 0, 5, False)])
@pytest.mark.parametrize("sem", sorted(SEMANTICS))
def test_emulated_fp64_matches_cpu_kernel(harness, tmp_path, shape, sem):
    prob = _problem(*shape)
    g = torch.rand(shape[0], dtype=torch.float64) + 0.5
    want = _cpu(prob, SEMANTICS[sem], g, torch.float64)
    got = _emu(harness, tmp_path, prob, SEMANTICS[sem], g, "float64")
    assert torch.equal(torch.isinf(got["stats"]), torch.isinf(want["stats"])), "different empty sets"
    assert_close_fp64(_no_inf(got["stats"]), _no_inf(want["stats"]), "stats")
    for key in ("loss", "gq_fwd", "gq", "gk"):
        assert got[key].shape == want[key].shape, key
        assert_close_fp64(got[key], want[key], key)
    if shape in SHAPES:
        assert want["loss"].abs().max() > 0 and want["gq"].abs().max() > 0  # a non-trivial case


@pytest.mark.parametrize("sem", sorted(SEMANTICS))
def test_emulated_fp32_within_reference_rounding(harness, tmp_path, sem):
    prob = _problem(*SHAPES[1])
    g = torch.rand(SHAPES[1][0], dtype=torch.float64) + 0.5
    ref64 = _cpu(prob, SEMANTICS[sem], g, torch.float64)
    ref32 = _cpu(prob, SEMANTICS[sem], g, torch.float32)
    got = _emu(harness, tmp_path, prob, SEMANTICS[sem], g, "float32")
    for key in ("loss", "gq_fwd", "gq", "gk"):
        assert_close_derived(got[key], ref32[key], ref64[key], key)


# the CUDA-core branch for fp16/bf16 only differs from fp32 in the loads: one semantics per dtype
@pytest.mark.parametrize("dtype,sem", [(torch.float16, "paper"), (torch.bfloat16, "pml")])
def test_emulated_half_inputs(harness, tmp_path, dtype, sem):
    # inputs rounded to the half type once; the oracle (CPU kernel, fp32 and fp64) sees the same values
    q, ql, qid, k, kl, kid = _problem(*SHAPES[1])
    prob = (q.to(dtype).double(), ql, qid, k.to(dtype).double(), kl, kid)
    g = torch.rand(SHAPES[1][0], dtype=torch.float64) + 0.5
    ref64 = _cpu(prob, SEMANTICS[sem], g, torch.float64)
    ref32 = _cpu(prob, SEMANTICS[sem], g, torch.float32)
    got = _emu(harness, tmp_path, prob, SEMANTICS[sem], g, str(dtype).split(".")[1])
    for key in ("loss", "gq_fwd", "gq", "gk"):
        assert_close_derived(got[key], ref32[key], ref64[key], f"{sem} {key}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_half_inputs_tensor_core_branch(harness_wmma, tmp_path, dtype):
    shape = (70, 70, 40, True)  # two D-chunks of 32 (one partial), an edge tile in N and M
    q, ql, qid, k, kl, kid = _problem(*shape)
    qh = q.to(dtype).double()
    prob = (qh, ql, qid, None, None, None)
    g = torch.rand(shape[0], dtype=torch.float64) + 0.5
    for sem in ("paper", "pml"):
        ref64 = _cpu(prob, SEMANTICS[sem], g, torch.float64)
        ref32 = _cpu(prob, SEMANTICS[sem], g, torch.float32)
        got = _emu(harness_wmma, tmp_path, prob, SEMANTICS[sem], g, str(dtype).split(".")[1])
        for key in ("loss", "gq_fwd", "gq", "gk"):
            assert_close_derived(got[key], ref32[key], ref64[key], f"{sem} {key}")


def test_emulated_catches_a_wrong_answer(harness, tmp_path):
    # the comparison is sharp enough to see one changed hyper-parameter
    prob = _problem(*SHAPES[1])
    g = torch.ones(SHAPES[1][0], dtype=torch.float64)
    want = _cpu(prob, SEMANTICS["pml"], g, torch.float64)
    wrong = list(SEMANTICS["pml"])
    wrong[2] = 10.001  # Tn
    got = _emu(harness, tmp_path, prob, tuple(wrong), g, "float64")
    assert max_abs(got["loss"], want["loss"]) > 1e-9


# ------------------------------------------------------------------ PML's parameter domain
# (alpha, beta, Tn, Tp, lambda, bias per gallery row, attached): the corners of docs/semantics.md §2.2
EMU_CORNERS = [
    (0.4, -0.8, 10.0, -3.0, 0.5, 2e-5, True),  # beta < 0
    (0.9, 1.3, 3.0, 2.0, 0.3, 2e-5, True),  # beta > alpha
    (1.0, 1.0, 10.0, 0.0, 0.5, 0.0, False),  # margin 0
    (-0.2, -0.6, 10.0, 1.0, 0.5, 2e-5, True),  # alpha < 0
    (1.2, 0.8, -8.0, -3.0, 0.0, 0.0, False),  # negative temperatures, imbalance 0
    (1.2, 0.8, 10.0, 2.0, 1.0, 2e-5, True),  # imbalance 1
    (0.4, -0.8, 10.0, -1000.0, 0.5, 0.0, True),  # the excluded diagonal's logit above log den
]


@pytest.mark.parametrize("params", EMU_CORNERS, ids=[str(p[:4]) for p in EMU_CORNERS])
def test_emulated_cuda_domain_matches_cpu_kernel(harness, tmp_path, params):
    n, d = 40, 6
    q = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    y, ids = torch.randint(0, 4, (n,)), torch.arange(n)
    # in-batch, the diagonal excluded; distinct id tensors, so the CPU oracle returns grad q and grad k
    # separately (with the same tensor it takes its symmetric path and returns their sum as grad q)
    prob = (q, y, ids, q, y, ids.clone())
    g = torch.rand(n, dtype=torch.float64) + 0.5
    want = _cpu(prob, params, g, torch.float64)
    got = _emu(harness, tmp_path, prob, params, g, "float64")
    assert want["loss"].abs().max() > 0
    for key in ("loss", "gq_fwd", "gq", "gk"):
        assert torch.isfinite(got[key]).all(), key
        assert_close_fp64(got[key], want[key], f"{params}: {key}")


@pytest.mark.parametrize("sem", sorted(SEMANTICS))
@pytest.mark.parametrize("in_batch", [True, False], ids=["in_batch", "gallery"])
def test_emulated_normalization_in_the_op(harness, tmp_path, sem, in_batch):
    # raw rows of norms 1e-3 .. 1e3 normalised by the kernels, the gradients through (I - z z^T)/|e|;
    # in-batch without ids the pair i = i is excluded by its row index (docs/semantics.md §1.4, §1.5)
    prob = _problem(70 if in_batch else 37, 90, 40, in_batch, raw=True, ids=False)
    g = torch.rand(prob[0].shape[0], dtype=torch.float64) + 0.5
    want = _cpu(prob, SEMANTICS[sem], g, torch.float64, normalize=True)
    got = _emu(harness, tmp_path, prob, SEMANTICS[sem], g, "float64", normalize=True)
    for key in ("loss", "gq_fwd", "gq", "gk"):
        assert got[key].shape == want[key].shape, key
        assert_close_fp64(got[key], want[key], key)
    assert want["gq"].abs().max() > 0


def test_emulated_nonfinite_row_gives_nan_loss(harness, tmp_path):
    # no device sync on a GPU: a non-finite row makes every loss NaN, never a finite wrong one
    q, ql, qid, k, kl, kid = _problem(37, 90, 20, False, ids=False)
    k = k.clone()
    k[5, 3] = float("inf")
    g = torch.ones(37, dtype=torch.float64)
    got = _emu(harness, tmp_path, (q, ql, qid, k, kl, kid), SEMANTICS["paper"], g, "float64", normalize=True)
    assert torch.isnan(got["loss"]).all()
