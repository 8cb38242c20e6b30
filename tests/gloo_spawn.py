"""Run a test's worker function on W gloo processes and collect what each rank saved.

The recipe of the distributed tests: a file rendezvous in a temporary directory (no listening port
to race for with other jobs on the machine), gloo over the loopback interface, results saved
atomically, a barrier before teardown, interpreter teardown skipped (gloo's threads occasionally
abort there, after the results are safely on disk), and one retry on a failure that comes from the
machine rather than from the code under test.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60

# worker failures that come from the machine (rendezvous, sockets), not from the code under test
TRANSIENT = (
    "address already in use",
    "connection reset",
    "connection refused",
    "connection closed",
    "broken pipe",
    "timed out",
)


def init_gloo(rank: int, world: int, out_dir: str) -> None:
    """Join the gloo group of ``world`` ranks that rendezvous in ``out_dir``; one thread per rank."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(out_dir, "store"),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )


def save_and_exit(rank: int, out_dir: str, result) -> None:
    """Save this rank's result atomically, wait for every rank, tear gloo down and leave at once."""
    try:
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: the parent never reads a half-written file
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _join(ctx, deadline: float) -> None:
    t0 = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - t0 > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers did not finish within {deadline} s")


def spawn(worker, world: int, payload, attempts: int = 2) -> list:
    """Start ``worker(rank, world, payload, out_dir)`` on ``world`` processes; their saved results.

    ``worker`` must be a module-level function that calls :func:`init_gloo` and ends with
    :func:`save_and_exit`.
    """
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory() as out_dir:
            ctx = mp.start_processes(
                worker, args=(world, payload, out_dir), nprocs=world, join=False, start_method="spawn"
            )
            files = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world)]
            try:
                _join(ctx, TIMEOUT_S * 3)
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                if isinstance(e, mp.ProcessExitedException) and all(os.path.exists(f) for f in files):
                    pass  # every rank finished and saved its results; a crash in teardown is not ours
                elif attempt + 1 < attempts and (
                    isinstance(e, mp.ProcessExitedException) or any(m in str(e).lower() for m in TRANSIENT)
                ):
                    continue
                else:
                    raise
            return [torch.load(f) for f in files]
    raise AssertionError("unreachable")


def assert_errors_below(results: list, tol: float = 1e-10) -> None:
    """``results[rank][case][quantity]`` are relative errors (0/1 for exact checks): all <= tol."""
    bad = [
        (r, case, k, v)
        for r, errs in enumerate(results)
        for case, e in errs.items()
        for k, v in e.items()
        if not v <= tol
    ]
    assert not bad, f"relative errors above {tol} (rank, case, quantity, error): {bad}"
