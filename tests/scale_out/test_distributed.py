"""DistributedLossWrapper on gloo (2 and 3 processes, uneven batches, both semantics).

Property (docs/semantics.md §2.7): the mean over ranks of the returned losses, and the
DDP-averaged gradients, equal the loss and gradient of one process on the concatenated batch; each
rank's loss equals the dense reference of its rows against the global batch with the global
self-pair excluded by ids, times W / n.
"""

import datetime
import os
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rll_kernels import DistributedLossWrapper, RLLFused, reference

D_IN, D = 6, 5
TIMEOUT_S = 60


def data(sizes, seed=1234):
    """The same global batch on every rank: inputs X (n x D_IN), labels, and a linear model's weights."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    w = torch.randn(D, D_IN, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    return x, y, w, b


def model(w, b):
    lin = torch.nn.Linear(D_IN, D, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def flat_grad(module):
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


def worker(rank, world, cases, out_dir):
    # rendezvous through a file in this test's temporary directory (no listening port to race for
    # with other jobs on the machine); gloo then connects the ranks over the loopback interface
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(out_dir, "store"),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    errs = {}
    try:
        for name, sizes, semantics, hyper in cases:
            x, y, w, b = data(sizes)
            loss_cfg = dict(semantics=semantics, **hyper)
            # one process on the concatenated batch
            ref_model = model(w, b)
            ref_in = x.clone().requires_grad_()
            ref_loss = RLLFused(**loss_cfg)(ref_model(ref_in), y)
            ref_loss.backward()
            # this rank's share, through DDP (gradient averaging over ranks)
            lo = sum(sizes[:rank])
            sl = slice(lo, lo + sizes[rank])
            ddp = torch.nn.parallel.DistributedDataParallel(model(w, b))
            x_loc = x[sl].clone().requires_grad_()
            emb = ddp(x_loc)
            emb.retain_grad()
            loss = DistributedLossWrapper(RLLFused(**loss_cfg))(emb, y[sl])
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= world
            # the gradient of the embeddings each rank owns, averaged as DDP averages
            ref_emb = ref_model(x).detach().requires_grad_()
            g_ref = torch.autograd.grad(RLLFused(**loss_cfg)(ref_emb, y), ref_emb)[0]
            # this rank's own loss (docs/semantics.md §2.7): the dense reference of its queries
            # against the global batch, the global self-pair excluded by ids, times W / n
            all_emb = ref_emb.detach()
            rank_err = float(loss.item() != 0.0)  # a rank without rows returns exactly 0
            if sizes[rank]:
                rank_ref = reference.ranked_list_loss(
                    all_emb[sl],
                    y[sl],
                    ref_emb=all_emb,
                    ref_labels=y,
                    query_ids=torch.arange(lo, lo + sizes[rank]),
                    ref_ids=torch.arange(len(y)),
                    reduction="sum",
                    **loss_cfg,
                ) * (world / len(y))
                rank_err = rel_err(loss.detach(), rank_ref)
            errs[name] = {
                "loss": rel_err(mean_loss, ref_loss.detach()),
                "rank_loss": rank_err,
                # one relative error over all parameters: with normalize=False and "pml" the bias
                # gradient is exactly 0 (distances are translation invariant), only rounding is left
                "params": rel_err(flat_grad(ddp.module), flat_grad(ref_model)),
                "emb": rel_err(emb.grad / world, g_ref[sl]) if sizes[rank] else 0.0,
                "input": rel_err(x_loc.grad / world, ref_in.grad[sl]) if sizes[rank] else 0.0,
            }
            del ddp
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(errs, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: the parent never reads a half-written file
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()
    # skip interpreter teardown: gloo's threads occasionally abort there ("terminate called without
    # an active exception"), after the results are safely on disk
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


HYPER = dict(margin=0.4, Tn=10.0, imbalance=0.5, Tp=0.0)
HYPER_TP = dict(margin=0.5, Tn=4.0, imbalance=0.3, Tp=2.0, normalize=False)


# worker failures that come from the machine (rendezvous, sockets), not from the code under test
TRANSIENT = (
    "address already in use",
    "connection reset",
    "connection refused",
    "connection closed",
    "broken pipe",
    "timed out",
)


def run(world, cases, attempts=2):
    """Spawn ``world`` gloo workers and return their error dicts; one retry on a transient failure."""
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory() as out_dir:
            ctx = mp.start_processes(
                worker, args=(world, cases, out_dir), nprocs=world, join=False, start_method="spawn"
            )
            deadline = TIMEOUT_S * 3
            t0 = time.monotonic()
            try:
                while not ctx.join(timeout=5):
                    if time.monotonic() - t0 > deadline:
                        for p in ctx.processes:
                            if p.is_alive():
                                p.terminate()
                        pytest.fail(f"distributed workers did not finish within {deadline} s")
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                files = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world)]
                if isinstance(e, mp.ProcessExitedException) and all(os.path.exists(f) for f in files):
                    pass  # every rank finished and saved its results; a crash in teardown is not ours
                elif attempt + 1 < attempts and (
                    isinstance(e, mp.ProcessExitedException) or any(m in str(e).lower() for m in TRANSIENT)
                ):
                    continue
                else:
                    raise
            return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("world,sizes", [(2, (7, 4)), (3, (5, 9, 3))])
def test_distributed_equals_single_process(world, sizes):
    cases = [
        (f"{sem}-{i}", sizes, sem, hyper)
        for sem in ("paper", "pml")
        for i, hyper in enumerate((HYPER, HYPER_TP))
    ]
    if world == 3:
        cases.append(("pml-empty-rank", (6, 0, 5), "pml", HYPER))
        cases.append(("paper-empty-rank", (6, 0, 5), "paper", HYPER))
    results = run(world, cases)
    bad = [
        (r, case, k, v)
        for r, errs in enumerate(results)
        for case, e in errs.items()
        for k, v in e.items()
        if not v <= 1e-10
    ]
    assert not bad, f"relative errors above 1e-10 (rank, case, quantity, error): {bad}"
    assert len(results[0]) == len(cases)


def test_wrapper_rejects_bad_configuration():
    with pytest.raises(ValueError, match="reduction must be 'mean'"):
        DistributedLossWrapper(RLLFused(reduction="sum"))
    with pytest.raises(ValueError, match="must be an rll_kernels.RLLFused"):
        DistributedLossWrapper(torch.nn.MSELoss())
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedLossWrapper(RLLFused())(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
