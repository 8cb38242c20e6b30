"""The compiled C++ extension ``rll_kernels._C``: loaded once, and why it is not usable when it is not.

The C++ kernels are compiled against torch's C++ ABI, which changes between torch releases: an
extension built against one release fails to load next to another (undefined symbols) or, worse,
loads and misbehaves. setup.py therefore records the torch it compiled against in
``_build_info.json`` beside the extension, and the extension is loaded only when the running torch
has the same major.minor version (and CUDA, if CUDA kernels were compiled in). Otherwise, or when no
extension was built, ``import rll_kernels`` still works without it (reference and Triton backends
usable) and :func:`cpp_unavailable_reason` names the torch it was built with, the torch loaded, and
the command that rebuilds it against the latter.

The CPU kernels are compiled once per SIMD capability (AVX2 and AVX-512 on x86-64); the extension
picks one build when it loads, from the CPU, or the one ``RLL_KERNELS_CPU_CAPABILITY`` (``avx2``,
``avx512``) names: :func:`cpu_capability` says which. A value of that variable naming no build, or
``avx512`` on a CPU without AVX-512, is an error: importing the extension (and so ``rll_kernels``)
raises a ``ValueError`` that names the variable.

Importing ``_C`` runs its ``TORCH_LIBRARY_IMPL`` registrations (CPU kernels, and CUDA kernels when
built with them) on the schemas of ``rll_kernels.ops._schemas``, which must be defined first: the
package imports ``rll_kernels.ops`` (which imports this module after its schemas) before anything else.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import sys

import torch

__all__ = [
    "BUILD_INFO",
    "C_IMPORT_ERROR",
    "HAS_C",
    "cpp_unavailable_reason",
    "cpu_capability",
    "extension_status",
    "has_kernel",
    "rebuild_command",
]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO_FILE = "_build_info.json"  # written by setup.py next to the compiled extension


def _read_build_info() -> dict | None:
    try:
        with open(os.path.join(_PKG_DIR, BUILD_INFO_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _abi_mismatch(info: dict) -> str | None:
    """Why an extension described by ``info`` cannot run under this torch, or None if it can."""
    built = str(info.get("torch", "?"))
    if _major_minor(built) != _major_minor(torch.__version__):
        return f"it was built against torch {built}, this process runs torch {torch.__version__}"
    if info.get("cuda_kernels") and torch.version.cuda is None:
        return (
            f"it was built with CUDA kernels against torch {built}, this process runs torch "
            f"{torch.__version__}, which has no CUDA"
        )
    return None


def _load() -> tuple[bool, str | None]:
    """(loaded, why not): import ``_C`` unless it is missing or built for another torch."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        built = f"torch {BUILD_INFO['torch']}" if BUILD_INFO else "none (nothing was compiled)"
        return False, (
            f"it is not built (no compiled rll_kernels._C in {_PKG_DIR}; built against: {built}; "
            f"this process runs torch {torch.__version__})"
        )
    why = _abi_mismatch(BUILD_INFO) if BUILD_INFO else None
    if why is not None:
        return False, f"{why}; not loaded: torch does not keep its C++ ABI between releases"
    try:
        # runs the TORCH_LIBRARY_IMPL registrations; a bad RLL_KERNELS_CPU_CAPABILITY raises ValueError
        from . import _C  # noqa: F401
    except ImportError as e:
        built = f"torch {BUILD_INFO['torch']}" if BUILD_INFO else "an unknown torch (no build record)"
        return (
            False,
            f"it failed to load ({e}); built against {built}, this process runs torch {torch.__version__}",
        )
    return True, None


BUILD_INFO: dict | None = _read_build_info()
HAS_C, C_IMPORT_ERROR = _load()


def has_kernel(op: str, device: str) -> bool:
    """Whether ``rll_kernels::op`` has a C++ implementation for ``device`` ('cpu' or 'cuda')."""
    if not HAS_C:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rll_kernels::{op}", key)


def cpu_capability() -> tuple[str, str] | None:
    """(build, why) of the CPU kernels this process runs, e.g. ``("avx512", "chosen from the CPU
    (ATen's CPU capability: avx512)")``; None without the extension."""
    if not HAS_C:
        return None
    from . import _C

    name, why = _C.cpu_capability()
    return name, why


def _source_dir() -> str | None:
    """The source tree to rebuild from: the clone this package lives in, else the one it was built from."""
    here = os.path.dirname(_PKG_DIR)
    recorded = (BUILD_INFO or {}).get("source_dir")
    for cand in (here, recorded):
        if cand and os.path.isfile(os.path.join(cand, "setup.py")):
            return cand
    return None


def rebuild_command() -> str:
    """The shell command that builds the extension against the torch of this interpreter."""
    pip = f"{shlex.quote(sys.executable)} -m pip install --no-build-isolation"
    src = _source_dir()
    if src is None:
        return f"{pip} /path/to/a/clone/of/rll_kernels"
    editable = os.path.realpath(src) == os.path.realpath(os.path.dirname(_PKG_DIR))
    return f"cd {shlex.quote(src)} && {pip} {'-e ' if editable else ''}."


def cpp_unavailable_reason() -> str | None:
    """None when the C++ extension loaded, else why not and the command that rebuilds it."""
    if HAS_C:
        return None
    return (
        f"the C++ extension is unusable: {C_IMPORT_ERROR}. Rebuild it against this torch: {rebuild_command()}"
    )


def extension_status() -> str:
    """One line for env_report: built against which torch and loaded, or why not."""
    if not HAS_C:
        return f"NOT usable: {C_IMPORT_ERROR}. Rebuild it against this torch: {rebuild_command()}"
    if BUILD_INFO is None:
        return "built, loaded (no build record)"
    kernels = "CPU + CUDA kernels" if BUILD_INFO.get("cuda_kernels") else "CPU kernels"
    return f"built against torch {BUILD_INFO.get('torch')} ({kernels}), loaded"
