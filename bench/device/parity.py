"""Parity of the fused backends with the dense reference at large N, in fp32, fp16 and bf16.

Each case rounds its float64 inputs once to the case dtype; the reference then runs in float64 and
in float32 on those same points, and a fused result passes when, for the loss and every gradient,
``|fused - ref64| <= 4 |ref32 - ref64| + floor`` (tests/tolerance.py: the fp32 reference's own
error; the floor is 8 fp32 ulps, or 2 ulps of the output dtype for fp16/bf16 gradients). Half
inputs of the Ranked List Loss and OSM are normalised first and handed over with
``normalize=False``, so the kernel and the reference see the same rounded points. Every result must
be finite, also in fp16 at Tn = 10 and Tn = 100 (PML's fp16 result is printed beside it).

Cases run in two phases: first one case per (loss, dtype, D) at a moderate N in parallel worker
processes (this compiles every Triton kernel, several at a time), then the N = 16384 cases in one
process (the kernels are cached by then; the float64 reference needs ~40 GiB there).
"""

from __future__ import annotations

import os

import torch

from bench.device import workers
from bench.device.context import Ctx, free_memory
from bench.device.losses import LOSSES, Problem, fused_fn, has_pml, not_available, problem
from tests.tolerance import assert_close_derived, max_abs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cases(dry: bool) -> tuple[list, list]:
    """(phase 1, phase 2) cases as [loss, dtype, N, D, Tn or None].

    The dry run keeps one case per loss in each phase and each dtype at least once (it checks the
    code paths, in the Triton interpreter: a few seconds per case).
    """
    if dry:
        first = [[name, "fp32", 24, 16, None] for name in LOSSES]
        second = [["rll-paper", "fp16", 32, 16, 100.0], ["rll-pml", "bf16", 32, 16, None]]
        second += [["softtriple", "fp16", 32, 16, None]]
        return first, second
    small, big, d_lo, d_hi, mid = 1024, 16384, 128, 512, 8192
    first, second = [], []
    for name in LOSSES:
        first += [[name, "fp32", small, d_lo, None], [name, "fp32", mid, d_hi, None]]
        first += [[name, "fp16", small, d_lo, None], [name, "bf16", small, d_lo, None]]
        second += [[name, dt, big, d_lo, None] for dt in DTYPES]
        if name.startswith("rll"):
            second += [[name, "fp16", big, d_lo, 100.0]]
    return first, second


def run(ctx: Ctx) -> int:
    first, second = cases(ctx.dry)
    jobs = 2 if ctx.dry else max(1, min(6, (os.cpu_count() or 2) // 2))

    ctx.note(f"## phase 1: {len(first)} cases in {jobs} worker processes", summary=False)
    workers.run(ctx, "parity-cases", workers.split(first, jobs, _cost), tag="a")
    ctx.note(f"## phase 2: {len(second)} cases at N = {second[0][2]} in one process", summary=False)
    workers.run(ctx, "parity-cases", [second], tag="b")
    ctx.note(f"parity: {ctx.passed} checks passed, {ctx.failed} failed")
    return ctx.finish()


def warm(ctx: Ctx) -> int:
    """Phase 1 on the Triton backend only, while the extension builds (bench/device_check.sh): the
    Triton kernels do not need it, and parity then finds them compiled. Its checks are not the
    parity verdict (the package may load without its C++ part here); they only show in warm.log."""
    first, _ = cases(ctx.dry)
    first = first[:1] if ctx.dry else first  # the dry run checks the code path only
    jobs = 1 if ctx.dry else max(1, min(6, (os.cpu_count() or 2) // 3))
    workers.run(ctx, "parity-cases", workers.split([c + [["triton"]] for c in first], jobs, _cost), tag="a")
    return ctx.finish()


def _cost(c) -> float:  # fp32 at large D: the biggest kernels to compile (tf32x3: three MMAs per product)
    return 3.0 if (c[1] == "fp32" and c[3] >= 256) else 1.0


def run_cases(ctx: Ctx, case_list: list) -> int:
    """Cases ``[loss, dtype, N, D, Tn or None]``, optionally with a list of backends to run last."""
    for name, dt, n, d, tn, *only in case_list:
        try:
            one_case(ctx, LOSSES[name], DTYPES[dt], n, d, tn, only[0] if only else None)
        except torch.cuda.OutOfMemoryError:
            ctx.note(f"  {name} {dt} N={n} D={d}: out of memory, skipped at this size")
        free_memory(ctx.dev)
    return ctx.finish()


def _grads(fn, leaves, y, **kw) -> list[torch.Tensor]:
    """[loss, d loss / d leaf ...] on fresh leaves (zeros for a leaf the loss does not reach)."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(leaves, y, **kw)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [loss.detach()] + [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


ROW_CHUNK = 4096  # the float64 RLL reference at N = 16384 in one piece needs ~128 GiB ("pml")


def reference_grads(loss, leaves, y, **kw) -> list[torch.Tensor]:
    """[loss, grads] of the dense reference; the Ranked List Loss in blocks of query rows past ROW_CHUNK.

    A block is ranked against the whole batch as a gallery (``ref_emb``): its rows lose nothing, as
    the pair i = i is a duplicate (d = 0, docs/semantics.md §1.3), so neither a positive past beta
    nor a negative, and has no gradient; the "pml" bias uses the gallery size N either way. Each
    block's backward runs before the next block, so only one block's N x M temporaries live at a time.
    """
    n = leaves[0].shape[0]
    if not loss.name.startswith("rll") or n <= ROW_CHUNK:
        return _grads(loss.reference, leaves, y, **kw)
    x = leaves[0].detach().clone().requires_grad_()
    total, grad = torch.zeros((), dtype=torch.float64, device=x.device), torch.zeros_like(x)
    for i in range(0, n, ROW_CHUNK):
        rows = slice(i, min(n, i + ROW_CHUNK))
        part = loss.reference([x[rows]], y[rows], ref_emb=x, ref_labels=y, reduction="sum", **kw) / n
        (g,) = torch.autograd.grad(part, [x])
        total += part.detach().double()
        grad += g
    return [total.to(part.dtype), grad]


def one_case(ctx: Ctx, loss, dtype, n: int, d: int, tn, only=None) -> None:
    prob: Problem = problem(loss, n, d, ctx.dev, seed=n + d)
    half = dtype in (torch.float16, torch.bfloat16)
    kw = ({"normalize": False} if half and loss.takes_normalize else {}) | ({"Tn": tn} if tn else {})
    xs = prob.leaves(dtype, normalized="normalize" in kw)
    r64 = reference_grads(loss, [t.double() for t in xs], prob.y, **kw)
    r32 = reference_grads(loss, [t.float() for t in xs], prob.y, **kw)
    label = f"{loss.name} {str(dtype).split('.')[1]} N={n} D={d}" + (f" Tn={tn:g}" if tn else "")
    for backend in only or loss.backends:
        try:
            got = _grads(fused_fn(loss, backend, ctx.dry), xs, prob.y, **kw)
        except Exception as e:  # a backend that fails is a finding; one that is absent is a note
            if not_available(e):
                ctx.note(f"  {backend} {label}: not available ({str(e)[:120]})", summary=False)
            else:
                ctx.check(f"{backend} {label}", False, f"{type(e).__name__}: {str(e)[:160]}")
            continue
        names = ["loss"] + [f"grad {i}" for i in range(len(xs))]
        for what, g, a, b in zip(names, got, r32, r64):
            _compare(ctx, f"{backend} {label} {what}", g, a, b)
    if tn and half and has_pml() and loss.pml is not None:
        ctx.note(f"  INFO PML {label}: {_pml_finite(loss, xs, prob.y, tn)}", summary=False)
    del r64, r32


def _compare(ctx: Ctx, name: str, got, ref32, ref64) -> None:
    finite = bool(torch.isfinite(got).all())
    half = got.dtype in (torch.float16, torch.bfloat16)
    ulps = 2.0 * torch.finfo(got.dtype).eps / torch.finfo(torch.float32).eps if half else 8.0
    err = max_abs(got, ref64)
    try:
        assert_close_derived(got, ref32, ref64, name, factor=4.0, ulps=ulps)
        ok, why = finite, ""
    except AssertionError as e:
        ok, why = False, str(e).split(": ", 1)[-1]
    ctx.check(
        name,
        ok,
        f"err {err:.2e}, ref32 err {max_abs(ref32, ref64):.2e}"
        + ("" if finite else ", NOT FINITE")
        + (f"; {why}" if why else ""),
    )


def _pml_finite(loss, xs, y, tn) -> str:
    try:
        v = loss.pml(xs, y, Tn=tn)(xs, y)
        return "NaN/Inf" if not torch.isfinite(v) else f"finite ({v.item():.4g})"
    except Exception as e:  # PML may reject half inputs
        return f"error ({type(e).__name__})"
