"""The global batch of a torch.distributed step: every rank's rows, labels and dataset indices gathered
in rank order (uneven sizes and an empty rank allowed), differentiably where "pml" gradients must flow
back to the owner rank. Shared by DistributedLossWrapper and CrossBatchMemory(distributed=True)
(docs/semantics.md §2.7).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["GlobalBatch", "gather_batch", "world_and_rank"]


def _gather_ints(values: Sequence[int], device: torch.device, group) -> list[tuple[int, ...]]:
    """Every rank's tuple of small ints (the same length on every rank), in rank order: one all_gather."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [tuple(int(v) for v in p) for p in parts]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))])


def _all_gather_rows(x: torch.Tensor, sizes: list[int], group, differentiable: bool) -> torch.Tensor:
    """Concatenate every rank's rows of ``x`` (rank order); ranks may hold different row counts.

    Rows are padded to the largest count for the collective and trimmed after. With
    ``differentiable=True`` the gather is ``torch.distributed.nn.functional.all_gather``, whose
    backward sums, over all ranks, the gradient of this rank's rows and returns it here.
    """
    padded = _pad_rows(x, max(sizes))
    if differentiable:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            # deprecated in favour of _functional_collectives, which has no public autograd gather yet
            warnings.simplefilter("ignore", FutureWarning)
            parts = all_gather(padded, group=group)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def world_and_rank(group: Optional[dist.ProcessGroup], owner: str) -> tuple[int, int]:
    """(world size, rank) of ``group``; RuntimeError naming ``owner`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{owner} needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group)"
        )
    return dist.get_world_size(group), dist.get_rank(group)


@dataclass
class GlobalBatch:
    """The batch of every rank, concatenated in rank order (docs/semantics.md §2.7)."""

    embeddings: torch.Tensor  # (n, D); differentiable back to the owners when gathered so
    labels: torch.Tensor  # (n,) int64
    indices: Optional[torch.Tensor]  # (n,) int64 dataset indices, or None when no rank passed any
    sizes: list[int]  # rows per rank
    rank: int

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def n_total(self) -> int:
        return sum(self.sizes)

    @property
    def local(self) -> slice:
        """This rank's rows of the global batch."""
        offset = sum(self.sizes[: self.rank])
        return slice(offset, offset + self.sizes[self.rank])

    def share_of_global_mean(self, local_mean: torch.Tensor) -> torch.Tensor:
        """W n_r / n times the mean over this rank's queries: the mean over ranks is the global mean."""
        return local_mean * (self.world * self.sizes[self.rank] / self.n_total)

    def zero_loss(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The loss of a rank without rows: 0, joined to the graph so the gather's backward still runs."""
        return (embeddings.sum() + self.embeddings.sum()) * 0.0


def gather_batch(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    indices: Optional[torch.Tensor],
    *,
    group: Optional[dist.ProcessGroup],
    attached: bool,
    owner: str,
) -> GlobalBatch:
    """All-gather every rank's (checked) rows, labels and optional dataset indices; uneven sizes allowed.

    ``attached`` ("pml" semantics with grad enabled): when the rows of any rank require grad, the
    gather is differentiated on every rank (a rank whose rows do not, an empty one say, still
    joins the backward's collective), so each row's gallery gradient returns to its owner.
    Raises ValueError on every rank alike when the embedding sizes differ, the global batch is
    empty, or some non-empty ranks pass ``indices`` and others do not.
    """
    _, rank = world_and_rank(group, owner)
    dev = embeddings.device
    info = _gather_ints(
        (embeddings.shape[0], embeddings.shape[1], indices is not None, embeddings.requires_grad), dev, group
    )
    sizes = [n for n, _, _, _ in info]
    dims = [d for _, d, _, _ in info]
    if len(set(dims)) != 1:
        raise ValueError(f"{owner}: every rank must have the same embedding size, got {dims}")
    if sum(sizes) == 0:
        raise ValueError(f"{owner}: the global batch is empty on every rank")
    with_indices = {bool(h) for n, _, h, _ in info if n > 0}
    if len(with_indices) != 1:
        raise ValueError(
            f"{owner}: indices must be passed on every rank that holds rows or on none, got them on "
            f"ranks {[r for r, (n, _, h, _) in enumerate(info) if n > 0 and h]} of {len(info)}"
        )
    differentiable = attached and any(g for *_, g in info)
    if not differentiable:
        rows = embeddings.detach()
    elif embeddings.requires_grad:
        rows = embeddings
    else:
        rows = embeddings.detach().requires_grad_()  # a leaf: this rank's backward joins the collective
    g_indices = None
    if with_indices == {True}:
        local = indices if indices is not None else labels.new_zeros(0)
        g_indices = _all_gather_rows(local, sizes, group, False)
    return GlobalBatch(
        embeddings=_all_gather_rows(rows, sizes, group, differentiable),
        labels=_all_gather_rows(labels, sizes, group, False),
        indices=g_indices,
        sizes=sizes,
        rank=rank,
    )
