"""RLLFused, the native module: PML's RankedListLoss names and call (docs/semantics.md §2.8; the exact
drop-in is rll_kernels.pml.RankedListLoss, tests/pml), its signature and repr."""

import pytest
import torch

from rll_kernels import RLLFused


def test_module_matches_pml_drop_in(backend, device):
    from pytorch_metric_learning.losses import RankedListLoss

    emb = torch.randn(64, 16, dtype=torch.float64)
    labels = torch.arange(64) // 4
    ours = RLLFused(margin=0.4, Tn=4.0, semantics="pml", backend=backend)(emb.to(device), labels.to(device))
    theirs = RankedListLoss(margin=0.4, Tn=4.0)(emb, labels)
    assert abs(ours.item() - theirs.item()) <= 1e-10 * abs(theirs.item())


def test_module_positional_signature_and_repr():
    m = RLLFused(0.3, 5.0, 0.4, 1.1, 1.0)
    assert (m.margin, m.Tn, m.imbalance, m.alpha, m.Tp) == (0.3, 5.0, 0.4, 1.1, 1.0)
    assert RLLFused().alpha == pytest.approx(1.2)
    assert "semantics='paper'" in repr(RLLFused())
