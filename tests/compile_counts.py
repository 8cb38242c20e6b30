"""torch.compile over many batch sizes, counting the graphs it makes (docs/semantics.md §6: nothing per
call depends on the shapes, so a compiled loss never recompiles after the second size)."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

SIZES = tuple(range(5, 17))  # 12 distinct batch sizes


def graphs_over_sizes(fn, make_args, dynamic, sizes=SIZES, backend: str = "aot_eager") -> int:
    """Compile ``fn`` with fullgraph=True (``dynamic`` True or None, the default), run forward and
    backward on ``make_args(n)`` for every n in ``sizes`` and return the number of graphs dynamo made.

    ``aot_eager`` traces the ops' fake kernels and autograd as inductor does, without its C++ build
    (the inductor run is test_torch_compile_fullgraph); the guards, hence the recompiles, are the same."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=backend)
    for n in sizes:
        args = make_args(n)
        loss = compiled(*args)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        torch.autograd.grad(loss.sum(), leaves)
    return counters["stats"]["unique_graphs"]


def assert_no_recompile(fn, make_args, dynamic) -> None:
    """One graph with dynamic=True; at most two with the default (static, then dynamic after the
    second size), whatever the number of sizes."""
    graphs = graphs_over_sizes(fn, make_args, dynamic)
    expected = 1 if dynamic else 2
    assert graphs <= expected, f"{graphs} graphs over {len(SIZES)} batch sizes (dynamic={dynamic})"
