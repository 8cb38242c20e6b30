"""In-batch "pml" with a mean or sum reduction on the CPU: both passes in the forward op, the second
reading the Gram tiles the first kept (docs/semantics.md §2.6), against the two-op path
(reduction "none": rll_fwd, then rll_bwd) and the reference.

test_parity.py covers the sizes where every tile is kept (N = 1000), the kept Gram rows (N <= 128)
and the sizes in between (N = 129: nothing kept); here: batches whose tiles do not all fit the
8 MiB (the later ones recomputed), one thread, the op's contract, and which ops a step calls.
"""

import pytest
import torch
from rll_cases import make_batch
from tolerance import assert_close_derived, assert_close_fp64
from torch.utils._python_dispatch import TorchDispatchMode

import rll_kernels
from rll_kernels import reference

fused = rll_kernels.ranked_list_loss
REF_HP = dict(margin=0.4, Tn=10.0, imbalance=0.5, semantics="pml")
HP = dict(REF_HP, backend="cpp")


def _one_call_and_two_ops(emb, labels, reduction="sum"):
    """(loss, grad) with ``reduction`` (one op call) and with "none" and a uniform upstream (two ops)."""
    a = emb.clone().requires_grad_()
    loss = fused(a, labels, reduction=reduction, **HP)
    loss.backward()
    b = emb.clone().requires_grad_()
    rows = fused(b, labels, reduction="none", **HP)
    (rows.mean() if reduction == "mean" else rows.sum()).backward()
    two = rows.detach().mean() if reduction == "mean" else rows.detach().sum()
    return (loss.detach(), a.grad), (two, b.grad)


@pytest.mark.parametrize(
    "n, d, dtype",
    [(1500, 5, torch.float64), (2100, 4, torch.float32)],  # 16 of 21 / 32 of 45 tile pairs fit 8 MiB
)
def test_tiles_beyond_the_cache_are_recomputed(n, d, dtype):
    torch.manual_seed(n)
    emb, labels, _, _ = make_batch(n, d, dtype=torch.float64, classes=n // 4)
    (l64, g64), (L64, G64) = _one_call_and_two_ops(emb, labels)
    assert_close_fp64(l64, L64, "loss fp64")
    assert_close_fp64(g64, G64, "grad fp64")
    if dtype == torch.float32:
        (l32, g32), (L32, G32) = _one_call_and_two_ops(emb.float(), labels)
        assert_close_derived(g32, G32, G64, "grad fp32")
        assert_close_derived(l32, L32, L64, "loss fp32")


# one thread: N = 600, 256-row tiles, 6 pairs, kept; N = 300: two tiles, the rows split, the Gram
# rows kept (D = 16: one gallery tile of 300 rows) or not (D = 300: 256-row gallery tiles)
@pytest.mark.parametrize("n, d", [(37, 16), (300, 16), (300, 300), (600, 16)])
def test_one_thread(n, d):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(n)
        emb, labels, _, _ = make_batch(n, d, classes=n // 4)
        for reduction in ("mean", "sum"):
            (l, g), _ = _one_call_and_two_ops(emb, labels, reduction)
            e = emb.clone().requires_grad_()
            ref = reference.ranked_list_loss(e, labels, reduction=reduction, **REF_HP)
            ref.backward()
            assert_close_fp64(l, ref.detach(), "loss")
            assert_close_fp64(g, e.grad, "grad")
    finally:
        torch.set_num_threads(threads)


def test_op_returns_the_gradient_of_the_rows_mean():
    torch.manual_seed(5)
    emb, labels, _, _ = make_batch(300, 8, classes=75)
    # alpha, beta, Tn, Tp, lambda, bias per row, den_rows, normalize, attached
    hp = (1.2, 0.8, 10.0, 0.0, 0.5, 1e-5, None, True, True)
    op = torch.ops.rll_kernels.rll_fwd.default
    rows, grad, *_ = op(emb, labels, None, None, None, None, *hp, True)
    assert grad.shape == emb.shape
    _, no_grad, *_ = op(emb, labels, None, None, None, None, *hp, False)
    assert no_grad.numel() == 0
    e = emb.clone().requires_grad_()
    ref = reference.ranked_list_loss(e, labels, reduction="mean", **REF_HP)
    ref.backward()
    assert_close_fp64(rows.mean(), ref.detach(), "loss")
    assert_close_fp64(grad, e.grad, "grad")


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "reduction, ref_emb, backward_op",
    [("mean", False, False), ("sum", False, False), ("none", False, True), ("mean", True, True)],
)
def test_which_ops_a_step_calls(reduction, ref_emb, backward_op):
    torch.manual_seed(1)
    emb, labels, ref, ref_labels = make_batch(64, 8, m=32)
    x = emb.clone().requires_grad_()
    extra = dict(ref_emb=ref, ref_labels=ref_labels) if ref_emb else {}
    with _OpLog() as log:
        fused(x, labels, reduction=reduction, **extra, **HP).sum().backward()
    assert log.names.count("rll_fwd.default") == 1
    assert (log.names.count("rll_bwd.default") == 1) == backward_op, log.names


def test_a_non_uniform_upstream_raises():
    """The forward's gradient is that of the rows' mean: another upstream gradient is an error, not a
    wrong gradient (eager and compiled)."""
    op = torch.ops.rll_kernels.rll_fwd.default
    hp = (1.2, 0.8, 10.0, 0.0, 0.5, 1e-5, None, True, True, True)
    emb, labels, _, _ = make_batch(300, 8, classes=75)

    def weighted(x, w):
        return (op(x, labels, None, None, None, None, *hp)[0] * w).sum()

    for fn in (weighted, torch.compile(weighted, fullgraph=True)):
        x = emb.clone().requires_grad_()
        fn(x, torch.full((300,), 0.5, dtype=x.dtype)).backward()
        assert_close_fp64(x.grad, 150 * op(emb, labels, None, None, None, None, *hp)[1], "uniform upstream")
        with pytest.raises(RuntimeError, match="upstream gradient of the rows must be"):
            fn(x, torch.arange(300, dtype=x.dtype)).backward()


def test_a_mean_takes_the_forward_gradient_without_a_copy():
    """With g = 1/N, the mean's backward, the forward's gradient of the rows' mean becomes the leaf's
    gradient as it is (csrc/rll_autograd.cpp gradient_from_mean)."""
    op = torch.ops.rll_kernels.rll_fwd.default
    hp = (1.2, 0.8, 10.0, 0.0, 0.5, 1e-5, None, True, True, True)
    emb, labels, _, _ = make_batch(300, 8, classes=75)
    x = emb.clone().requires_grad_()
    out = op(x, labels, None, None, None, None, *hp)
    rows, ptr, want = out[0], out[1].data_ptr(), out[1].clone()
    del out
    rows.mean().backward()
    assert x.grad.data_ptr() == ptr
    assert torch.equal(x.grad, want)
