"""Data-parallel Ranked List Loss: local queries against the gallery gathered from every rank."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ._checks import check_embeddings, check_labels
from ._gather import GlobalBatch, gather_batch, world_and_rank
from .functional import ranked_list_loss
from .modules import RLLFused, rll_kwargs
from .xbm import CrossBatchMemory

__all__ = ["DistributedLossWrapper", "GlobalBatch", "gather_batch", "world_and_rank"]


class DistributedLossWrapper(nn.Module):
    r"""Rank each process's queries against the batch gathered from every process.

    Rank :math:`r` holds :math:`n_r` embeddings; :math:`n = \sum_r n_r`, :math:`W` the world
    size. Embeddings and labels are all-gathered (uneven :math:`n_r` allowed) into the global
    gallery :math:`G`; the local queries are ranked against it with the global self-pair left
    out, and the rank returns

    .. math::
        \mathcal{L}_r = W \frac{n_r}{n} \cdot \frac{1}{n_r} \sum_{i \in r} L_{\mathrm{RLL}}(e_i; G)
                    = \frac{W}{n} \sum_{i \in r} L_{\mathrm{RLL}}(e_i; G),

    so :math:`\frac{1}{W}\sum_r \mathcal{L}_r` is the loss of the global batch, and DDP's average
    of the ranks' gradients is its gradient (docs/semantics.md §2.7).

    ``"paper"`` semantics: the gallery is a constant; the gather is not differentiated.
    ``"pml"``: the gather is ``torch.distributed.nn.functional.all_gather``, so each gallery row's
    gradient, summed over every rank that ranked against it, returns to the rank that owns the
    row; the ``M * 1e-5`` bias uses the global gallery size :math:`M = n`. Every rank must then call
    ``backward`` (the gather's backward is a collective), as with DDP.

    Args:
        loss: an :class:`rll_kernels.RLLFused` with ``reduction="mean"``; its hyper-parameters,
            semantics, normalisation and backend are read at every call.
        group: the process group (default: the world).

    Example::

        loss_fn = DistributedLossWrapper(RLLFused(semantics="pml"))
        loss = loss_fn(ddp_model(x), y)    # inside a torch.distributed job
        loss.backward()
    """

    def __init__(self, loss: RLLFused, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        if isinstance(loss, CrossBatchMemory):
            raise ValueError(
                "DistributedLossWrapper: loss is a CrossBatchMemory, whose memory would then differ "
                "from rank to rank; use CrossBatchMemory(..., distributed=True) instead (one memory "
                "across ranks, docs/semantics.md §2.7)"
            )
        rll_kwargs(loss, "DistributedLossWrapper")  # type check
        if loss.reduction != "mean":
            raise ValueError(
                "DistributedLossWrapper: loss.reduction must be 'mean' (the global-batch mean), "
                f"got {loss.reduction!r}"
            )
        if loss.backend == "reference":
            raise ValueError(
                "DistributedLossWrapper: loss.backend must be a fused backend ('auto', 'cpp', "
                "'triton', 'cuda'): the dense reference's O(n_local x n_total) memory defeats its "
                "purpose, got 'reference'"
            )
        self.loss = loss
        self.group = group

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple: Optional[tuple] = None
    ) -> torch.Tensor:
        """:math:`\\mathcal{L}_r` of this rank's (N_r, D) ``embeddings`` against the global batch."""
        if indices_tuple is not None:
            raise ValueError("indices_tuple is not supported for this loss function (RLL mines its own sets)")
        if self.loss.reduction != "mean":
            raise ValueError(
                f"DistributedLossWrapper: loss.reduction must be 'mean', got {self.loss.reduction!r}"
            )
        world_and_rank(self.group, "DistributedLossWrapper")
        check_embeddings(embeddings, "embeddings", allow_empty=True, finite=False)  # the op checks rows
        labels = check_labels(labels, embeddings.shape[0], "labels", embeddings.device)
        kwargs = rll_kwargs(self.loss, "DistributedLossWrapper")
        batch = gather_batch(
            embeddings,
            labels,
            None,
            group=self.group,
            attached=kwargs["semantics"] == "pml" and torch.is_grad_enabled(),
            owner="DistributedLossWrapper",
        )
        if batch.sizes[batch.rank] == 0:
            return batch.zero_loss(embeddings)  # nothing to rank here
        ids = torch.arange(batch.n_total, device=embeddings.device)  # global positions
        local_mean = ranked_list_loss(
            embeddings,
            labels,
            **kwargs,
            reduction="mean",
            ref_emb=batch.embeddings,
            ref_labels=batch.labels,
            query_ids=ids[batch.local],
            ref_ids=ids,
        )
        return batch.share_of_global_mean(local_mean)

    def extra_repr(self) -> str:
        return "group=" + ("WORLD" if self.group is None else repr(self.group))
