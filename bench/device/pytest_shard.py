"""pytest plugin: ``-p bench.device.pytest_shard --shard I/N`` keeps the I-th of N slices of the tests.

The slices hold whole test functions (all parametrisations of one function share their compiled
kernels), dealt largest first to the slice with the fewest tests, so N processes can compile the
Triton kernels of the GPU test run side by side.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, help="I/N: run the I-th (1-based) of N slices of the tests")


def slices(nodeids: list[str], n: int) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for nid in nodeids:
        groups.setdefault(nid.split("[")[0], []).append(nid)
    out: list[list[str]] = [[] for _ in range(n)]
    for members in sorted(groups.values(), key=len, reverse=True):
        min(out, key=len).extend(members)
    return out


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected: slice what is left
def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if not spec:
        return
    i, n = (int(v) for v in spec.split("/"))
    if not 1 <= i <= n:
        raise ValueError(f"--shard must be I/N with 1 <= I <= N, got {spec!r}")
    keep = set(slices([it.nodeid for it in items], n)[i - 1])
    config.hook.pytest_deselected(items=[it for it in items if it.nodeid not in keep])
    items[:] = [it for it in items if it.nodeid in keep]
