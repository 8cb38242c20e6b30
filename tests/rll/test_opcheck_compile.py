"""torch.library conformance (opcheck) of every RLL op on every fused backend, and
torch.compile(fullgraph=True) through the custom ops."""

import pytest
import torch
from host_reads import host_reads

import rll_kernels
from rll_kernels import reference
from rll_kernels._backends import fused_op


def _fwd_args(device, attached, need_grad, ids, m=None, requires_grad=False, normalize=True):
    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(device).requires_grad_(requires_grad)

    q = leaf(13, 6)
    ql = torch.randint(0, 4, (13,)).to(device)
    k = leaf(m, 6) if m else None  # in-batch: no k
    kl = torch.randint(0, 4, (m,)).to(device) if m else None
    qi = torch.arange(13, device=device) if ids else None
    ki = torch.arange(m, device=device) if (ids and m) else None
    bias = 1e-5 if attached else 0.0
    return (q, ql, qi, k, kl, ki, 1.2, 0.8, 10.0, 2.0, 0.5, bias, None, normalize, attached, need_grad)


@pytest.mark.parametrize("attached", [False, True])
@pytest.mark.parametrize("need_grad", [False, True])
@pytest.mark.parametrize("case", ["in_batch", "in_batch_ids", "ref", "ref_ids_raw"])
def test_opcheck_fwd(backend, device, attached, need_grad, case):
    m = None if case.startswith("in_batch") else 17
    args = _fwd_args(
        device,
        attached,
        need_grad,
        ids=case.endswith("ids") or case == "ref_ids_raw",
        m=m,
        requires_grad=need_grad,
        normalize=not case.endswith("raw"),
    )
    torch.library.opcheck(fused_op("rll", backend).default, args)


@pytest.mark.parametrize("in_batch", [False, True])
def test_opcheck_bwd(backend, device, in_batch):
    q = torch.randn(13, 6, dtype=torch.float64).to(device)
    ql = torch.randint(0, 4, (13,)).to(device)
    k = None if in_batch else torch.randn(17, 6, dtype=torch.float64).to(device)
    kl = None if in_batch else torch.randint(0, 4, (17,)).to(device)
    hp = (1.2, 0.8, 10.0, 0.0, 0.5, 1e-5, None, True, True)
    _, _, stats, z, norms = fused_op("rll", backend)(q, ql, None, k, kl, None, *hp, False)
    grad_rows = torch.rand(13, dtype=torch.float64).to(device)
    args = (grad_rows, q, ql, None, k, kl, None, stats, z, norms, *hp, True, True)
    torch.library.opcheck(fused_op("rll", backend, "bwd").default, args)


def _op_samples(device):
    """float32 samples with ids, a gallery and both semantics (the ops' other argument paths)."""
    n, m, d = 19, 23, 12
    q = torch.randn(n, d).to(device)
    k = torch.randn(m, d).to(device)
    ql, kl = torch.randint(0, 3, (n,)).to(device), torch.randint(0, 3, (m,)).to(device)
    qid, kid = torch.arange(n, device=device), torch.arange(5, 5 + m, device=device)
    p = (1.2, 0.8, 10.0, 1.0, 0.5)
    paper = (q.clone().requires_grad_(), ql, None, k, kl, None, *p, 0.0, None, True, False, True)
    pml = (
        q.clone().requires_grad_(),
        ql,
        qid,
        k.clone().requires_grad_(),
        kl,
        kid,
        *p,
        1e-5,
        30,
        True,
        True,
        True,
    )
    nograd = (q, ql, qid, k, kl, kid, *p, 0.0, None, False, False, False)
    return paper, pml, nograd


@pytest.mark.parametrize("which", [0, 1, 2], ids=["paper", "pml", "nograd"])
def test_opcheck_fwd_fp32_ids(backend, device, which):
    torch.library.opcheck(fused_op("rll", backend).default, _op_samples(device)[which])


def test_opcheck_bwd_fp32_ids(backend, device):
    _, pml, _ = _op_samples(device)
    q, ql, qid, k, kl, kid = (t.detach() if isinstance(t, torch.Tensor) else t for t in pml[:6])
    _, _, stats, z, norms = fused_op("rll", backend)(q, ql, qid, k, kl, kid, *pml[6:])
    args = (
        torch.randn(q.shape[0], device=device),
        q,
        ql,
        qid,
        k,
        kl,
        kid,
        stats,
        z,
        norms,
        *pml[6:15],
        True,
        True,
    )
    torch.library.opcheck(fused_op("rll", backend, "bwd").default, args)


def test_torch_compile_fullgraph_op(backend, device):
    _, pml, _ = _op_samples(device)
    op = fused_op("rll", backend)

    def f(q, ql, qid, k, kl, kid):
        rows = op(q, ql, qid, k, kl, kid, 1.2, 0.8, 10.0, 1.0, 0.5, 1e-5, None, True, True, True)[0]
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


@pytest.mark.parametrize("semantics", ["paper", "pml"])
def test_no_host_read_on_the_python_path(backend, device, semantics):
    # finite rows are checked inside the op from its row norms and the PML bias is counted there:
    # nothing in Python reads a tensor value, so a CUDA step never synchronises (docs/semantics.md §6)
    module = rll_kernels.RLLFused(semantics=semantics, backend=backend)
    e, y = torch.randn(20, 8, device=device), torch.randint(0, 3, (20,), device=device)
    bank, bank_y = torch.randn(13, 8, device=device), torch.randint(0, 3, (13,), device=device)

    def step():
        x = e.clone().requires_grad_(True)
        in_batch = rll_kernels.ranked_list_loss(x, y, semantics=semantics, backend=backend)
        (in_batch + module(x, y, ref_emb=bank, ref_labels=bank_y)).backward()

    assert host_reads(step) == []
