"""SoftTripleFused, the module: PML's state dict and value, the centers' dtype under half inputs
(never rewritten, docs/semantics.md §3.6), defaults and .double()."""

from __future__ import annotations

import pytest
import torch
from softtriple_cases import loss_and_grads
from tolerance import assert_close_derived, assert_close_fp64

from rll_kernels import SoftTripleFused
from rll_kernels.reference import soft_triple_loss as ref_loss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


# ---------------------------------------------------------------- module, dtypes, PML interop
def test_module_equals_pml_and_loads_its_state_dict():
    c, d, k = 9, 16, 4
    pml = pml_losses.SoftTripleLoss(c, d, centers_per_class=k)
    mod = SoftTripleFused(c, d, centers_per_class=k, tau=0.0)
    mod.load_state_dict(pml.state_dict())  # strict: same keys and shapes
    assert mod.fc.dtype == torch.float32 and mod.fc.shape == (d, c * k)
    e = torch.randn(30, d)
    y = torch.randint(0, c, (30,))
    e1, e2 = e.clone().requires_grad_(True), e.clone().requires_grad_(True)
    lm = mod(e1, y)
    lp = pml(e2, y)
    lm.backward()
    lp.backward()
    # fp32 both: the derived tolerance against the fp64 reference
    l64, ge64, gw64 = loss_and_grads(
        ref_loss, e.double(), y, pml.fc.detach().double(), k, 20.0, 0.1, 0.01, 0.0
    )
    assert_close_derived(lm.detach(), lp.detach(), l64, "loss")
    assert_close_derived(e1.grad, e2.grad, ge64, "grad embeddings")
    assert_close_derived(mod.fc.grad, pml.fc.grad, gw64, "grad centers")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_keeps_fc_fp32(dtype):
    c, d, k = 6, 12, 3
    mod = SoftTripleFused(c, d, centers_per_class=k)
    fc0 = mod.fc.detach().clone()
    e = torch.randn(10, d).to(dtype).requires_grad_(True)
    y = torch.randint(0, c, (10,))
    loss = mod(e, y)
    loss.backward()
    assert mod.fc.dtype == torch.float32 and mod.fc.grad.dtype == torch.float32
    assert torch.equal(mod.fc.detach(), fc0)  # never rewritten in place (docs/semantics.md §3.6)
    assert loss.dtype == torch.float32 and e.grad.dtype == dtype
    expected = ref_loss(e.detach().float(), y, fc0, k, 20.0, 0.1, 0.01, 0.2)
    assert_close_derived(loss.detach(), expected, ref_loss(e.detach().double(), y, fc0.double(), k), "loss")


def test_module_double_and_defaults():
    mod = SoftTripleFused(5, 8).double()
    assert mod.fc.dtype == torch.float64 and mod.fc.shape == (8, 50)
    assert (mod.centers_per_class, mod.la, mod.gamma, mod.margin, mod.tau) == (10, 20.0, 0.1, 0.01, 0.2)
    e = torch.randn(6, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    assert_close_fp64(mod(e, y), ref_loss(e, y, mod.fc.detach(), 10), "loss")
