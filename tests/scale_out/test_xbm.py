"""CrossBatchMemory: batch vs [batch; memory] with same-sample pairs left out, ring buffer, state."""

import pytest
import torch
from tolerance import assert_close_fp64

import rll_kernels
from rll_kernels import CrossBatchMemory, RLLFused, reference

D = 8


def dense_oracle(q, ql, qid, g, gl, gid, semantics, margin=0.4, Tn=10.0, lam=0.5, Tp=0.0):
    """Dense RLL of queries q vs gallery g, pairs with equal ids left out (docs/semantics.md §1.5).

    The dense reference with its id exclusion; the bias of "pml" counts every gallery row, excluded
    or not (as in-batch, where the diagonal counts).
    """
    return reference.ranked_list_loss(
        q,
        ql,
        margin,
        Tn,
        lam,
        None,
        Tp,
        semantics=semantics,
        ref_emb=g,
        ref_labels=gl,
        query_ids=qid,
        ref_ids=gid,
    )


def batch(n, n_cls=4, dtype=torch.float64):
    return torch.randn(n, D, dtype=dtype), torch.randint(0, n_cls, (n,))


@pytest.mark.parametrize("semantics", ["paper", "pml"])
def test_oracle_matches_reference_in_batch(semantics):
    # the oracle with only the diagonal excluded is the in-batch reference (so the oracle is right)
    e, y = batch(13)
    e1, e2 = e.clone().requires_grad_(), e.clone().requires_grad_()
    ids = torch.arange(13)
    a = dense_oracle(e1, y, ids, e1, y, ids, semantics)
    b = reference.ranked_list_loss(e2, y, semantics=semantics)
    a.backward()
    b.backward()
    assert_close_fp64(a, b, "loss")
    assert_close_fp64(e1.grad, e2.grad, "grad")


def test_empty_memory_equals_in_batch_loss():
    e, y = batch(11)
    xbm = CrossBatchMemory(RLLFused(), D, 32, dtype=torch.float64)
    assert_close_fp64(xbm(e, y), rll_kernels.ranked_list_loss(e, y), "loss")
    assert int(xbm.num_filled) == 11


@pytest.mark.parametrize("semantics", ["paper", "pml"])
@pytest.mark.parametrize("with_indices", [False, True])
def test_three_steps_match_dense_oracle(semantics, with_indices):
    # memory of 20 rows fed batches of 9: the third step wraps the ring buffer. With indices, the
    # dataset holds 12 samples, so memory entries often hold the query's own sample.
    xbm = CrossBatchMemory(RLLFused(semantics=semantics), D, 20, dtype=torch.float64)
    mem_e = torch.zeros(0, D, dtype=torch.float64)
    mem_y = mem_i = torch.zeros(0, dtype=torch.int64)
    anon = 0
    data = torch.randn(12, D, dtype=torch.float64)
    data_y = torch.randint(0, 3, (12,))
    for step in range(3):
        if with_indices:
            idx = torch.randint(0, 12, (9,))
            e0, y = data[idx] + 0.7 * torch.randn(9, D, dtype=torch.float64), data_y[idx]
            ids = idx
        else:
            (e0, y), idx = batch(9), None
            ids = -1 - torch.arange(anon, anon + 9)
            anon += 9
        e1, e2 = e0.clone().requires_grad_(), e0.clone().requires_grad_()
        got = xbm(e1, y, indices=idx)
        exp = dense_oracle(
            e2,
            y,
            ids,
            torch.cat([e2, mem_e[-20:]]),
            torch.cat([y, mem_y[-20:]]),
            torch.cat([ids, mem_i[-20:]]),
            semantics,
        )
        (2.0 * got).backward()
        (2.0 * exp).backward()
        assert_close_fp64(got, exp, f"loss step {step}")
        assert_close_fp64(e1.grad, e2.grad, f"grad step {step}")
        mem_e, mem_y, mem_i = torch.cat([mem_e, e0]), torch.cat([mem_y, y]), torch.cat([mem_i, ids])
    # memory content = last 20 enqueued rows, in ring order
    assert int(xbm.num_filled) == 20 and int(xbm.queue_idx) == 27 % 20
    order = torch.arange(27)[-20:] % 20
    assert torch.equal(xbm.embedding_memory[order], mem_e[-20:])
    assert torch.equal(xbm.label_memory[order], mem_y[-20:])
    assert torch.equal(xbm.index_memory[order], mem_i[-20:])


def test_indices_exclude_same_sample_in_memory():
    # step 2 sees the same samples as step 1 in another "augmentation" (the memory copy is a
    # non-trivial positive, d > beta): with indices those pairs are left out, without they count
    e_a, y = batch(10)
    e_b = -e_a + 0.1 * torch.randn(10, D, dtype=torch.float64)
    idx = torch.arange(100, 110)
    with_idx = CrossBatchMemory(RLLFused(), D, 64, dtype=torch.float64)
    with_idx(e_a, y, indices=idx)
    got = with_idx(e_b, y, indices=idx)
    g, gl, gi = torch.cat([e_b, e_a]), torch.cat([y, y]), torch.cat([idx, idx])
    assert_close_fp64(got, dense_oracle(e_b, y, idx, g, gl, gi, "paper"), "loss with indices")
    no_idx = CrossBatchMemory(RLLFused(), D, 64, dtype=torch.float64)
    no_idx(e_a, y)
    kept = dense_oracle(e_b, y, torch.arange(10), g, gl, torch.arange(20), "paper")
    assert_close_fp64(no_idx(e_b, y), kept, "loss without indices")
    assert abs(kept.item() - got.item()) > 1e-3


def test_memory_is_detached_and_gets_no_grad():
    e, y = batch(6)
    xbm = CrossBatchMemory(RLLFused(semantics="pml"), D, 16, dtype=torch.float64)
    e1 = e.clone().requires_grad_()
    xbm(e1, y).backward()
    assert not xbm.embedding_memory.requires_grad
    e2 = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    xbm(e2, y).backward()  # the graph of step 1 is not reached again
    assert e2.grad is not None and torch.isfinite(e2.grad).all()


def test_batch_larger_than_memory_keeps_last_rows():
    e, y = batch(10)
    xbm = CrossBatchMemory(RLLFused(), D, 4, dtype=torch.float64)
    xbm(e, y)
    assert int(xbm.num_filled) == 4 and int(xbm.queue_idx) == 0
    assert torch.equal(xbm.embedding_memory, e[-4:])


def test_state_dict_roundtrip():
    e, y = batch(7)
    a = CrossBatchMemory(RLLFused(), D, 10, dtype=torch.float64)
    a(e, y)
    a(e + 1, y, indices=torch.arange(7))
    sd = a.state_dict()
    assert {
        "embedding_memory",
        "label_memory",
        "index_memory",
        "queue_idx",
        "num_filled",
        "next_anon_id",
    } <= set(sd)
    b = CrossBatchMemory(RLLFused(), D, 10, dtype=torch.float64)
    b.load_state_dict(sd)
    e3, y3 = batch(5)
    assert_close_fp64(b(e3, y3), a(e3, y3), "loss after restore")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_bad_inputs_raise():
    xbm = CrossBatchMemory(RLLFused(), D, 10)  # float32 memory
    with pytest.raises(ValueError, match="embedding size 8, got 5"):
        xbm(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype torch.float32, got torch.float64"):
        xbm(torch.randn(4, D, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="indices must be >= 0"):
        xbm(torch.randn(4, D), torch.zeros(4, dtype=torch.long), indices=torch.tensor([0, 1, -2, 3]))
    with pytest.raises(ValueError, match="indices must have 4 entries"):
        xbm(torch.randn(4, D), torch.zeros(4, dtype=torch.long), indices=torch.arange(3))
    with pytest.raises(ValueError, match="memory_size must be a positive int"):
        CrossBatchMemory(RLLFused(), D, 0)
    with pytest.raises(ValueError, match="must be an rll_kernels.RLLFused"):
        CrossBatchMemory(torch.nn.MSELoss(), D, 10)
    with pytest.raises(ValueError, match="fused backend"):
        CrossBatchMemory(RLLFused(backend="reference"), D, 10)
    assert int(xbm.num_filled) == 0  # failed calls enqueue nothing


def test_double_converts_memory():
    xbm = CrossBatchMemory(RLLFused(), D, 10).double()
    e, y = batch(5)
    assert xbm(e, y).dtype == torch.float64
