"""Run a part's cases in parallel worker processes (Triton compiles one kernel per process at a time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.device.context import ROOT, Ctx


def split(cases: list, jobs: int, cost=lambda c: 1.0) -> list[list]:
    """``cases`` in at most ``jobs`` groups of about equal total ``cost`` (largest first, greedy)."""
    groups: list[list] = [[] for _ in range(max(1, min(jobs, len(cases))))]
    load = [0.0] * len(groups)
    for c in sorted(cases, key=cost, reverse=True):
        i = load.index(min(load))
        groups[i].append(c)
        load[i] += cost(c)
    return [g for g in groups if g]


def run(ctx: Ctx, worker_part: str, groups: list[list], tag: str = "w", env: dict | None = None) -> None:
    """Start ``gpu_check.py <worker_part>`` once per group, wait for all, fold their checks into ``ctx``.

    Worker ``i`` logs to ``<out>/<part>-<tag><i>.log`` (printed here when it ends) and writes its
    checks to ``<out>/<part>-<tag><i>.summary.json``.
    """
    procs = []
    for i, group in enumerate(groups):
        name = f"{ctx.part}-{tag}{i}"
        log = ctx.out / f"{name}.log"
        cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), worker_part, "--out", str(ctx.out)]
        cmd += ["--name", name, "--cases", json.dumps(group)] + (["--dry-run"] if ctx.dry else [])
        cmd += ["--no-extension"] if ctx.part == "warm" else []
        fh = open(log, "w")  # noqa: SIM115  (closed below, after the worker ends)
        p = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
        procs.append((p, fh, name, log))
    for p, fh, name, log in procs:
        rc = p.wait()
        fh.close()
        print(log.read_text(), end="", flush=True)
        merge(ctx, name, rc)


def merge(ctx: Ctx, name: str, rc: int) -> None:
    path = ctx.out / f"{name}.summary.json"
    data = json.loads(path.read_text()) if path.exists() else {"passed": 0, "failed": 0, "lines": []}
    ctx.passed += data["passed"]
    ctx.failed += data["failed"]
    ctx.lines += data["lines"]
    if rc != 0 and data["failed"] == 0:
        ctx.check(f"worker {name}", False, f"exit status {rc} (see {name}.log)")
    ctx.save()
    ctx.note(
        f"{name}: {data['passed']} passed, {data['failed']} failed ({data.get('seconds', '?')} s)",
        summary=False,
    )
