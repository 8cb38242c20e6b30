"""torch.library conformance (opcheck) and torch.compile(fullgraph=True) through the custom op."""

import pytest
import torch

import rll_kernels
from rll_kernels import reference


def _fwd_args(attached, need_grad, ids, m=None, requires_grad=False):
    q = torch.randn(13, 6, dtype=torch.float64, requires_grad=requires_grad)
    ql = torch.randint(0, 4, (13,))
    k = torch.randn(m, 6, dtype=torch.float64, requires_grad=requires_grad) if m else q
    kl = torch.randint(0, 4, (m,)) if m else ql
    qi = torch.arange(13) if ids else None
    ki = (torch.arange(m) if m else qi) if ids else None
    return (
        q,
        ql,
        qi,
        k,
        kl,
        ki,
        1.2,
        0.8,
        10.0,
        2.0,
        0.5,
        (m or 13) * 1e-5 if attached else 0.0,
        attached,
        need_grad,
    )


@pytest.mark.parametrize("attached", [False, True])
@pytest.mark.parametrize("need_grad", [False, True])
@pytest.mark.parametrize("case", ["in_batch", "ref"])
def test_opcheck_fwd(attached, need_grad, case):
    args = _fwd_args(
        attached,
        need_grad,
        ids=(case == "in_batch"),
        m=None if case == "in_batch" else 17,
        requires_grad=need_grad,
    )
    torch.library.opcheck(torch.ops.rll_kernels.rll_fwd.default, args)


def test_opcheck_bwd():
    q = torch.randn(13, 6, dtype=torch.float64)
    ql = torch.randint(0, 4, (13,))
    k = torch.randn(17, 6, dtype=torch.float64)
    kl = torch.randint(0, 4, (17,))
    _, _, stats = torch.ops.rll_kernels.rll_fwd(
        q, ql, None, k, kl, None, 1.2, 0.8, 10.0, 0.0, 0.5, 0.0, True, False
    )
    args = (
        torch.rand(13, dtype=torch.float64),
        q,
        ql,
        None,
        k,
        kl,
        None,
        stats,
        1.2,
        0.8,
        10.0,
        0.0,
        0.5,
        0.0,
        True,
        True,
        True,
    )
    torch.library.opcheck(torch.ops.rll_kernels.rll_bwd.default, args)


@pytest.mark.slow
@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_torch_compile_fullgraph(sem):
    torch._dynamo.reset()
    mod = rll_kernels.RLLFused(semantics=sem)
    compiled = torch.compile(mod, fullgraph=True)
    emb = torch.randn(40, 8)
    labels = torch.arange(40) // 4
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    a = compiled(e1, labels)
    b = reference.ranked_list_loss(e2, labels, semantics=sem)
    a.backward()
    b.backward()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(e1.grad, e2.grad, rtol=1e-4, atol=1e-6)
