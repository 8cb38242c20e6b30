"""The one-screen summary of a device check: each part's state, time and findings (SUMMARY.md)."""

from __future__ import annotations

import json

from bench.device.context import Ctx

MAX_LINES_PER_PART = 10


def _status(ctx: Ctx) -> list[dict]:
    """Rows of ``status.tsv``, written by bench/device_check.sh: part, state, s, expected s, limit s, rc."""
    path = ctx.out / "status.tsv"
    if not path.exists():
        return []
    keys = ("part", "state", "seconds", "expected", "limit", "rc")
    return [dict(zip(keys, ln.split("\t"))) for ln in path.read_text().splitlines() if ln.strip()]


def _findings(ctx: Ctx, part: str) -> list[str]:
    path = ctx.out / f"{part}.summary.json"
    if not path.exists():
        return ["(no summary written: the part did not start its Python side, or was killed at once)"]
    data = json.loads(path.read_text())
    lines = data["lines"]
    head = [f"{data['passed']} passed, {data['failed']} failed"] if data["passed"] or data["failed"] else []
    fails = [ln for ln in lines if ln.startswith("FAIL")]
    rest = [ln for ln in lines if not ln.startswith("FAIL")]
    keep = head + rest[: MAX_LINES_PER_PART - len(head)]
    if fails:
        keep += fails[:4] + (
            [f"... {len(fails) - 4} more FAIL lines in {part}.log"] if len(fails) > 4 else []
        )
    return keep


def run(ctx: Ctx) -> int:
    rows = _status(ctx)
    out = [f"# device check summary ({ctx.out})", ""]
    out.append("| part | state | time s | expected s | limit s |")
    out.append("|---|---|---|---|---|")
    for r in rows:
        out.append(f"| {r['part']} | {r['state']} | {r['seconds']} | {r['expected']} | {r['limit']} |")
    out.append("")
    for r in rows:
        if r["state"].startswith("skipped") or r["state"] == "not selected":
            continue
        out.append(f"{r['part']} [{r['state']}]")
        out += [f"  {ln}" for ln in _findings(ctx, r["part"])]
    total = sum(float(r["seconds"]) for r in rows if r["seconds"].replace(".", "", 1).isdigit())
    bad = [r["part"] for r in rows if r["state"] not in ("ok", "not selected")]
    out += ["", f"total {total:.0f} s; " + (f"NOT OK: {', '.join(bad)}" if bad else "every part ok")]
    text = "\n".join(out)
    print(text, flush=True)
    ctx.write("SUMMARY.md", text + "\n")
    return 0  # the parts' states are the script's exit status; this part only reports them
