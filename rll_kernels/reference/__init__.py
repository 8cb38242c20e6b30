"""Dense pure-PyTorch references of every loss: the ground truth the fused backends are tested against.

They materialise N x M (or N x C*K) matrices on purpose (clarity over memory); never use them at scale.
"""

from ._common import id_exclusion, pairwise_distance
from .osm import weighted_contrastive_loss
from .rll import ranked_list_loss
from .softtriple import soft_triple_loss, soft_triple_regularizer, sparse_centers_term

__all__ = [
    "id_exclusion",
    "pairwise_distance",
    "ranked_list_loss",
    "soft_triple_loss",
    "soft_triple_regularizer",
    "sparse_centers_term",
    "weighted_contrastive_loss",
]
