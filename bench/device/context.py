"""What every part of the device check shares: the device, the output folder, PASS/FAIL lines."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Ctx:
    """One part's run: ``dev`` is "cuda", or "cpu" in a dry run (Triton interpreter, tiny sizes).

    Every check and note is printed at once and written to ``<out>/<part>.summary.json`` after each
    call, so a part stopped by its timeout still leaves what it found.
    """

    part: str
    out: Path
    dry: bool
    dev: str = "cuda"
    passed: int = 0
    failed: int = 0
    lines: list = dataclasses.field(default_factory=list)
    deadline: float | None = None  # epoch seconds: the part's timeout, minus a margin
    t0: float = dataclasses.field(default_factory=time.time)

    def __post_init__(self):
        self.out.mkdir(parents=True, exist_ok=True)
        self.dev = "cpu" if self.dry else "cuda"
        self.save()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.passed += bool(ok)
        self.failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            self.lines.append(f"FAIL {name}: {detail}"[:200])
        self.save()
        return ok

    def note(self, line: str, summary: bool = True) -> None:
        """Print ``line``; with ``summary`` it also goes into the one-screen summary."""
        print(line, flush=True)
        if summary:
            self.lines.append(line.strip()[:200])
            self.save()

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def write(self, name: str, text: str) -> Path:
        path = self.out / name
        path.write_text(text)
        return path

    def save(self) -> None:
        data = dict(
            part=self.part,
            passed=self.passed,
            failed=self.failed,
            lines=self.lines,
            seconds=round(time.time() - self.t0, 1),
            dry_run=self.dry,
        )
        tmp = self.out / f".{self.part}.summary.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.out / f"{self.part}.summary.json")

    def finish(self) -> int:
        self.save()
        return 0 if self.failed == 0 else 1


def synchronize(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, dev: str, grad_to_none=()) -> float:
    """Median time of ``fn`` in ms: ``triton.testing.do_bench`` on a GPU; one wall-clock run on the CPU
    (the dry run checks that the call works, it measures nothing)."""
    if dev == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=60, grad_to_none=list(grad_to_none), return_mode="median"))
    for t in grad_to_none:
        t.grad = None
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def peak_mib(fn, dev: str) -> float:
    """Extra device memory (MiB) at the peak of one call of ``fn``; NaN (and no call) on the CPU."""
    if dev != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    return "cpu (dry run: Triton interpreter, CUDA kernels emulated)"


def free_memory(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.empty_cache()
