"""Benchmark results: the long-format CSV and the markdown table printed at the end."""

from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path
from typing import Optional

from bench.cases import Case, floor_flops
from bench.providers import Provider

MODES = ("forward", "backward", "full")
CSV_COLUMNS = (
    "loss",
    "provider",
    "mode",
    "metric",
    "unit",
    "N",
    "M",
    "D",
    "dtype",
    "semantics",
    "p20",
    "p50",
    "p80",
    "device",
    "commit",
    "timestamp",
    "note",
)
MiB = 1024.0**2


@dataclasses.dataclass
class Result:
    """The measurements of one provider on one case (``provider=None``: the GEMM floor).

    ``times`` maps a mode to seconds ``[p20, p50, p80]``; ``status`` says why there are none.
    """

    case: Case
    provider: Optional[Provider]
    times: Optional[dict] = None
    status: Optional[str] = None
    mem_bytes: Optional[float] = None
    mem_status: Optional[str] = None
    gemm_rate: Optional[float] = None  # FLOP/s of torch.mm at the case's shape (floor rows)
    note: str = ""

    @property
    def name(self) -> str:
        return "floor" if self.provider is None else self.provider.name

    def p50(self, mode: str = "full") -> Optional[float]:
        if not self.times or mode not in self.times:
            return None
        return self.times[mode][1]


def csv_rows(results: list[Result], meta: dict) -> list[dict]:
    """Long format: one row per (case, provider, mode, metric)."""
    rows = []
    for r in results:
        c = r.case
        base = {
            "loss": c.loss,
            "provider": r.name,
            "N": c.N,
            "M": "" if c.M is None else c.M,
            "D": c.D,
            "dtype": c.dtype,
            "semantics": c.semantics,
            **meta,
        }
        if r.provider is None:
            q = [t * 1e3 for t in r.times["full"]]
            rows.append(
                {
                    **base,
                    "mode": "full",
                    "metric": "time",
                    "unit": "ms",
                    "p20": q[0],
                    "p50": q[1],
                    "p80": q[2],
                    "note": f"{floor_flops(c):.3g} FLOPs at the measured GEMM rate",
                }
            )
            g = r.gemm_rate / 1e9
            rows.append(
                {
                    **base,
                    "provider": "gemm",
                    "mode": "full",
                    "metric": "rate",
                    "unit": "GFLOP/s",
                    "p20": g,
                    "p50": g,
                    "p80": g,
                    "note": "torch.mm at the case's distance GEMM shape",
                }
            )
            continue
        if r.times is None:
            rows.append(
                {
                    **base,
                    "mode": "full",
                    "metric": "time",
                    "unit": "ms",
                    "p20": "",
                    "p50": "",
                    "p80": "",
                    "note": r.status or "",
                }
            )
        else:
            for mode in MODES:
                q = [t * 1e3 for t in r.times[mode]]
                rows.append(
                    {
                        **base,
                        "mode": mode,
                        "metric": "time",
                        "unit": "ms",
                        "p20": q[0],
                        "p50": q[1],
                        "p80": q[2],
                        "note": r.note,
                    }
                )
        if r.mem_bytes is not None:
            m = r.mem_bytes / MiB
            rows.append(
                {
                    **base,
                    "mode": "full",
                    "metric": "memory",
                    "unit": "MiB",
                    "p20": m,
                    "p50": m,
                    "p80": m,
                    "note": r.note,
                }
            )
        elif r.times is not None and r.mem_status:
            rows.append(
                {
                    **base,
                    "mode": "full",
                    "metric": "memory",
                    "unit": "MiB",
                    "p20": "",
                    "p50": "",
                    "p80": "",
                    "note": r.mem_status,
                }
            )
    for row in rows:
        for k in ("p20", "p50", "p80"):
            if isinstance(row[k], float):
                row[k] = f"{row[k]:.6g}"
    return rows


def write_csv(results: list[Result], meta: dict, path: Path, latest: Optional[Path] = None) -> Path:
    """Write the long-format CSV to ``path`` (and copy it to ``latest``)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(csv_rows(results, meta))
    if latest is not None:
        shutil.copyfile(path, latest)
    return path


def _ms(s: Optional[float]) -> str:
    if s is None:
        return ""
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def _mib(b: Optional[float]) -> str:
    if b is None:
        return ""
    m = b / MiB
    return f"{m:.2g}" if m < 10 else f"{m:,.0f}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or b <= 0:
        return ""
    x = a / b
    return f"{x:.2g}" if x < 10 else f"{x:,.0f}"


def table(results: list[Result]) -> str:
    """The markdown table: per case, every provider's medians, peak memory and the ratios."""
    head = (
        "| case | provider | forward ms | backward ms | full ms | peak MiB "
        "| time fused/this | memory fused/this | fused/floor |"
    )
    lines = [head, "|" + "---|" * 9]
    footnotes: dict[str, int] = {}
    cases: list[Case] = []
    for r in results:
        if r.case not in cases:
            cases.append(r.case)
    for case in cases:
        rs = [r for r in results if r.case == case]
        fused = [r for r in rs if r.provider is not None and r.provider.fused and r.times]
        ref = fused[0] if fused else None
        floor = next((r for r in rs if r.provider is None), None)
        first = True
        for r in rs:
            if r.provider is None:
                continue
            label = case.label if first else ""
            first = False
            name = r.name
            if r.note:
                mark = footnotes.setdefault(r.note, len(footnotes) + 1)
                name += f" ({mark})"
            if r.times is None:
                lines.append(f"| {label} | {name} | {r.status} | | | | | | |")
                continue
            mem = _mib(r.mem_bytes) if r.mem_bytes is not None else (r.mem_status or "")
            t_ratio = m_ratio = f_ratio = ""
            if ref is not None and r is not ref:
                t_ratio = _ratio(ref.p50(), r.p50())
                m_ratio = _ratio(ref.mem_bytes, r.mem_bytes)
            if r.provider.fused and floor is not None:
                f_ratio = _ratio(r.p50(), floor.p50())
            if r is ref:
                name = f"**{name}**"
            lines.append(
                f"| {label} | {name} | {_ms(r.p50('forward'))} | {_ms(r.p50('backward'))} "
                f"| {_ms(r.p50())} | {mem} | {t_ratio} | {m_ratio} | {f_ratio} |"
            )
        if floor is not None:
            lines.append(
                f"| | floor ({floor.gemm_rate / 1e9:.3g} GFLOP/s GEMM) | | | {_ms(floor.p50())} | | | | |"
            )
    for note, mark in footnotes.items():
        lines.append("")
        lines.append(f"({mark}) {note}.")
    return "\n".join(lines)


def write_table(
    results: list[Result],
    meta: dict,
    path: Path,
    command: str,
    wall_s: float,
    threads: int,
    cpu_s: float = 0.0,
) -> str:
    """Write the table with the machine, command and legend to ``path``; return the text."""
    dtypes = sorted({r.case.dtype for r in results})
    text = "\n".join(
        [
            f"# Ranked List Loss benchmark ({meta['timestamp']})",
            "",
            f"- command: `{command}` (wall time {wall_s:.0f} s; "
            f"CPU time of the measuring children {cpu_s:.0f} s)",
            f"- device: {meta['device']}, {threads} torch threads; dtype {', '.join(dtypes)}; "
            f"commit {meta['commit']}",
            "- times are medians (ms) of interleaved repetitions after warm-up; forward is without grad,",
            "  backward is of a fresh forward graph, full is forward + backward; peak MiB is the peak",
            "  memory growth of forward + backward in a child process of its own.",
            "- `fused/this` = fused (bold row) over this provider: below 1 means the fused loss is faster",
            "  or leaner. `fused/floor` = fused full time over the GEMM floor (the FLOPs of the GEMMs it",
            "  cannot avoid, at the rate torch.mm reaches at this shape in the same run).",
            "",
            table(results),
            "",
        ]
    )
    path.write_text(text)
    return text
