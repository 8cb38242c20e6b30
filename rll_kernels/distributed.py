"""Data-parallel Ranked List Loss: local queries against the gallery gathered from every rank."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ._checks import check_embeddings, check_labels
from .functional import ranked_list_loss
from .modules import RLLFused, rll_kwargs

__all__ = ["DistributedLossWrapper"]


def _gather_sizes(n_local: int, device: torch.device, group) -> list[int]:
    world = dist.get_world_size(group)
    mine = torch.tensor([n_local], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


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

    def _world(self) -> tuple[int, int]:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DistributedLossWrapper needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group)"
            )
        return dist.get_world_size(self.group), dist.get_rank(self.group)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None) -> torch.Tensor:
        """:math:`\\mathcal{L}_r` of this rank's (N_r, D) ``embeddings`` against the global batch."""
        if indices_tuple is not None:
            raise ValueError("indices_tuple is not supported for this loss function (RLL mines its own sets)")
        if self.loss.reduction != "mean":
            raise ValueError(
                f"DistributedLossWrapper: loss.reduction must be 'mean', got {self.loss.reduction!r}"
            )
        world, rank = self._world()
        check_embeddings(embeddings, "embeddings", allow_empty=True)
        dev = embeddings.device
        n_local = embeddings.shape[0]
        labels = check_labels(labels, n_local, "labels", dev)
        kwargs = rll_kwargs(self.loss, "DistributedLossWrapper")
        sizes = _gather_sizes(n_local, dev, self.group)
        dims = _gather_sizes(embeddings.shape[1], dev, self.group)
        if len(set(dims)) != 1:
            raise ValueError(
                f"DistributedLossWrapper: every rank must have the same embedding size, got {dims}"
            )
        n_total = sum(sizes)
        if n_total == 0:
            raise ValueError("DistributedLossWrapper: the global batch is empty on every rank")
        differentiable = kwargs["semantics"] == "pml" and torch.is_grad_enabled() and embeddings.requires_grad
        gallery = _all_gather_rows(
            embeddings if differentiable else embeddings.detach(), sizes, self.group, differentiable
        )
        g_labels = _all_gather_rows(labels, sizes, self.group, False)
        if n_local == 0:
            # nothing to rank here; in "pml" the backward must still join the gather's collective
            return (embeddings.sum() + gallery.sum()) * 0.0
        offset = sum(sizes[:rank])
        q_ids = torch.arange(offset, offset + n_local, device=dev)
        g_ids = torch.arange(n_total, device=dev)
        local_mean = ranked_list_loss(
            embeddings,
            labels,
            **kwargs,
            reduction="mean",
            ref_emb=gallery,
            ref_labels=g_labels,
            query_ids=q_ids,
            ref_ids=g_ids,
            den_rows=n_total,
        )
        return local_mean * (world * n_local / n_total)

    def extra_repr(self) -> str:
        return "group=" + ("WORLD" if self.group is None else repr(self.group))
