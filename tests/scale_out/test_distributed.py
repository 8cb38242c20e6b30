"""DistributedLossWrapper on gloo (2 and 3 processes, uneven batches, both semantics).

Property (docs/semantics.md §2.7): the mean over ranks of the returned losses, and the
DDP-averaged gradients, equal the loss and gradient of one process on the concatenated batch; each
rank's loss equals the dense reference of its rows against the global batch with the global
self-pair excluded by ids, times W / n.
"""

import sys

import pytest
import torch
import torch.distributed as dist
from gloo_spawn import assert_errors_below, init_gloo, save_and_exit, spawn

from rll_kernels import DistributedLossWrapper, RLLFused, reference

D_IN, D = 6, 5


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
    init_gloo(rank, world, out_dir)
    errs = {}
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
    save_and_exit(rank, out_dir, errs)


HYPER = dict(margin=0.4, Tn=10.0, imbalance=0.5, Tp=0.0)
HYPER_TP = dict(margin=0.5, Tn=4.0, imbalance=0.3, Tp=2.0, normalize=False)


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
    results = spawn(worker, world, cases)
    assert_errors_below(results, 1e-10)
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
