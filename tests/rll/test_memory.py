"""Memory is O(N D): N = 32768, D = 256 forward+backward grows peak RSS by <= 512 MiB
(the memory bound of docs/semantics.md §2.6;
PML would need ~35 GiB). Runs in a fresh subprocess so the peak is this computation's alone."""

import json
import subprocess
import sys

import pytest
from scripts import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_peak_rss_growth_n32768(sem):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "rll_memory.py"),
            "--n",
            "32768",
            "--d",
            "256",
            "--semantics",
            sem,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(r)
    assert r["finite_grad"]
    assert r["growth_mib"] <= 512, r
