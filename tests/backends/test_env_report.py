"""`python -m rll_kernels.env_report`: versions and the backend table of every loss, as the
registry reports it (reasons included), for bug reports."""

from __future__ import annotations

import subprocess
import sys

import torch

import rll_kernels
from rll_kernels import env_report


def test_report_lists_every_loss_and_backend_with_the_registry_state():
    text = env_report.report()
    assert f"rll_kernels {rll_kernels.__version__}" in text and f"torch {torch.__version__}" in text
    lines = text.splitlines()
    for loss, table in rll_kernels.available_backends("cpu").items():
        for name, why in table.items():
            state = "usable" if why is None else "unusable: " + why
            row = [ln for ln in lines if ln.split()[:3] == ["cpu", loss, name]]
            assert len(row) == 1, (loss, name, text)
            assert row[0].endswith(state), (row, state)


def test_module_runs_as_a_script():
    out = subprocess.run(
        [sys.executable, "-m", "rll_kernels.env_report"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "backends (device, loss, backend):" in out.stdout and " softtriple " in out.stdout
