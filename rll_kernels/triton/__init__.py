"""Triton backends (GPU; CPU tensors under TRITON_INTERPRET=1).

Submodules import triton lazily so that `import rll_kernels` never needs it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Optional

import torch

from .._checks import compute_dtype


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def hyper_params(x: torch.Tensor, *values: float) -> torch.Tensor:
    """A kernel's hyper-parameters as a tensor in the accumulation dtype of ``x``, on its device.

    Every Triton kernel reads its hyper-parameters from such a tensor (``PRM``): Triton passes a
    Python float to a compiled kernel as fp32, which would break fp64 parity (docs/semantics.md
    §1.2). Cached per (device, dtype, values): a host-to-device copy per call would synchronise the
    stream (pageable memory). The kernels only read it.
    """
    return _hyper_params(str(x.device), compute_dtype(x.dtype), tuple(float(v) for v in values))


@functools.lru_cache(maxsize=64)
def _hyper_params(device: str, dtype: torch.dtype, values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def strict_checks() -> bool:
    """``RLL_STRICT_FINITE=1``: the Triton launchers make the value checks of the CPU ops (finite
    rows, the SoftTriple label range, the OSM attention range) and raise their ValueError, at the
    cost of a device sync (docs/semantics.md §6); by default a bad value gives a NaN loss, no sync."""
    return os.environ.get("RLL_STRICT_FINITE", "0") == "1"


def raise_if(bad: torch.Tensor, message: str) -> None:
    """The strict check: ``ValueError(message)`` when the 0-dim bool tensor ``bad`` is true (a sync)."""
    if bool(bad):
        raise ValueError(message)


def status(device: torch.device | str) -> Optional[str]:
    """None if the Triton backend can run on ``device``, else why not.

    Usable on a CUDA tensor when triton is importable, and on a CPU tensor when triton is
    importable and the interpreter is on (``TRITON_INTERPRET=1`` set before the kernels were
    imported: Triton reads it when a kernel is decorated).
    """
    dev = torch.device(device).type
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    loaded = sys.modules.get(f"{__name__}.rll")
    interp = loaded.INTERPRET if loaded is not None else interpret_mode()
    if dev == "cuda":
        # (with TRITON_INTERPRET=1 the interpreter also runs CUDA tensors, slowly: copies to the host)
        return None if torch.cuda.is_available() else "CUDA is not available"
    if dev == "cpu":
        if interp:
            return None
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before importing rll_kernels)"
    return f"no Triton backend for {dev} tensors"
