"""The torch.library layer: op schemas, fake kernels and autograd, one definition per loss.

Import order matters: the schemas first, then the C++ extension (its kernels register on them),
then each loss's fake kernel, autograd and Triton registration.
"""

from . import _schemas  # noqa: F401, I001  (schemas before the extension that implements them)
from .. import _extension  # noqa: F401  (loads rll_kernels._C)
from . import osm, rll, softtriple  # noqa: F401  (fake kernels, autograd, Triton kernels)
from ._schemas import OPS

__all__ = ["OPS"]
