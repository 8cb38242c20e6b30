"""The "cuda" backend of the Ranked List Loss in a dry run: csrc/cuda/rll_kernels.cu run on the CPU.

The kernels are compiled by the host C++ compiler against the emulation headers of tests/cuda_emu/
(the harness that tests/test_cuda_emulated.py drives) and called the way the CUDA glue calls them,
in-batch: one tensor of raw rows, normalised by the kernels when ``normalize`` (docs/semantics.md
§1.4), the pair i = i excluded by its row index (§1.5). The hyper-parameters are mapped as in
rll_kernels.ranked_list_loss (docs/semantics.md §2.6).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.device.context import ROOT

EMU = ROOT / "tests" / "cuda_emu"
SOURCES = [ROOT / "csrc" / "cuda" / "rll_kernels.cu", *sorted((ROOT / "csrc").glob("*.h"))]
SOURCES += sorted((ROOT / "csrc" / "cuda").glob("*.cuh")) + sorted(EMU.glob("*"))
_DTYPE = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


@functools.cache
def harness() -> Path:
    """The emulation harness, built once per source state into build/cuda_emu/ (a few seconds)."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES if p.is_file())).hexdigest()[:16]
    exe = ROOT / "build" / "cuda_emu" / f"harness-{digest}"
    if exe.exists():
        return exe
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no host C++ compiler (g++/c++) to build the CUDA emulation harness")
    exe.parent.mkdir(parents=True, exist_ok=True)
    # one temporary file per process: parallel first builds (the parity workers) must not write to the
    # file another process has already renamed into place and runs ("Text file busy")
    tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", f"-I{EMU}", f"-I{ROOT / 'csrc'}"]
    cmd += ["-x", "c++", str(SOURCES[0]), "-x", "none", str(EMU / "harness.cpp"), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"emulation harness build failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    tmp.replace(exe)
    return exe


def _run(z: torch.Tensor, y: torch.Tensor, params: tuple, g: torch.Tensor):
    """(loss rows, dL/dz) of the emulated kernels for upstream row gradients ``g``."""
    alpha, beta, tn, tp, lam, bias, attached, normalize = params
    n, d = z.shape
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for name, v in (("q", z), ("g", g)):
            v.detach().double().cpu().numpy().tofile(t / f"{name}.bin")
        y.cpu().numpy().astype(np.int64).tofile(t / "ql.bin")
        flags = ["0", str(int(attached)), "1", str(int(normalize)), "1"]  # no ids, in-batch
        args = [str(harness()), tmp, _DTYPE[z.dtype], str(n), str(n), str(d), *flags]
        args += [repr(float(v)) for v in (alpha, beta, tn, tp, lam, bias)]
        r = subprocess.run(args, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"emulation harness failed ({r.returncode}): {r.stderr[-2000:]}")

        def rd(name, *shape):
            return torch.from_numpy(np.fromfile(t / f"{name}.bin", dtype=np.float64)).reshape(*shape)

        return rd("loss", n), rd("gq", n, d)  # in-batch: both ends of every pair in gq


class _HarnessRLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, y, params):
        rows, _ = _run(z, y, params, torch.ones(z.shape[0], dtype=torch.float64))
        ctx.save_for_backward(z, y)
        ctx.params = params
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        return rows.to(acc)

    @staticmethod
    def backward(ctx, g_rows):
        z, y = ctx.saved_tensors
        _, grad = _run(z, y, ctx.params, g_rows)
        return grad.to(z.dtype), None, None


def ranked_list_loss(x, y, semantics, margin, Tn, imbalance=0.5, Tp=0.0, normalize=True, reduction="mean"):
    """In-batch Ranked List Loss through the emulated CUDA kernels (``alpha = 1 + margin / 2``)."""
    alpha = 1.0 + margin / 2.0
    attached = semantics == "pml"
    bias = x.shape[0] * 1e-5 if attached else 0.0  # the glue's bias_per_row x M
    # half inputs are read as they are (normalised in fp32, z in the half type), as on the GPU
    rows = _HarnessRLL.apply(x, y, (alpha, alpha - margin, Tn, Tp, imbalance, bias, attached, normalize))
    return {"mean": rows.mean, "sum": rows.sum, "none": lambda: rows}[reduction]()
