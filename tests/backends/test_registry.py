"""The backend registry (rll_kernels/_backends.py, docs/semantics.md §6 "Backends"): the table,
``auto``, a named backend that cannot run, and the one fallback warning, for every loss.

A backend is made unusable through its own probe (the C++ extension's reason, Triton's status, the
CUDA kernel query) with the cached table dropped, so the registry probes again as on a machine
without that backend.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from tolerance import assert_close_fp64

import rll_kernels
from rll_kernels import _backends, _extension, reference
from rll_kernels._backends import BACKENDS, LOSSES, resolve

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(loss):
    """(fused call with a backend name, the reference's value) of a small float64 problem."""
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.arange(9) // 3
    if loss == "rll":
        return lambda b: rll_kernels.ranked_list_loss(x, y, backend=b), reference.ranked_list_loss(x, y)
    if loss == "softtriple":
        w = torch.randn(4, 3 * 2, dtype=torch.float64)
        return (
            lambda b: rll_kernels.soft_triple_loss(x, y, w, 2, backend=b),
            reference.soft_triple_loss(x, y, w, 2),
        )
    return (
        lambda b: rll_kernels.weighted_contrastive_loss(x, y, backend=b),
        reference.weighted_contrastive_loss(x, y),
    )


REASON = {"cpp": "C++ extension not built (test)", "triton": "triton unusable (test)"}


def _make_unusable(monkeypatch, loss, name):
    """Make backend ``name`` unusable for ``loss`` on CPU tensors through its probe; re-probe."""
    if name == "cpp":
        monkeypatch.setattr(_extension, "cpp_unavailable_reason", lambda: REASON["cpp"])
    elif name == "triton":
        monkeypatch.setattr(_backends._triton, "status", lambda device: REASON["triton"])
    else:
        monkeypatch.setattr(_extension, "has_kernel", lambda op, device: False)
    monkeypatch.delitem(_backends._AVAILABLE, (loss, "cpu"), raising=False)
    monkeypatch.setattr(_backends, "_warned", set())
    why = rll_kernels.available_backends("cpu", loss)[name]
    assert why is not None and why == REASON.get(name, why)
    return why


def test_table_lists_every_backend_of_every_loss():
    table = rll_kernels.available_backends("cpu")
    assert set(table) == set(LOSSES)
    for loss, avail in table.items():
        assert set(avail) == set(BACKENDS[loss]) - {"auto"}
        assert avail["reference"] is None
        assert all(why is None or (isinstance(why, str) and why) for why in avail.values())
    assert table["rll"]["cuda"] is not None  # never usable on CPU tensors


@pytest.mark.parametrize(
    "loss, name", [(loss, b) for loss in LOSSES for b in BACKENDS[loss] if b not in ("auto", "reference")]
)
def test_unavailable_named_backend_raises(monkeypatch, loss, name):
    why = _make_unusable(monkeypatch, loss, name)
    call, _ = _problem(loss)
    with pytest.raises(RuntimeError, match=f"backend '{name}' is not available on cpu") as err:
        call(name)
    assert why in str(err.value)


@pytest.mark.parametrize("loss", LOSSES)
def test_fallback_to_reference_warns_once(monkeypatch, loss):
    _make_unusable(monkeypatch, loss, "cpp")
    call, expected = _problem(loss)
    with pytest.warns(RuntimeWarning, match="falling back to the dense reference") as rec:
        a = call("auto")
    assert REASON["cpp"] in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = call("auto")  # second time: silent
    assert torch.allclose(a, expected, rtol=1e-12, atol=0) and a.item() == b.item()


@pytest.mark.parametrize("loss, bad", [("rll", "cudnn"), ("softtriple", "cuda"), ("osm", "cuda")])
def test_backend_the_loss_does_not_have_is_a_value_error(loss, bad):
    call, _ = _problem(loss)
    with pytest.raises(ValueError, match="backend must be one of"):
        call(bad)


@pytest.mark.loss("rll")
@pytest.mark.backends("triton")
def test_dispatch(backend, device):
    assert rll_kernels.available_backends(device, "rll")["triton"] is None
    # auto picks Triton on CUDA tensors; on CPU tensors "cpp" stays the default
    assert resolve("rll", "auto", torch.device(device)) == ("triton" if device == "cuda" else "cpp")
    assert resolve("rll", "triton", torch.device(device)) == "triton"
    # a module with backend="triton" gives the reference's value
    x = torch.randn(30, 8, device=device, dtype=torch.float64)
    y = torch.randint(0, 4, (30,), device=device)
    assert_close_fp64(
        rll_kernels.RLLFused(backend="triton")(x, y), reference.ranked_list_loss(x, y), "module"
    )


def test_interpreter_env_is_set_without_gpu():
    # guards the Triton parametrisations from silently skipping on a CPU-only CI
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
