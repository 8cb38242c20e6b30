"""Does a training step of each loss issue a device-to-host sync? (every loss, every backend, and "auto")

On a GPU: one warm-up step (compiles, caches), then one step under
``torch.cuda.set_sync_debug_mode("warn")`` with every warning recorded (each offender's file and
line), then one under ``"error"`` to confirm (the first offender's traceback). Also on the CPU (the
dry run, and as a second opinion on the GPU), a dispatch mode lists the ATen ops that read a device
value on the host (``item``/``bool``/``int`` of a tensor, ``nonzero``, ``unique``, ...) and
``Tensor.tolist`` calls, with the innermost rll_kernels frame of each. Offenders are reported, not
fatal: this part fails only when a step itself fails.
"""

from __future__ import annotations

import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.device.context import Ctx
from bench.device.losses import LOSSES, fused_fn, not_available, problem

HOST_READS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
}
HOST_READS |= {"equal", "is_nonzero", "repeat_interleave", "bincount", "histc"}


def _where() -> str:
    """The innermost frame of the package (else of this repository) in the current stack."""
    frames = [f for f in traceback.extract_stack()[:-2] if "/bench/device/" not in f.filename]
    ours = [f for f in frames if "rll_kernels" in f.filename] or frames
    f = ours[-1]
    return f"{f.filename.split('rll_kernels/')[-1] if 'rll_kernels' in f.filename else f.filename}:{f.lineno}"


class HostReads(TorchDispatchMode):
    """Records every ATen op that needs a device value on the host (a sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in HOST_READS:
            self.found.append(f"{func.__name__} at {_where()}")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        mode = self

        def tolist(t):
            mode.found.append(f"Tensor.tolist at {_where()}")
            return mode._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _step_fn(ctx: Ctx, loss, backend: str, n: int, d: int):
    """A training step: a linear layer, the loss, backward, an SGD step."""
    prob = problem(loss, n, d, ctx.dev, seed=3)
    layer = torch.nn.Linear(d, d, device=ctx.dev)
    leaves = prob.leaves(torch.float32)
    params = list(layer.parameters()) + leaves[1:]  # SoftTriple's centers are trained as well
    opt = torch.optim.SGD(params, lr=1e-3)
    fn = fused_fn(loss, backend, ctx.dry)
    x = leaves[0].detach()

    def step():
        opt.zero_grad(set_to_none=True)
        fn([layer(x)] + leaves[1:], prob.y).backward()
        opt.step()

    return step


def check_one(ctx: Ctx, loss, backend: str, n: int, d: int) -> None:
    label = f"{loss.name} {backend}"
    try:
        step = _step_fn(ctx, loss, backend, n, d)
        step()  # warm-up: Triton compiles, cached parameters
    except Exception as e:
        if not_available(e):
            ctx.note(f"  {label}: not available", summary=False)
        else:
            ctx.check(label, False, f"the step failed: {type(e).__name__}: {str(e)[:160]}")
        return
    if ctx.dev == "cuda":
        torch.cuda.synchronize()
    with HostReads() as reads:
        step()
    found = sorted(set(reads.found))
    if ctx.dev == "cuda":
        found += _debug_mode_offenders(step)
    ctx.check(label, True, "step ran")
    ctx.note(
        f"sync {label}: {'none' if not found else str(len(found)) + ' offender(s): ' + '; '.join(found)}"
    )


def _debug_mode_offenders(step) -> list[str]:
    """Offenders that torch.cuda.set_sync_debug_mode reports: all in "warn" mode, the first in "error"."""
    out = []
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()
        torch.cuda.set_sync_debug_mode("default")
        out += sorted(
            {
                f"sync-debug warn at {w.filename.split('rll_kernels/')[-1]}:{w.lineno}"
                for w in rec
                if "synchroniz" in str(w.message)
            }
        )
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        except RuntimeError as e:
            tb = [f for f in traceback.extract_tb(e.__traceback__) if "rll_kernels" in f.filename]
            where = f"{tb[-1].filename.split('rll_kernels/')[-1]}:{tb[-1].lineno}" if tb else "?"
            out.append(f"sync-debug error at {where}: {str(e).splitlines()[0][:80]}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return out


def run(ctx: Ctx) -> int:
    n, d = (24, 16) if ctx.dry else (1024, 128)
    for loss in LOSSES.values():
        for backend in loss.backends + ("auto",):
            if ctx.dry and backend == "cuda":
                continue  # the emulated kernels run in a CPU subprocess: nothing to sync
            check_one(ctx, loss, backend, n, d)
    return ctx.finish()
