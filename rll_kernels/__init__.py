"""rll_kernels: fused kernels for deep-metric-learning losses (Ranked List Loss and siblings)."""

from . import (  # noqa: F401  (_ops loads the C++ extension and registers autograd)
    _ops,
    metrics,
    reference,
)
from ._dispatch import available_backends
from .distributed import DistributedLossWrapper
from .functional import ranked_list_loss
from .modules import RLLFused
from .osm import WeightedContrastiveFused, class_aware_attention, weighted_contrastive_loss
from .softtriple import SoftTripleFused, soft_triple_loss
from .xbm import CrossBatchMemory

__version__ = "0.1.0"
__all__ = ["RLLFused", "ranked_list_loss", "available_backends", "reference", "__version__"]
__all__ += ["SoftTripleFused", "soft_triple_loss"]
__all__ += ["metrics"]
__all__ += ["WeightedContrastiveFused", "class_aware_attention", "weighted_contrastive_loss"]
__all__ += ["CrossBatchMemory", "DistributedLossWrapper"]
