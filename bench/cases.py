"""Benchmark cases of the Ranked List Loss: the grids, their FLOP floors and memory predictions."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

SEMANTICS = ("paper", "pml")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape.

    ``M is None`` means in-batch (the N queries ranked against each other); otherwise the N queries
    are ranked against a memory bank of M rows (no gradient to the bank).
    """

    N: int
    D: int
    semantics: str
    M: Optional[int] = None
    dtype: str = "float32"
    loss: str = "rll"

    @property
    def in_batch(self) -> bool:
        return self.M is None

    @property
    def cols(self) -> int:
        """Gallery size: N in-batch, M with a bank."""
        return self.N if self.M is None else self.M

    @property
    def kind(self) -> str:
        return "in-batch" if self.in_batch else "bank"

    @property
    def label(self) -> str:
        shape = f"N={self.N}" if self.in_batch else f"N={self.N} M={self.M}"
        return f"{self.kind} {shape} D={self.D} {self.semantics}"

    def key(self) -> str:
        """A short unique id (used for file names and CSV grouping)."""
        return f"{self.loss}_{self.kind}_N{self.N}_M{self.M or 0}_D{self.D}_{self.semantics}_{self.dtype}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Case:
        return Case(**d)


def full_grid() -> list[Case]:
    """The benchmark grid: in-batch N x D (the training batch sizes 64-512, then 4096 and 16384) and a
    256-query bank sweep, both semantics."""
    sizes = (64, 128, 256, 512, 4096, 16384)
    cases = [Case(N=n, D=d, semantics=s) for s in SEMANTICS for d in (128, 512) for n in sizes]
    cases += [Case(N=256, M=m, D=512, semantics=s) for s in SEMANTICS for m in (8192, 32768, 131072)]
    return cases


def quick_grid() -> list[Case]:
    """A two-minute subset: small in-batch sizes and one bank case, both semantics."""
    cases = [Case(N=n, D=128, semantics=s) for s in SEMANTICS for n in (64, 256, 1024)]
    cases += [Case(N=256, M=8192, D=128, semantics=s) for s in SEMANTICS]
    return cases


def tiny_grid() -> list[Case]:
    """A seconds-long smoke test of the machinery (not a benchmark)."""
    cases = [Case(N=n, D=32, semantics=s) for s in SEMANTICS for n in (64, 128)]
    cases += [Case(N=64, M=512, D=32, semantics=s) for s in SEMANTICS]
    return cases


GRIDS = {"full": full_grid, "quick": quick_grid, "tiny": tiny_grid}


def floor_flops(case: Case) -> float:
    """FLOPs of the GEMMs a fused kernel cannot avoid (the "floor").

    In-batch "paper": distance GEMM + query-gradient GEMM = 4 N^2 D; "pml" adds the recompute and the
    gallery-gradient GEMM of the second pass = 8 N^2 D. Bank: distance + query gradient = 4 N M D.
    """
    if case.in_batch:
        return (8.0 if case.semantics == "pml" else 4.0) * case.N * case.N * case.D
    return 4.0 * case.N * case.M * case.D


def gemm_shape(case: Case) -> tuple[int, int, int]:
    """(rows, inner, cols) of the case's distance GEMM, timed to get the machine's GEMM rate."""
    return case.N, case.D, case.cols


# bytes per (i, j) pair held at the peak of forward + backward (fp32), by provider family
# (PML saves ~33 B/pair for backward plus temporaries: docs/semantics.md §2.8)
BYTES_PER_PAIR = {"reference": 40.0, "pml": 40.0, "compile": 12.0, "keops": 0.0, "fused": 0.0}


def predicted_bytes(case: Case, family: str) -> float:
    """Predicted peak memory growth of a provider family on ``case`` (for the OOM guard)."""
    elem = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    rows = (case.N + case.cols) * case.D * elem * 4  # inputs, normalised copies, gradients
    return BYTES_PER_PAIR.get(family, 40.0) * case.N * case.cols + rows
