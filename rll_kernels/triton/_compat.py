"""What differs between the triton releases the backend supports (those CUDA torch >= 2.11 pins:
3.6 through 3.9; docs/triton.md "Triton versions")."""

from __future__ import annotations

import triton


def _version(v: str) -> tuple[int, int]:
    major, minor = v.split(".")[:2]
    return int(major), int(minor)


def patch_interpreter_scalar_index() -> None:
    """Let triton 3.6's interpreter use a scalar kernel argument as a ``range`` bound under NumPy >= 2.4.

    The interpreter holds a scalar argument (``M`` in ``for j0 in range(0, M, BLOCK_N)``) as a
    numpy array of shape (1,) and turns it into a Python int with ``int(array)``. NumPy deprecated
    that in 1.25 and refuses it from 2.4 on ("only 0-dimensional arrays can be converted to Python
    scalars"), so every kernel whose loop bound is an argument fails under triton 3.6's interpreter.
    triton 3.7 converts ``array.squeeze()`` instead; this gives 3.6 the same conversion. Compiled
    (GPU) kernels never run this code, and newer triton releases are left alone.
    """
    if _version(triton.__version__) >= (3, 7):
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "_rll_scalar_index", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._rll_scalar_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
