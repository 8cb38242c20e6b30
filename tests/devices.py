"""The device each backend's tensors live on in this run (used by conftest.py and the helpers).

CPU tensors for ``cpp``, CUDA tensors for ``cuda``, and for ``triton`` and ``reference`` the GPU when
there is one, else CPU tensors (Triton then runs through its interpreter).
"""

from __future__ import annotations

import torch

GPU = "cuda" if torch.cuda.is_available() else None
DEVICE_OF = {"cpp": "cpu", "cuda": "cuda", "triton": GPU or "cpu", "reference": GPU or "cpu"}
