"""Backend selection: 'auto' picks the fused kernel for the tensor's device; names are strict."""

from __future__ import annotations

import logging
import warnings

import torch

from . import _ops

log = logging.getLogger("rll_kernels")

BACKENDS = ("auto", "cpp", "triton", "cuda", "reference")
_warned: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# Filled once per device type (outside any torch.compile trace: see the warm-up at the bottom), so
# compiled code reads a constant instead of tracing dispatcher queries.
_AVAILABLE: dict[str, dict[str, str | None]] = {}


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """Map backend name -> None if usable on ``device``, else the reason it is not."""
    dev = torch.device(device).type
    if dev not in _AVAILABLE:
        _AVAILABLE[dev] = _probe(dev)
    return dict(_AVAILABLE[dev])


def _probe(dev: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {"reference": None}
    if dev == "cpu":
        out["cpp"] = (
            None if _ops.has_kernel("rll_fwd", "cpu") else f"C++ extension not built ({_ops.C_IMPORT_ERROR})"
        )
    else:
        out["cpp"] = "the cpp backend runs on CPU tensors only"
    out["cuda"] = (
        None
        if dev == "cuda" and _ops.has_kernel("rll_fwd", "cuda")
        else "CUDA kernels not built or tensor not on CUDA"
    )
    from . import triton as _triton

    out["triton"] = _triton.status(torch.device(dev))
    return out


def fused_ops(backend: str):
    """(forward op, backward op) of RLL for a fused backend; same schema for every backend."""
    if backend == "triton":
        from .triton import rll as _trl  # noqa: F401  (registers the Triton custom ops)

        return torch.ops.rll_kernels.rll_triton_fwd, torch.ops.rll_kernels.rll_triton_bwd
    # "cpp" and "cuda" are the CPU and CUDA implementations of one TORCH_LIBRARY op
    return torch.ops.rll_kernels.rll_fwd, torch.ops.rll_kernels.rll_bwd


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``; raises if a named one is unusable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    avail = available_backends(device)
    if backend != "auto":
        why = avail.get(backend)
        if why is not None:
            raise RuntimeError(f"rll_kernels: backend {backend!r} is not available on {device}: {why}")
        return backend
    order = ("cpp",) if device.type == "cpu" else ("triton",)
    for name in order:
        if avail.get(name) is None:
            return name
    reasons = "; ".join(f"{n}: {avail.get(n)}" for n in order)
    warn_once(
        f"fallback-{device.type}",
        f"rll_kernels: no fused backend for {device.type} tensors ({reasons}); "
        "falling back to the dense O(N*M) reference",
    )
    return "reference"


available_backends("cpu")
if torch.cuda.is_available():
    available_backends("cuda")
