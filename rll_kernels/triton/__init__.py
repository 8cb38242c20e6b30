"""Triton backends (GPU; CPU tensors under TRITON_INTERPRET=1).

Submodules import triton lazily so that `import rll_kernels` never needs it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def status(device: torch.device | str) -> Optional[str]:
    """None if the Triton backend can run on ``device``, else why not."""
    return "Triton backend not implemented yet"


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
