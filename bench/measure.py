"""What runs inside the benchmark's child processes: interleaved timing and peak memory.

Timing: one process per case runs every provider of the case round-robin (warm-up first, then
repetitions interleaved so that machine noise hits all providers alike) and reports p20/p50/p80 of
forward (no grad), backward (of a fresh forward graph) and full (forward + backward). On CUDA,
``triton.testing.do_bench`` is used per provider instead.

Memory: one process per (case, provider) measures the peak growth over the baseline taken after
inputs are built and the provider is warmed up: the resident-set high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs``) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import resource
import time
from collections.abc import Callable

import torch

from bench.cases import Case, gemm_shape
from bench.providers import Inputs, Provider, Unsupported, all_providers, make_inputs
from bench.rss import current_bytes, peak_bytes, reset_peak

QUANTILES = (0.2, 0.5, 0.8)


@dataclasses.dataclass
class Config:
    """Knobs shared by the timing and memory children."""

    device: str = "cpu"
    threads: int = 2
    budget_s: float = 2.0  # timing budget per provider and case (sets the repetitions)
    min_reps: int = 3
    max_reps: int = 25
    warmup: int = 1
    max_call_s: float = 30.0  # a provider slower than this per forward + full call is dropped


def quantiles(xs: list[float]) -> list[float]:
    """p20, p50, p80 of ``xs`` (linear interpolation)."""
    t = torch.tensor(xs, dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in QUANTILES]


def setup_process(cfg: Config) -> torch.device:
    """Thread count, allocator behaviour and device of a child process."""
    torch.set_num_threads(cfg.threads)
    # a fixed mmap threshold: large blocks go back to the OS on free, so RSS peaks are honest
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    return torch.device(cfg.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _forward(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0


def _full(fn: Callable[[], torch.Tensor], x: Inputs, device: torch.device) -> tuple[float, float]:
    """(full, backward) seconds of one forward + backward."""
    x.emb.grad = None
    t0 = time.perf_counter()
    loss = fn()
    _sync(device)
    t1 = time.perf_counter()
    loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def _providers(names: list[str], device: torch.device) -> dict[str, Provider]:
    provs = {p.name: p for p in all_providers(device, probe=False)}
    return {n: provs[n] for n in names}


def _gemm(case: Case, device: torch.device) -> Callable[[], float]:
    """A timer of the case's distance GEMM (output preallocated, so no page faults are timed)."""
    n, k, m = gemm_shape(case)
    dtype = getattr(torch, case.dtype)
    a = torch.randn(n, k, dtype=dtype, device=device)
    b = torch.randn(k, m, dtype=dtype, device=device)
    c = torch.empty(n, m, dtype=dtype, device=device)

    def run() -> float:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        _sync(device)
        return time.perf_counter() - t0

    return run


def time_case(case: Case, names: list[str], cfg: Config) -> dict:
    """Time every provider in ``names`` on ``case``, interleaved; seconds.

    Returns ``{"providers": {name: {mode: [p20, p50, p80]} or {"status": why}}, "gemm": [p20, p50, p80],
    "gemm_flops": float}``.
    """
    device = setup_process(cfg)
    x = make_inputs(case, device)
    provs = _providers(names, device)
    out: dict[str, dict] = {}
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    for name, p in provs.items():
        try:
            fns[name] = p.build(case, x)
        except Unsupported as e:
            out[name] = {"status": str(e)}
    gemm = _gemm(case, device)
    n, k, m = gemm_shape(case)
    flops = 2.0 * n * k * m
    if device.type == "cuda":
        return _time_cuda(fns, x, gemm, flops, out)

    reps: dict[str, int] = {}
    for name, fn in list(fns.items()):  # warm-up (compiles torch.compile graphs) and cost estimate
        try:
            warm = cfg.warmup + (1 if provs[name].family == "compile" else 0)
            for _ in range(warm):
                cost = _forward(fn, device) + _full(fn, x, device)[0]
            if cost > cfg.max_call_s:
                out[name] = {"status": f"too slow ({cost:.0f} s per call)", "cost_s": cost}
                del fns[name]
                continue
            reps[name] = int(min(cfg.max_reps, max(cfg.min_reps, cfg.budget_s // max(cost, 1e-9))))
        except Exception as e:
            out[name] = {"status": f"error: {type(e).__name__}: {e}"[:160]}
            del fns[name]
    samples = {name: {"forward": [], "backward": [], "full": []} for name in fns}
    g_samples: list[float] = []
    gemm()
    for r in range(max(reps.values(), default=0)):
        for name, fn in fns.items():
            if r >= reps[name]:
                continue
            s = samples[name]
            s["forward"].append(_forward(fn, device))
            full, bwd = _full(fn, x, device)
            s["full"].append(full)
            s["backward"].append(bwd)
        g_samples.extend(gemm() for _ in range(3))
    while len(g_samples) < 5:
        g_samples.append(gemm())
    for name, s in samples.items():
        out[name] = {mode: quantiles(v) for mode, v in s.items()}
        out[name]["reps"] = reps[name]
        out[name]["cost_s"] = out[name]["forward"][1] + out[name]["full"][1]
    return {"providers": out, "gemm": quantiles(g_samples), "gemm_flops": flops}


def _time_cuda(fns: dict, x: Inputs, gemm: Callable[[], float], flops: float, out: dict) -> dict:
    """CUDA timings with ``triton.testing.do_bench`` (ms -> s), one provider after another."""
    from triton.testing import do_bench

    q = list(QUANTILES)
    for name, fn in fns.items():
        try:
            with torch.no_grad():
                fwd = do_bench(fn, quantiles=q)
            full = do_bench(lambda fn=fn: fn().backward(), grad_to_none=[x.emb], quantiles=q)
            loss = fn()
            bwd = do_bench(
                lambda loss=loss: loss.backward(retain_graph=True), grad_to_none=[x.emb], quantiles=q
            )
            out[name] = {
                "forward": [t / 1e3 for t in fwd],
                "backward": [t / 1e3 for t in bwd],
                "full": [t / 1e3 for t in full],
                "reps": 0,
            }
        except Exception as e:
            out[name] = {"status": f"error: {type(e).__name__}: {e}"[:160]}
    g = do_bench(gemm, quantiles=q)
    return {"providers": out, "gemm": [t / 1e3 for t in g], "gemm_flops": flops}


# ------------------------------------------------------------------------------------ memory
def memory_case(case: Case, name: str, cfg: Config) -> dict:
    """Peak memory growth (bytes) of one forward + backward of provider ``name`` on ``case``."""
    device = setup_process(cfg)
    p = _providers([name], device)[name]
    # warm-up initialises the libraries (thread pools, JIT caches) before the baseline; only
    # torch.compile specialises on the shape, the others warm up on a small case of the same kind
    small = (
        case
        if p.family == "compile"
        else dataclasses.replace(case, N=min(case.N, 64), M=None if case.M is None else min(case.M, 256))
    )
    try:
        xs = make_inputs(small, device)
        fn = p.build(small, xs)
        for _ in range(cfg.warmup + (1 if p.family == "compile" else 0)):
            _full(fn, xs, device)  # (no no-grad forward: torch.compile would build a graph we don't use)
        x = xs if small == case else make_inputs(case, device)
        fn = fn if small == case else p.build(case, x)
    except Unsupported as e:
        return {"status": str(e)}
    del xs
    x.emb.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        return {"bytes": float(torch.cuda.max_memory_allocated() - base), "how": "cuda max_memory_allocated"}
    if reset_peak():
        base = current_bytes()
        fn().backward()
        return {"bytes": float(max(0, peak_bytes() - base)), "how": "VmHWM"}
    base = (
        current_bytes() // 1024
    )  # KiB, as ru_maxrss; ru_maxrss cannot be reset: an upper bound when warm-up peaked higher
    fn().backward()
    return {
        "bytes": 1024.0 * max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base),
        "how": "ru_maxrss",
    }


def child_main(conn, fn_name: str, args: tuple) -> None:
    """Entry point of a child process: run ``<fn_name>(*args)`` and send the result back."""
    try:
        out = globals()[fn_name](*args)
        # CPU seconds of this child and its compilers (g++ of inductor, KeOps): load-independent
        out["cpu_s"] = sum(
            r.ru_utime + r.ru_stime
            for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )
        conn.send(out)
    except BaseException as e:
        conn.send({"status": f"error: {type(e).__name__}: {e}"[:160]})
    finally:
        conn.close()
