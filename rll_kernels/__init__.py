"""rll_kernels: fused kernels for deep-metric-learning losses (Ranked List Loss and its siblings).

Layers (docs/architecture.md): ``ops`` (op schemas, fake kernels, autograd; importing it loads the
C++ extension), ``reference`` (dense oracles), the backends (``csrc/`` C++, ``triton/``), the
registry (``_backends``), ``functional`` and ``modules``; then the memory bank (``xbm``), the
distributed wrapper and the retrieval ``metrics``.
"""

from . import ops  # noqa: F401, I001  (first: schemas, the C++ extension, fake kernels and autograd)
from . import metrics, reference
from ._backends import available_backends
from .distributed import DistributedLossWrapper
from .functional import class_aware_attention, ranked_list_loss, soft_triple_loss, weighted_contrastive_loss
from .modules import RLLFused, SoftTripleFused, WeightedContrastiveFused
from .xbm import CrossBatchMemory

__version__ = "0.1.0"
__all__ = [
    "CrossBatchMemory",
    "DistributedLossWrapper",
    "RLLFused",
    "SoftTripleFused",
    "WeightedContrastiveFused",
    "__version__",
    "available_backends",
    "class_aware_attention",
    "metrics",
    "ranked_list_loss",
    "reference",
    "soft_triple_loss",
    "weighted_contrastive_loss",
]
