"""Without the C++ extension (docs/architecture.md, "Schemas in Python, in one file"): the op schemas
are defined from Python, so ``import rll_kernels`` works, the reference and Triton backends run, and
``backend="cpp"`` raises a RuntimeError that gives the registry's reason.

Simulated in a fresh interpreter: a meta-path finder placed first answers for ``rll_kernels._C``
with a loader that raises ImportError, as a missing or broken build does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

MARK = "rll_kernels._C made unimportable by the test"

CHILD = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, json, sys

    class NoExtension(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "rll_kernels._C":
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            raise ImportError(MARK)

        def exec_module(self, module):
            raise ImportError(MARK)

    sys.meta_path.insert(0, NoExtension())

    import torch
    import rll_kernels
    from rll_kernels import _extension, reference

    torch.manual_seed(0)
    x = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    y = torch.arange(13) % 4
    w = torch.randn(8, 4 * 2, dtype=torch.float64)
    calls = {
        "rll": (lambda b: rll_kernels.ranked_list_loss(x, y, backend=b, semantics="pml"),
                lambda: reference.ranked_list_loss(x, y, semantics="pml")),
        "softtriple": (lambda b: rll_kernels.soft_triple_loss(x, y, w, 2, backend=b),
                       lambda: reference.soft_triple_loss(x, y, w, 2)),
        "osm": (lambda b: rll_kernels.weighted_contrastive_loss(x, y, backend=b),
                lambda: reference.weighted_contrastive_loss(x, y)),
    }
    out = {"has_c": _extension.HAS_C, "loaded": "rll_kernels._C" in sys.modules, "losses": {}}
    for loss, (fused, ref) in calls.items():
        row = {"reason": rll_kernels.available_backends("cpu", loss)["cpp"]}
        expected = ref()
        (g_ref,) = torch.autograd.grad(expected, x)
        row["reference"] = fused("reference").item() == expected.item()
        try:
            fused("cpp")
            row["cpp_error"] = None
        except RuntimeError as e:
            row["cpp_error"] = str(e)
        if WITH_TRITON:
            got = fused("triton")
            (g,) = torch.autograd.grad(got, x)
            row["triton_err"] = abs(got.item() - expected.item())
            row["triton_grad_err"] = (g - g_ref).abs().max().item()
        out["losses"][loss] = row
    print("RESULT " + json.dumps(out))
    """
)


def test_without_the_extension_reference_and_triton_work_and_cpp_says_why():
    with_triton = importlib.util.find_spec("triton") is not None
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"MARK = {MARK!r}\nWITH_TRITON = {with_triton!r}\n" + CHILD
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["has_c"] is False and out["loaded"] is False
    for loss, row in out["losses"].items():
        assert row["reason"] and MARK in row["reason"], (loss, row)
        assert row["reference"], loss
        assert row["cpp_error"] is not None and "backend 'cpp' is not available" in row["cpp_error"], row
        assert row["reason"] in row["cpp_error"], row
        if with_triton:
            assert row["triton_err"] <= 1e-10 and row["triton_grad_err"] <= 1e-10, (loss, row)
    if not with_triton:
        pytest.skip("triton is not installed: the Triton half of this check did not run")
