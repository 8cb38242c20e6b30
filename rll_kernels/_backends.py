"""The backend registry of every loss: one probe per (loss, backend, device), one resolve, one fallback.

Backends: ``"cpp"`` (the C++ extension's CPU kernels), ``"cuda"`` (its CUDA kernels, experimental:
``"auto"`` never picks it), ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)
and ``"reference"`` (dense pure PyTorch, O(N M) memory). ``"auto"`` picks ``cpp`` on CPU tensors and
``triton`` on CUDA tensors; if that one is unusable it warns once per loss and device type and falls
back to the reference. A backend asked for by name that is unusable raises RuntimeError.

The probes run once per device type, outside any torch.compile trace (see the end of this module),
so compiled code reads a constant instead of tracing dispatcher queries.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import _extension
from . import triton as _triton
from ._checks import check_choice
from .ops._schemas import OPS

__all__ = ["BACKENDS", "LOSSES", "available_backends", "fused_op", "resolve", "warn_once"]

LOSSES = ("rll", "softtriple", "osm")
# the backends each loss accepts (the CUDA C++ kernels exist for RLL only)
BACKENDS: dict[str, tuple[str, ...]] = {
    "rll": ("auto", "cpp", "triton", "cuda", "reference"),
    "softtriple": ("auto", "cpp", "triton", "reference"),
    "osm": ("auto", "cpp", "triton", "reference"),
}
_NAMES = {"rll": "Ranked List Loss", "softtriple": "SoftTriple", "osm": "OSM"}
_DENSE = {"rll": "O(N*M) memory", "softtriple": "materialises N x C*K", "osm": "O(N^2) memory"}

_warned: set[str] = set()
_AVAILABLE: dict[tuple[str, str], dict[str, Optional[str]]] = {}


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _probe_cpp(loss: str, dev: str) -> Optional[str]:
    if dev != "cpu":
        return "the cpp backend runs on CPU tensors only"
    why = _extension.cpp_unavailable_reason()
    if why is not None:
        return why
    return None if _extension.has_kernel(OPS[loss]["cpp"][0], "cpu") else "C++ extension built without it"


def _probe_cuda(loss: str, dev: str) -> Optional[str]:
    if dev == "cuda" and _extension.has_kernel(OPS[loss]["cpp"][0], "cuda"):
        return None
    return "CUDA kernels not built or tensor not on CUDA"


def _probe(loss: str, dev: str) -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"reference": None, "cpp": _probe_cpp(loss, dev)}
    if "cuda" in BACKENDS[loss]:
        out["cuda"] = _probe_cuda(loss, dev)
    out["triton"] = _triton.status(torch.device(dev))
    return out


def available_backends(device: torch.device | str = "cpu", loss: Optional[str] = None) -> dict:
    """Backend name -> None if usable for ``loss`` on ``device``, else the reason it is not.

    With ``loss=None``: that table for every loss, ``{loss: {backend: reason}}``.
    """
    if loss is None:
        return {name: available_backends(device, name) for name in LOSSES}
    check_choice(loss, "loss", LOSSES)
    key = (loss, torch.device(device).type)
    if key not in _AVAILABLE:
        _AVAILABLE[key] = _probe(*key)
    return dict(_AVAILABLE[key])


# (loss, backend, device type) -> (the probe table it was resolved from, the answer)
_RESOLVED: dict[tuple[str, str, str], tuple[dict, str]] = {}


def resolve(loss: str, backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``; raises if one asked for by name is unusable.
    In eager mode the answer is remembered per (loss, backend, device type) as long as the probe
    table it came from stands (a training step at N = 64 should not pay for the lookup again);
    compiled code traces the lookup itself, which reads constants."""
    if torch.compiler.is_compiling():
        return _resolve(loss, backend, device)
    key = (loss, backend, device.type)
    entry = _RESOLVED.get(key)
    if entry is not None and entry[0] is _AVAILABLE.get((loss, device.type)):
        return entry[1]
    name = _resolve(loss, backend, device)
    _RESOLVED[key] = (_AVAILABLE[(loss, device.type)], name)
    return name


def _resolve(loss: str, backend: str, device: torch.device) -> str:
    check_choice(backend, "backend", BACKENDS[loss])
    avail = available_backends(device, loss)
    if backend != "auto":
        why = avail.get(backend)
        if why is not None:
            raise RuntimeError(
                f"rll_kernels: {_NAMES[loss]} backend {backend!r} is not available on {device}: {why}"
            )
        return backend
    name = "cpp" if device.type == "cpu" else "triton"
    if avail.get(name) is None:
        return name
    warn_once(
        f"fallback-{loss}-{device.type}",
        f"rll_kernels: no fused {_NAMES[loss]} backend for {device.type} tensors "
        f"({name}: {avail.get(name)}); "
        f"falling back to the dense reference ({_DENSE[loss]})",
    )
    return "reference"


def fused_op(loss: str, backend: str, which: str = "fwd") -> torch._ops.OpOverloadPacket:
    """The op of ``loss`` on a fused ``backend``; every backend of a loss shares one schema."""
    fwd, bwd = OPS[loss]["triton" if backend == "triton" else "cpp"]
    return getattr(torch.ops.rll_kernels, fwd if which == "fwd" else bwd)


for _loss in LOSSES:
    available_backends("cpu", _loss)
    if torch.cuda.is_available():
        available_backends("cuda", _loss)
