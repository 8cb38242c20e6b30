"""Ranked List Loss errors (docs/semantics.md §6): every check of the public layer raises a
ValueError naming the argument; the ops check their inputs again (C++: RuntimeError, Triton:
ValueError)."""

import pytest
import torch

import rll_kernels
from rll_kernels import RLLFused

fused = rll_kernels.ranked_list_loss


E, L = torch.randn(6, 4), torch.arange(6) // 2


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fused(torch.randn(6), L), "2-D"),
        (lambda: fused(torch.randn(2, 3, 4), L), "2-D"),
        (lambda: fused(E, torch.arange(5)), "6 entries"),
        (lambda: fused(E, L.view(3, 2)), "1-D"),
        (lambda: fused(E, L.float()), "integer"),
        (lambda: fused(torch.tensor([[float("nan"), 1.0]] * 6), L), "NaN or Inf"),
        (lambda: fused(torch.tensor([[float("inf"), 1.0]] * 6), L), "NaN or Inf"),
        (lambda: fused(torch.randn(0, 4), torch.arange(0)), "empty"),
        (lambda: fused(torch.randint(0, 3, (6, 4)), L), "floating-point"),
        (lambda: fused(E, L, ref_emb=torch.randn(5, 4)), "together"),
        (lambda: fused(E, L, ref_labels=torch.arange(5)), "together"),
        (lambda: fused(E, L, ref_emb=torch.randn(5, 3), ref_labels=torch.arange(5)), "embedding size"),
        (
            lambda: fused(E, L, ref_emb=torch.randn(5, 4, dtype=torch.float64), ref_labels=torch.arange(5)),
            "dtype",
        ),
        (lambda: fused(E, L, ref_emb=torch.randn(5, 4), ref_labels=torch.arange(4)), "5 entries"),
        (lambda: fused(E, L, ref_emb=torch.randn(5, 4, device="meta"), ref_labels=torch.arange(5)), "device"),
        (lambda: fused(E, L, margin=float("inf")), "margin must be a finite"),
        (lambda: fused(E, L, margin=0.5, alpha=float("nan")), "alpha must be a finite"),
        (lambda: fused(E, L, Tp=float("-inf")), "Tp must be a finite"),
        (lambda: fused(E, L, imbalance=1.5), r"imbalance must lie in \[0, 1\]"),
        (lambda: fused(E, L, imbalance=-0.1), r"imbalance must lie in \[0, 1\]"),
        (lambda: fused(E, L, Tn=float("nan")), "Tn must be a finite"),
        (lambda: fused(E, L, semantics="official"), "semantics"),
        (lambda: fused(E, L, reduction="avg"), "reduction"),
        (lambda: fused(E, L, backend="cudnn"), "backend"),
        (lambda: RLLFused()(E, L, indices_tuple=(L, L, L)), "indices_tuple is not supported"),
        (lambda: RLLFused()(E, None), "labels are required"),
        (lambda: RLLFused(margin=float("nan")), "margin"),
        (lambda: RLLFused(semantics="x"), "semantics"),
    ],
)
def test_bad_input_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _cpp_fwd(**change):
    """rll_fwd on a valid query/gallery problem, with the arguments in ``change`` replaced."""
    args = dict(
        q=torch.randn(4, 3),
        q_labels=torch.arange(4),
        q_ids=None,
        k=torch.randn(5, 3),
        k_labels=torch.arange(5),
        k_ids=None,
        alpha=1.2,
        beta=0.8,
    )
    args.update(change)
    tail = (10.0, 0.0, 0.5, 0.0, None, False, False, False)
    return torch.ops.rll_kernels.rll_fwd(*args.values(), *tail)


@pytest.mark.backends("cpp")
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k=torch.randn(5, 2)), "same embedding size"),
        (dict(q_labels=torch.arange(3)), "q_labels must be int64 of shape"),
        (dict(q_labels=torch.arange(4).int()), "int64"),
        (dict(q=torch.randn(4, 3).half(), k=torch.randn(5, 3).half()), "float32 or float64"),
        (dict(beta=float("nan")), "must be finite"),
        (dict(q_ids=torch.arange(4)), "given together"),
        (dict(k_labels=None), "k_labels must be given with k"),
        (dict(k=None, k_labels=None, k_ids=torch.arange(5)), "need k"),
    ],
    ids=["d", "labels-shape", "labels-dtype", "half", "beta-nan", "ids", "k-labels", "in-batch-k-ids"],
)
def test_op_level_checks_runtime_error(backend, change, match):
    with pytest.raises(RuntimeError, match=match):
        _cpp_fwd(**change)


@pytest.mark.backends("triton")
def test_triton_op_checks_value_error(backend, device):
    q = torch.randn(5, 8, device=device)
    lab = torch.zeros(5, dtype=torch.int64, device=device)
    args = (1.2, 0.8, 10.0, 0.0, 0.5, 0.0, None, False, False, True)
    op = torch.ops.rll_kernels.rll_triton_fwd
    with pytest.raises(ValueError, match="k must be 2-D"):
        op(q, lab, None, q[None], lab, None, *args)
    with pytest.raises(ValueError, match="same embedding size"):
        op(q, lab, None, q[:, :4], lab, None, *args)
    with pytest.raises(ValueError, match="q_labels must be int64"):
        op(q, lab.int(), None, q, lab, None, *args)
    with pytest.raises(ValueError, match="alpha and beta must be finite"):
        op(q, lab, None, q, lab, None, 0.5, float("inf"), 10.0, 0.0, 0.5, 0.0, None, False, False, True)
    with pytest.raises(ValueError, match="must be one of"):
        op(q.to(torch.int32), lab, None, q.to(torch.int32), lab, None, *args)
