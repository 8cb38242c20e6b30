"""Cross-batch memory (XBM, Wang et al., CVPR 2020) for the fused Ranked List Loss."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ._checks import check_embeddings, check_labels
from ._gather import gather_batch, world_and_rank
from .functional import ranked_list_loss
from .modules import RLLFused, rll_kwargs

__all__ = ["CrossBatchMemory"]


class CrossBatchMemory(nn.Module):
    r"""Rank each batch against itself and a ring buffer of earlier batches' embeddings.

    With the current batch :math:`E` (N x D, labels :math:`y`) and the memory :math:`B` (the last
    up to ``memory_size`` enqueued rows, detached), the gallery is :math:`G = [E; B]` with labels
    :math:`[y; y_B]`, and

    .. math::
        \mathcal{L} = \frac{1}{N} \sum_{i=1}^{N} L_{\mathrm{RLL}}\bigl(e_i;\ \{g_j : \mathrm{id}(g_j) \ne
        \mathrm{id}(e_i)\}\bigr)

    where a pair is left out when query and gallery row hold the same sample: the batch row
    itself and, when ``indices`` (dataset indices of the batch) are passed, every memory entry
    enqueued from the same dataset index. Entries enqueued without indices never match anything.
    ``"paper"`` semantics: the gradient reaches the queries only. ``"pml"``: it reaches the batch
    through both the query and the gallery role; the memory is always a constant. The ``M * 1e-5``
    bias of ``"pml"`` uses the full gallery size ``M = N + len(memory)``.

    After the loss is computed the detached batch is enqueued (oldest entries overwritten). The
    memory, its labels, indices, write pointer and fill count are buffers, so ``state_dict`` saves
    and restores them, and ``.to()`` / ``.double()`` move and convert them.

    ``distributed=True`` (torch.distributed, docs/semantics.md §2.7): every rank all-gathers the
    global batch (embeddings, labels, indices; uneven sizes, an empty rank allowed), ranks its own
    queries against [global batch; memory], then enqueues the whole global batch in rank order, so
    every rank holds the same memory. Without ``indices`` the batch rows get ids that are unique
    across ranks and steps and the same on every rank. Rank r returns
    :math:`W\, n_r / n` times the mean over its queries, as :class:`DistributedLossWrapper`: the
    mean over ranks is the loss of one process running this module on the concatenated batches,
    and DDP's gradient averaging gives its gradient; in ``"pml"`` the gallery gradients of the
    current batch return to the rank that owns the rows (every rank must call ``backward``).

    Args:
        loss: an :class:`rll_kernels.RLLFused`; its hyper-parameters, semantics, reduction,
            normalisation and backend are read at every call.
        embedding_size: D, the embedding width the memory holds.
        memory_size: number of rows the memory holds (> 0).
        dtype: floating dtype of the memory (default float32); embeddings must have it.
        distributed: one memory across the ranks of ``group`` (needs ``loss.reduction == "mean"``).
        group: the process group with ``distributed=True`` (default: the world).

    Example::

        xbm = CrossBatchMemory(RLLFused(), embedding_size=128, memory_size=8192)
        loss = xbm(model(x), y, indices=idx)    # idx: dataset indices of the batch samples

        # in a torch.distributed job, one memory for all ranks:
        xbm = CrossBatchMemory(RLLFused(), 128, 8192, distributed=True)
        loss = xbm(ddp_model(x_local), y_local, indices=idx_local)
    """

    def __init__(
        self,
        loss: RLLFused,
        embedding_size: int,
        memory_size: int = 1024,
        *,
        dtype: torch.dtype = torch.float32,
        distributed: bool = False,
        group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        super().__init__()
        rll_kwargs(loss, "CrossBatchMemory")  # type check
        if not isinstance(distributed, bool):
            raise ValueError(f"CrossBatchMemory: distributed must be a bool, got {distributed!r}")
        if distributed:
            self._check_mean(loss)
        if loss.backend == "reference":
            raise ValueError(
                "CrossBatchMemory: loss.backend must be a fused backend ('auto', 'cpp', "
                "'triton', 'cuda'): a memory bank ranked by the dense O(N*M) reference defeats "
                "its purpose, got 'reference'"
            )
        for nm, v in (("embedding_size", embedding_size), ("memory_size", memory_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"CrossBatchMemory: {nm} must be a positive int, got {v!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"CrossBatchMemory: dtype must be a floating torch.dtype, got {dtype!r}")
        self.loss = loss
        self.embedding_size = embedding_size
        self.memory_size = memory_size
        self.distributed = distributed
        self.group = group
        self.register_buffer("embedding_memory", torch.zeros(memory_size, embedding_size, dtype=dtype))
        self.register_buffer("label_memory", torch.zeros(memory_size, dtype=torch.int64))
        # dataset index of each entry; entries enqueued without one get unique negative ids
        self.register_buffer("index_memory", torch.zeros(memory_size, dtype=torch.int64))
        self.register_buffer("queue_idx", torch.zeros((), dtype=torch.int64))  # next slot to write
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.int64))
        self.register_buffer("next_anon_id", torch.zeros((), dtype=torch.int64))

    @property
    def memory(self) -> torch.Tensor:
        """The filled part of the memory (in slot order, not age order)."""
        return self.embedding_memory[: int(self.num_filled)]

    def reset(self) -> None:
        """Empty the memory."""
        self.queue_idx.zero_()
        self.num_filled.zero_()

    @staticmethod
    def _check_mean(loss: RLLFused) -> None:
        if loss.reduction != "mean":
            raise ValueError(
                "CrossBatchMemory(distributed=True): loss.reduction must be 'mean' (the global-batch "
                f"mean), got {loss.reduction!r}"
            )

    def _check(self, embeddings: torch.Tensor) -> None:
        # finite checked here too (a sync): a NaN row enqueued would poison every later loss
        check_embeddings(embeddings, "embeddings", allow_empty=self.distributed)
        mem = self.embedding_memory
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"CrossBatchMemory: embeddings must have embedding size {self.embedding_size}, "
                f"got {embeddings.shape[1]}"
            )
        if embeddings.dtype != mem.dtype:
            raise ValueError(
                f"CrossBatchMemory: embeddings must have the memory's dtype {mem.dtype}, got "
                f"{embeddings.dtype} (convert the module with .to(dtype) or pass dtype=)"
            )
        if embeddings.device != mem.device:
            raise ValueError(
                f"CrossBatchMemory: embeddings must be on the memory's device {mem.device}, got "
                f"{embeddings.device} (move the module with .to(device))"
            )

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: Optional[torch.Tensor] = None,
        *,
        enqueue: bool = True,
    ) -> torch.Tensor:
        """Loss of the batch against batch + memory; then enqueue the batch (unless ``enqueue=False``).

        ``indices``: optional (N,) non-negative dataset indices of the batch samples; memory entries
        with the same index are not paired with that query. With ``distributed=True`` the batch is
        this rank's share, and the global batch is ranked and enqueued (docs/semantics.md §2.7).
        """
        if self.distributed:
            return self._forward_distributed(embeddings, labels, indices, enqueue)
        self._check(embeddings)
        n = embeddings.shape[0]
        labels = check_labels(labels, n, "labels", embeddings.device)
        ids = self._checked_indices(indices, n, embeddings.device)
        if ids is None:
            ids = self._anonymous_ids(n, embeddings.device)
        out = self._loss_vs_memory(embeddings, labels, ids, embeddings, labels, ids, self.loss.reduction)
        if enqueue:
            self.enqueue(embeddings, labels, ids)
        return out

    def _forward_distributed(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: Optional[torch.Tensor], enqueue: bool
    ) -> torch.Tensor:
        owner = "CrossBatchMemory(distributed=True)"
        world_and_rank(self.group, owner)
        self._check_mean(self.loss)
        self._check(embeddings)
        n, dev = embeddings.shape[0], embeddings.device
        labels = check_labels(labels, n, "labels", dev)
        indices = self._checked_indices(indices, n, dev)
        attached = self.loss.semantics == "pml" and torch.is_grad_enabled()
        batch = gather_batch(embeddings, labels, indices, group=self.group, attached=attached, owner=owner)
        # ids of the global batch: its dataset indices, or anonymous ids every rank draws alike
        ids = batch.indices if batch.indices is not None else self._anonymous_ids(batch.n_total, dev)
        if n == 0:
            out = batch.zero_loss(embeddings)  # nothing to rank here
        else:
            local_mean = self._loss_vs_memory(
                embeddings, labels, ids[batch.local], batch.embeddings, batch.labels, ids, "mean"
            )
            out = batch.share_of_global_mean(local_mean)
        if enqueue:
            self.enqueue(batch.embeddings, batch.labels, ids)
        return out

    def _checked_indices(self, indices: Optional[torch.Tensor], n: int, dev: torch.device):
        if indices is None:
            return None
        ids = check_labels(indices, n, "indices", dev)
        if n and bool((ids < 0).any()):
            raise ValueError(f"CrossBatchMemory: indices must be >= 0, got min {int(ids.min())}")
        return ids

    def _anonymous_ids(self, n: int, dev: torch.device) -> torch.Tensor:
        """n fresh negative ids that match no dataset index and no earlier id."""
        start = int(self.next_anon_id)
        self.next_anon_id += n
        return -1 - torch.arange(start, start + n, device=dev)

    def _loss_vs_memory(self, q, q_labels, q_ids, batch, batch_labels, batch_ids, reduction: str):
        """RLL of the queries against [batch; memory], same-id pairs left out (docs/semantics.md §1.5)."""
        filled = int(self.num_filled)
        return ranked_list_loss(
            q,
            q_labels,
            **rll_kwargs(self.loss, "CrossBatchMemory"),
            reduction=reduction,
            ref_emb=torch.cat([batch, self.embedding_memory[:filled]]),  # memory: a buffer, no grad
            ref_labels=torch.cat([batch_labels, self.label_memory[:filled]]),
            query_ids=q_ids,
            ref_ids=torch.cat([batch_ids, self.index_memory[:filled]]),
        )

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Write detached rows into the ring buffer (only the last ``memory_size`` if more)."""
        keep = slice(max(embeddings.shape[0] - self.memory_size, 0), None)
        e, lab, ids = embeddings.detach()[keep], labels[keep], ids[keep]
        n = e.shape[0]
        slots = (int(self.queue_idx) + torch.arange(n, device=e.device)) % self.memory_size
        self.embedding_memory[slots] = e
        self.label_memory[slots] = lab
        self.index_memory[slots] = ids
        self.queue_idx.copy_((self.queue_idx + n) % self.memory_size)
        self.num_filled.clamp_(max=self.memory_size - n).add_(n)

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, "
            f"dtype={self.embedding_memory.dtype}" + (", distributed=True" if self.distributed else "")
        )
