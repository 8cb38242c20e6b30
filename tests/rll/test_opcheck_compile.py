"""torch.library conformance (opcheck) of every RLL op on every fused backend, and
torch.compile(fullgraph=True) through the custom ops."""

import pytest
import torch
import torch.nn.functional as F

import rll_kernels
from rll_kernels import reference
from rll_kernels._backends import fused_op


def _fwd_args(device, attached, need_grad, ids, m=None, requires_grad=False):
    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(device).requires_grad_(requires_grad)

    q = leaf(13, 6)
    ql = torch.randint(0, 4, (13,)).to(device)
    k = leaf(m, 6) if m else q
    kl = torch.randint(0, 4, (m,)).to(device) if m else ql
    qi = torch.arange(13, device=device) if ids else None
    ki = (torch.arange(m, device=device) if m else qi) if ids else None
    bias = (m or 13) * 1e-5 if attached else 0.0
    return (q, ql, qi, k, kl, ki, 1.2, 0.8, 10.0, 2.0, 0.5, bias, attached, need_grad)


@pytest.mark.parametrize("attached", [False, True])
@pytest.mark.parametrize("need_grad", [False, True])
@pytest.mark.parametrize("case", ["in_batch", "ref"])
def test_opcheck_fwd(backend, device, attached, need_grad, case):
    m = None if case == "in_batch" else 17
    args = _fwd_args(device, attached, need_grad, ids=(case == "in_batch"), m=m, requires_grad=need_grad)
    torch.library.opcheck(fused_op("rll", backend).default, args)


def test_opcheck_bwd(backend, device):
    q = torch.randn(13, 6, dtype=torch.float64).to(device)
    ql = torch.randint(0, 4, (13,)).to(device)
    k = torch.randn(17, 6, dtype=torch.float64).to(device)
    kl = torch.randint(0, 4, (17,)).to(device)
    hp = (1.2, 0.8, 10.0, 0.0, 0.5, 0.0)
    _, _, stats = fused_op("rll", backend)(q, ql, None, k, kl, None, *hp, True, False)
    grad_rows = torch.rand(13, dtype=torch.float64).to(device)
    args = (grad_rows, q, ql, None, k, kl, None, stats, *hp, True, True, True)
    torch.library.opcheck(fused_op("rll", backend, "bwd").default, args)


def _op_samples(device):
    """float32 samples with ids, a gallery and both semantics (the ops' other argument paths)."""
    n, m, d = 19, 23, 12
    q = F.normalize(torch.randn(n, d), dim=1).to(device)
    k = F.normalize(torch.randn(m, d), dim=1).to(device)
    ql, kl = torch.randint(0, 3, (n,)).to(device), torch.randint(0, 3, (m,)).to(device)
    qid, kid = torch.arange(n, device=device), torch.arange(5, 5 + m, device=device)
    p = (1.2, 0.8, 10.0, 1.0, 0.5)
    paper = (q.clone().requires_grad_(), ql, None, k, kl, None, *p, 0.0, False, True)
    pml = (q.clone().requires_grad_(), ql, qid, k.clone().requires_grad_(), kl, kid, *p, m * 1e-5, True, True)
    nograd = (q, ql, qid, k, kl, kid, *p, 0.0, False, False)
    return paper, pml, nograd


@pytest.mark.parametrize("which", [0, 1, 2], ids=["paper", "pml", "nograd"])
def test_opcheck_fwd_fp32_ids(backend, device, which):
    torch.library.opcheck(fused_op("rll", backend).default, _op_samples(device)[which])


def test_opcheck_bwd_fp32_ids(backend, device):
    _, pml, _ = _op_samples(device)
    q, ql, qid, k, kl, kid = (t.detach() if isinstance(t, torch.Tensor) else t for t in pml[:6])
    stats = fused_op("rll", backend)(q, ql, qid, k, kl, kid, *pml[6:])[2]
    args = (
        torch.randn(q.shape[0], device=device),
        q,
        ql,
        qid,
        k,
        kl,
        kid,
        stats,
        *pml[6:12],
        True,
        True,
        True,
    )
    torch.library.opcheck(fused_op("rll", backend, "bwd").default, args)


def test_torch_compile_fullgraph_op(backend, device):
    _, pml, _ = _op_samples(device)
    op = fused_op("rll", backend)

    def f(q, ql, qid, k, kl, kid):
        rows, _, _ = op(q, ql, qid, k, kl, kid, 1.2, 0.8, 10.0, 1.0, 0.5, k.shape[0] * 1e-5, True, True)
        return rows.sum()

    q, ql, qid, k, kl, kid = pml[:6]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c = compiled(q, ql, qid, k, kl, kid)
    gq_c, gk_c = torch.autograd.grad(out_c, [q, k])
    out_e = f(q, ql, qid, k, kl, kid)
    gq_e, gk_e = torch.autograd.grad(out_e, [q, k])
    assert torch.equal(out_c, out_e) and torch.equal(gq_c, gq_e) and torch.equal(gk_c, gk_e)


@pytest.mark.slow
@pytest.mark.parametrize("sem", ["paper", "pml"])
def test_torch_compile_fullgraph_module(backend, device, sem):
    torch._dynamo.reset()
    mod = rll_kernels.RLLFused(semantics=sem, backend=backend)
    compiled = torch.compile(mod, fullgraph=True)
    emb = torch.randn(40, 8).to(device)
    labels = torch.arange(40, device=device) // 4
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    a = compiled(e1, labels)
    b = reference.ranked_list_loss(e2, labels, semantics=sem)
    a.backward()
    b.backward()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(e1.grad, e2.grad, rtol=1e-4, atol=1e-6)
