"""bench/device_check.sh, the GPU check, exercised on this CPU so that it cannot rot.

``--dry-run`` runs every part (Triton in the interpreter, the CUDA kernels through their CPU
emulation, tiny sizes, PML from the environment, the sanitizer commands printed); a second run
with a stand-in interpreter checks that a failing part and a part past its timeout are recorded
and do not stop the next one. docs/device_check.md describes the parts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "device_check.sh"
PARTS = ["pml", "build", "env", "tests", "parity", "goal", "sync", "sanitize", "timings", "roofline"]

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU stand-in; on a GPU machine run bench/device_check.sh itself"
)


def _run(out: Path, *args: str, python: str = sys.executable, timeout: int = 600, packed: Path | None = None):
    env = dict(os.environ, PYTHON=python, DEVICE_CHECK_DIR=str(out), OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    if packed is not None:
        env["OUT"] = str(packed)  # as the GPU machine's tool sets it
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its dry-run parts itself
    t0 = time.time()
    r = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.time() - t0


def _status(out: Path) -> dict[str, str]:
    return {ln.split("\t")[0]: ln.split("\t")[1] for ln in (out / "status.tsv").read_text().splitlines()}


@pytest.mark.slow
def test_dry_run_every_part(tmp_path, capsys):
    # --budget: the dry run takes about a minute on 2 idle cores; past 5 minutes parts are skipped (a failure)
    packed = tmp_path / "packed"
    tmp_path = tmp_path / "results"
    r, seconds = _run(tmp_path, "--dry-run", "--budget", "300", packed=packed)
    with capsys.disabled():
        print(f"\ndevice_check.sh --dry-run: {seconds:.0f} s\n" + r.stdout[-2500:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert _status(tmp_path) == dict.fromkeys(PARTS, "ok")
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "every part ok" in summary and "FAIL" not in summary
    parity = (tmp_path / "parity.log").read_text()
    for loss in ("rll-paper", "rll-pml", "softtriple", "osm"):
        assert f"PASS triton {loss} float32" in parity, loss
    assert "PASS cuda rll-pml float32" in parity and "PASS cuda rll-pml bfloat16" in parity  # emulated
    assert "PASS triton rll-paper float16 N=32 D=16 Tn=100 loss" in parity
    goal = (tmp_path / "goal.log").read_text()
    assert "goal triton pml: full" in goal and "goal cuda paper: full" in goal
    rows = (tmp_path / "timings.csv").read_text().splitlines()
    assert rows[0].startswith("loss,dtype,N,D,provider") and len(rows) > 10
    assert any(",reference+compile," in row for row in rows) and any(",pml," in row for row in rows)
    assert "would run: PYTORCH_NO_CUDA_MEMORY_CACHING=1" in (tmp_path / "sanitize.log").read_text()
    sync = json.loads((tmp_path / "sync.summary.json").read_text())
    assert sum(ln.startswith("sync ") for ln in sync["lines"]) == 8  # 4 losses x (triton, auto)
    # what comes back from the GPU machine: at most 8 files, the whole results folder packed in one
    back = sorted(f.name for f in packed.iterdir())
    assert len(back) <= 8 and "device_check.tar.gz" in back and "SUMMARY.md" in back, back
    with tarfile.open(packed / "device_check.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {f.name for f in tmp_path.iterdir()} <= names


FAKE_PYTHON = """#!/usr/bin/env bash
case " $* " in
  *" sync "*) echo "a failing part"; exit 1 ;;
  *" goal "*) sleep 60 ;;
esac
exec {python} "$@"
"""


def test_failing_and_slow_parts_do_not_stop_the_next(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "out"
    r, _ = _run(out, "--dry-run", "--only", "goal,sync,roofline", "--limit", "goal=2", python=str(fake))
    assert r.returncode == 1, r.stdout + r.stderr
    st = _status(out)
    assert st["goal"].startswith("TIMEOUT") and st["sync"] == "FAIL" and st["roofline"] == "ok", st
    assert st["parity"] == "not selected"
    summary = (out / "SUMMARY.md").read_text()
    assert "NOT OK: goal, sync" in summary and "roofline N=8192 D=512 pml: tf32 tensor-core floor" in summary


@pytest.mark.parametrize("semantics", ["paper", "pml"])
def test_row_blocked_reference_equals_the_dense_one(monkeypatch, semantics):
    # the GPU parity computes the float64 RLL reference at N = 16384 in blocks of query rows
    sys.path.insert(0, str(ROOT))
    from bench.device import parity
    from bench.device.losses import LOSSES, Problem, problem

    monkeypatch.setattr(parity, "ROW_CHUNK", 64)
    loss = LOSSES[f"rll-{semantics}"]
    p = problem(loss, 300, 24, "cpu")
    p.x[5] = p.x[7]  # a duplicate pair across two blocks
    for kw in ({}, {"Tn": 100.0, "normalize": False}):
        xs = Problem(p.x, p.y, None).leaves(torch.float64)
        dense, blocked = (
            parity._grads(loss.reference, xs, p.y, **kw),
            parity.reference_grads(loss, xs, p.y, **kw),
        )
        for a, b in zip(dense, blocked):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15), (kw, (a - b).abs().max())
