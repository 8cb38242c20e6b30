"""Cross-batch memory (XBM, Wang et al., CVPR 2020) for the fused Ranked List Loss."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._checks import check_embeddings, check_labels
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

    Args:
        loss: an :class:`rll_kernels.RLLFused`; its hyper-parameters, semantics, reduction,
            normalisation and backend are read at every call.
        embedding_size: D, the embedding width the memory holds.
        memory_size: number of rows the memory holds (> 0).
        dtype: floating dtype of the memory (default float32); embeddings must have it.

    Example::

        xbm = CrossBatchMemory(RLLFused(), embedding_size=128, memory_size=8192)
        loss = xbm(model(x), y, indices=idx)    # idx: dataset indices of the batch samples
    """

    def __init__(
        self,
        loss: RLLFused,
        embedding_size: int,
        memory_size: int = 1024,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        rll_kwargs(loss, "CrossBatchMemory")  # type check
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

    def _check(self, embeddings: torch.Tensor) -> None:
        check_embeddings(embeddings, "embeddings")
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
        with the same index are not paired with that query.
        """
        self._check(embeddings)
        n = embeddings.shape[0]
        dev = embeddings.device
        labels = check_labels(labels, n, "labels", dev)
        if indices is not None:
            ids = check_labels(indices, n, "indices", dev)
            if bool((ids < 0).any()):
                raise ValueError(f"CrossBatchMemory: indices must be >= 0, got min {int(ids.min())}")
        else:
            start = int(self.next_anon_id)
            ids = -1 - torch.arange(start, start + n, device=dev)
            self.next_anon_id += n
        filled = int(self.num_filled)
        gallery = torch.cat([embeddings, self.embedding_memory[:filled]])  # memory: a buffer, no grad
        g_labels = torch.cat([labels, self.label_memory[:filled]])
        g_ids = torch.cat([ids, self.index_memory[:filled]])
        out = ranked_list_loss(
            embeddings,
            labels,
            **rll_kwargs(self.loss, "CrossBatchMemory"),
            reduction=self.loss.reduction,
            ref_emb=gallery,
            ref_labels=g_labels,
            query_ids=ids,
            ref_ids=g_ids,
        )
        if enqueue:
            self.enqueue(embeddings, labels, ids)
        return out

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
            f"dtype={self.embedding_memory.dtype}"
        )
