"""Plots of a benchmark run: full (forward + backward) time and peak memory against the size."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.report import MiB, Result

STYLE = {
    "reference": ("tab:gray", "o"),
    "compile": ("tab:blue", "s"),
    "pml": ("tab:orange", "^"),
    "keops": ("tab:green", "D"),
    "floor": ("black", ""),
}
FUSED_COLORS = ("tab:red", "tab:purple", "tab:brown")


def _panels(results: list[Result]) -> list[tuple[str, str, list[Result]]]:
    """(title, x axis name, results) per panel: in-batch per D (x = N), bank (x = M)."""
    out = []
    for d in sorted({r.case.D for r in results if r.case.in_batch}):
        out.append((f"in-batch, D={d}", "N", [r for r in results if r.case.in_batch and d == r.case.D]))
    for d in sorted({r.case.D for r in results if not r.case.in_batch}):
        n = sorted({r.case.N for r in results if not r.case.in_batch})
        out.append(
            (
                f"bank, N={','.join(map(str, n))} queries, D={d}",
                "M",
                [r for r in results if not r.case.in_batch and d == r.case.D],
            )
        )
    return out


def _series(rs: list[Result], metric: str, xname: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """provider -> [(x, p20, p50, p80)] for the metric ("time" in ms or "memory" in MiB)."""
    out: dict[str, list] = {}
    for r in rs:
        x = r.case.N if xname == "N" else r.case.M
        if metric == "time" and r.times:
            q = [t * 1e3 for t in r.times["full"]]
        elif metric == "memory" and r.mem_bytes is not None and r.provider is not None:
            m = max(r.mem_bytes, 1.0) / MiB
            q = [m, m, m]
        else:
            continue
        out.setdefault(r.name, []).append((x, *q))
    return {k: sorted(v) for k, v in out.items()}


def plot_metric(results: list[Result], metric: str, semantics: str, path: Path) -> Path:
    """One figure: a panel per case family, one line per provider, fused drawn last (on top)."""
    rs = [r for r in results if r.case.semantics == semantics]
    panels = _panels(rs)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    fused = [r.name for r in rs if r.provider is not None and r.provider.fused]
    fused = list(dict.fromkeys(fused))
    for ax, (title, xname, prs) in zip(axes[0], panels):
        series = _series(prs, metric, xname)
        order = [n for n in series if n not in fused] + [n for n in fused if n in series]
        for z, name in enumerate(order):
            pts = series[name]
            xs = [p[0] for p in pts]
            if name in fused:
                color, marker, lw = FUSED_COLORS[fused.index(name) % len(FUSED_COLORS)], "*", 2.5
                label = f"{name} (fused)"
            else:
                (color, marker), lw, label = STYLE.get(name, ("tab:olive", "x")), 1.5, name
            style = "--" if name == "floor" else "-"
            ax.plot(
                xs, [p[2] for p in pts], style, color=color, marker=marker, lw=lw, label=label, zorder=10 + z
            )
            ax.fill_between(
                xs, [p[1] for p in pts], [p[3] for p in pts], color=color, alpha=0.15, zorder=5 + z
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xname)
        ax.set_ylabel("forward + backward time (ms)" if metric == "time" else "peak memory growth (MiB)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Ranked List Loss, semantics={semantics!r}: "
        + ("median time, p20-p80 band" if metric == "time" else "peak memory")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(results: list[Result], out: Path) -> list[Path]:
    """``rll_time_<semantics>.png`` and ``rll_memory_<semantics>.png`` for each semantics present."""
    paths = []
    for sem in sorted({r.case.semantics for r in results}):
        paths.append(plot_metric(results, "time", sem, out / f"rll_time_{sem}.png"))
        paths.append(plot_metric(results, "memory", sem, out / f"rll_memory_{sem}.png"))
    return paths
