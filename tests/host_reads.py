"""The host reads of a training step (``.item()``, ``bool`` of a tensor, ``nonzero``, ``tolist``, ...:
each a device-to-host sync on a GPU), found on any device by the dispatch mode of the device check
(bench/device/sync.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/

from bench.device.sync import HostReads


def host_reads(step) -> list[str]:
    """Run ``step()`` twice (the first warms caches up) and return the host reads of the second."""
    step()
    with HostReads() as reads:
        step()
    return sorted(set(reads.found))
