"""Timings (forward, backward, forward+backward, peak memory) and the goal line.

Providers: the fused backends, the dense reference, PML 2.9.0 (when importable: RankedListLoss
computes the "pml" semantics, SoftTripleLoss the same loss without the regulariser) and
torch.compile of the reference. ``bwd`` is the backward of one saved forward, ``full`` a fresh
forward plus its backward; ``peak`` is the extra device memory of one ``full``.

The Triton launches take the first configuration that fits (RLL_TRITON_AUTOTUNE=0: every new
configuration costs a compile of several seconds); the goal part adds the autotuned figure.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import warnings

import torch

from bench.device.context import Ctx, bench_ms, device_name, free_memory, peak_mib
from bench.device.losses import LOSSES, fused_fn, has_pml, not_available, problem
from bench.device.roofline import GOAL, fused_flops, peaks

FIELDS = ["loss", "dtype", "N", "D", "provider", "fwd_ms", "bwd_ms", "full_ms", "peak_MiB", "device", "note"]


@contextlib.contextmanager
def env(**values):
    """Set environment variables (the Triton backend reads its knobs at each launch)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def providers(ctx: Ctx, loss, leaves, y, with_compile: bool, goal: bool) -> list[tuple[str, object]]:
    """[(name, fn(leaves, y) -> loss)] in table order."""
    out = [(b, fused_fn(loss, b, ctx.dry)) for b in loss.backends]
    if ctx.dry and not goal:  # the emulated CUDA kernels: checked by parity and goal, slow to time
        out = out[:1]
    out.append(("reference", loss.reference))
    if loss.pml is not None and has_pml() and loss.name != "rll-paper":
        out.append(("pml", loss.pml(leaves, y)))
    if with_compile:
        backend = "aot_eager" if ctx.dry else "inductor"  # the dry run checks the tracing only
        out.append(("reference+compile", torch.compile(loss.reference, backend=backend, dynamic=False)))
    return out


def measure(ctx: Ctx, fn, leaves, y) -> dict:
    xs = [t.detach().clone().requires_grad_() for t in leaves]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = {"fwd_ms": bench_ms(lambda: fn(xs, y), ctx.dev)}
        r["bwd_ms"] = _backward_ms(ctx, fn(xs, y), xs)
        r["full_ms"] = bench_ms(lambda: fn(xs, y).backward(), ctx.dev, grad_to_none=xs)
        r["peak_MiB"] = peak_mib(lambda: fn(xs, y).backward(), ctx.dev)
    return r


def _backward_ms(ctx: Ctx, out, xs) -> float:
    """The backward of one saved forward (its graph is freed when this returns)."""
    return bench_ms(lambda: out.backward(retain_graph=True), ctx.dev, grad_to_none=xs)


class Table:
    """The timing rows: printed as Markdown as they come, and written to ``<out>/<stem>.csv`` / ``.md``."""

    def __init__(self, ctx: Ctx, stem: str):
        self.ctx, self.stem, self.rows = ctx, stem, []
        self.md = ["| loss | dtype | N | D | provider | fwd ms | bwd ms | full ms | peak MiB | note |"]
        self.md.append("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(self.md), flush=True)

    def add(self, loss, dtype, n, d, provider, r: dict | None, note: str = "") -> None:
        r = r or {}
        row = dict(
            loss=loss, dtype=dtype, N=n, D=d, provider=provider, device=device_name(self.ctx.dev), note=note
        )
        row.update({k: r.get(k, float("nan")) for k in ("fwd_ms", "bwd_ms", "full_ms", "peak_MiB")})
        self.rows.append(row)
        vals = " | ".join(
            "" if math.isnan(row[k]) else f"{row[k]:.3f}" for k in ("fwd_ms", "bwd_ms", "full_ms")
        )
        peak = "" if math.isnan(row["peak_MiB"]) else f"{row['peak_MiB']:.0f}"
        line = f"| {loss} | {dtype} | {n} | {d} | {provider} | {vals} | {peak} | {note} |"
        self.md.append(line)
        print(line, flush=True)
        self.save()

    def save(self) -> None:
        with open(self.ctx.out / f"{self.stem}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(self.rows)
        self.ctx.write(f"{self.stem}.md", "\n".join(self.md) + "\n")

    def get(self, loss, provider) -> dict | None:
        found = [r for r in self.rows if r["loss"] == loss and r["provider"] == provider]
        return found[-1] if found else None


def time_case(ctx: Ctx, table: Table, loss_name: str, dt: str, n: int, d: int, only=None, **kw) -> None:
    """One table block: every provider (or those in ``only``) on one (loss, dtype, N, D).

    ``with_compile`` adds torch.compile of the reference; ``label`` renames the rows.
    """
    label, with_compile, goal_ = kw.get("label"), kw.get("with_compile", False), table.stem == "goal"
    loss = LOSSES[loss_name]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    prob = problem(loss, n, d, ctx.dev, seed=1)
    leaves, y = prob.leaves(dtype), prob.y
    for name, fn in providers(ctx, loss, leaves, y, with_compile, goal_):
        if only is not None and name not in only:
            continue
        name = label or name
        try:
            table.add(loss_name, dt, n, d, name, measure(ctx, fn, leaves, y))
        except torch.cuda.OutOfMemoryError:
            table.add(loss_name, dt, n, d, name, None, "out of memory")
        except Exception as e:  # a provider that cannot run this case is a row, not a crash
            kind = "not available" if not_available(e) else f"error: {type(e).__name__}: {str(e)[:80]}"
            table.add(loss_name, dt, n, d, name, None, kind)
        free_memory(ctx.dev)


def timings(ctx: Ctx) -> int:
    """The table: every loss at N = 4096 and 16384 in fp32 and at 4096 in fp16/bf16 (D = 128; the
    siblings also at the goal shape), then torch.compile of each reference while time is left.

    Every Triton kernel it launches was compiled by the parity part (same D, dtype and flags).
    """
    table = Table(ctx, "timings")
    small, big, d_lo, d_hi, mid = (16, 16, 16, 16, 16) if ctx.dry else (4096, 16384, 128, 512, 8192)
    with env(RLL_TRITON_AUTOTUNE=0):
        for name in LOSSES:
            blocks = [
                ("fp32", small, d_lo),
                ("fp32", big, d_lo),
                ("fp16", small, d_lo),
                ("bf16", small, d_lo),
            ]
            if not name.startswith("rll"):  # the RLL goal shape is timed by the goal part
                blocks.insert(1, ("fp32", mid, d_hi))
            if ctx.dry:  # every block takes the same code path: fp32, and fp16 or bf16 for two losses
                blocks = [blocks[0]] + (
                    [blocks[-1]] if name == "rll-pml" else [blocks[-2]] if name == "osm" else []
                )
            for dt, n, d in blocks:
                time_case(ctx, table, name, dt, n, d)
        for name in ("rll-pml",) if ctx.dry else LOSSES:
            if not _time_for(ctx, f"torch.compile of the {name} reference", 45):
                continue
            time_case(ctx, table, name, "fp32", small, d_lo, only={"reference+compile"}, with_compile=True)
    ctx.note(f"timings: {len(table.rows)} rows in timings.csv / timings.md ({device_name(ctx.dev)})")
    return ctx.finish()


def _time_for(ctx: Ctx, what: str, seconds: float) -> bool:
    """True if ``seconds`` are left before the part's deadline; otherwise says what is skipped."""
    left = ctx.time_left()
    if ctx.dry or left >= seconds:
        return True
    ctx.note(f"  {what}: not run ({left:.0f} s left of the part's limit, it needs ~{seconds:.0f} s)")
    return False


def goal(ctx: Ctx) -> int:
    """N = 8192, D = 512, fp32, forward+backward: >= 5x faster than PML and <= 2x the tensor-core floor.

    First every provider with the first launch configuration that fits (compiled by the parity part),
    then torch.compile of the reference, then, while time is left, the Triton backend with the
    faster fp32 settings (tf32, mixed; see docs/triton.md) and autotuned (one tuning compiles every
    configuration: minutes).
    """
    n, d = (16, 16) if ctx.dry else (GOAL["N"], GOAL["D"])
    table = Table(ctx, "goal")
    with env(RLL_TRITON_AUTOTUNE=0):
        for sem in ("pml", "paper"):
            time_case(ctx, table, f"rll-{sem}", "fp32", n, d)
            goal_lines(ctx, table, n, d, sem, ("triton", "cuda"))
        for sem in ("pml", "paper"):
            if _time_for(ctx, f"torch.compile of the {sem} reference", 45):
                time_case(
                    ctx, table, f"rll-{sem}", "fp32", n, d, only={"reference+compile"}, with_compile=True
                )
    extras = [
        (f"triton[{p}]", dict(RLL_TRITON_AUTOTUNE=0, RLL_TRITON_FP32_PRECISION=p)) for p in ("tf32", "mixed")
    ]
    extras += [("triton autotuned", dict(RLL_TRITON_AUTOTUNE=1))]
    for label, knobs in extras[-1:] if ctx.dry else extras:  # the dry run: the code path once
        for sem in ("pml",) if ctx.dry else ("pml", "paper"):
            if not _time_for(ctx, f"{label} {sem}", 40 if "autotuned" not in label else 150):
                continue
            with env(**knobs):
                time_case(ctx, table, f"rll-{sem}", "fp32", n, d, only={"triton"}, label=label)
            goal_lines(ctx, table, n, d, sem, (label,))
    return ctx.finish()


def goal_lines(ctx: Ctx, table: Table, n: int, d: int, sem: str, names) -> None:
    peak, gpu = peaks(ctx.dev)
    floor = fused_flops(n, n, d, sem, "full") / peak["tf32_tc"] * 1e3
    pml = table.get("rll-pml", "pml")
    for name in names:
        r = table.get(f"rll-{sem}", name)
        if r is None or math.isnan(r["full_ms"]):
            ctx.note(f"goal {name} {sem}: not measured ({r['note'] if r else 'no row'})")
            continue
        ratio = r["full_ms"] / floor
        line = f"goal {name} {sem}: full {r['full_ms']:.3f} ms = {ratio:.3g}x the tf32 floor {floor:.3g} ms"
        line += f" ({3 * floor:.3g} ms at tf32x3)"
        met = ratio <= GOAL["floor_factor"]
        if pml and not math.isnan(pml["full_ms"]):
            speedup = pml["full_ms"] / r["full_ms"]
            line += f"; PML {pml['full_ms']:.3f} ms -> {speedup:.3g}x faster"
            met = met and speedup >= GOAL["speedup_vs_pml"]
        else:
            line += "; PML not measured"
            met = False
        ctx.note(f"{line} [{'MET' if met else 'NOT MET'}] ({gpu})")
