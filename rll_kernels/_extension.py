"""The compiled C++ extension ``rll_kernels._C``: loaded once, and why it is not usable when it is not.

Importing ``_C`` runs its ``TORCH_LIBRARY_IMPL`` registrations (CPU kernels, and CUDA kernels when
built with them) on the schemas of ``rll_kernels.ops._schemas``, which must be defined first: the
package imports ``rll_kernels.ops`` (which imports this module after its schemas) before anything else.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY_IMPL registrations)

    HAS_C = True
    C_IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    HAS_C = False
    C_IMPORT_ERROR = str(e)

__all__ = ["C_IMPORT_ERROR", "HAS_C", "cpp_unavailable_reason", "has_kernel"]


def has_kernel(op: str, device: str) -> bool:
    """Whether ``rll_kernels::op`` has a C++ implementation for ``device`` ('cpu' or 'cuda')."""
    if not HAS_C:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rll_kernels::{op}", key)


def cpp_unavailable_reason() -> str | None:
    """None when the C++ extension loaded, else why it did not."""
    return None if HAS_C else f"C++ extension not built ({C_IMPORT_ERROR})"
