"""Smoke test of an installed rll_kernels wheel (`make wheel-test`), run from outside the checkout.

Checks that the package imported is the installed one, that its metadata pins the torch its C++
extension was built against, and runs one forward + backward of each loss on each CPU backend
(cpp and reference) in float64: loss and gradient finite, and cpp equal to the reference.
Not collected by pytest (no test_ prefix): `make wheel-test` copies it to a temporary folder.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

import torch

import rll_kernels
from rll_kernels import _extension


def _installed_outside_checkout() -> None:
    here = os.path.realpath(rll_kernels.__file__)
    assert "site-packages" in here, f"rll_kernels imported from {here}, not from an installed wheel"
    why = _extension.cpp_unavailable_reason()
    assert why is None, why


def _metadata_pins_build_torch() -> None:
    built = _extension.BUILD_INFO["torch"]
    major, minor = built.split(".")[:2]
    pin = f"torch=={major}.{minor}.*"
    reqs = [r.replace(" ", "") for r in importlib.metadata.requires("rll_kernels") or [] if "extra" not in r]
    assert pin in reqs, f"metadata requires {reqs}, expected {pin} (built against torch {built})"
    print(f"metadata requires {reqs}; extension built against torch {built}; running {torch.__version__}")


def _losses():
    """name -> loss(emb, backend) on fixed inputs (float64, odd sizes)."""
    g = torch.Generator().manual_seed(0)
    n, d, classes, k = 37, 19, 5, 3
    labels = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(d, classes * k, generator=g, dtype=torch.float64)
    return {
        "ranked_list_loss": lambda e, b: rll_kernels.ranked_list_loss(e, labels, backend=b),
        "soft_triple_loss": lambda e, b: rll_kernels.soft_triple_loss(
            e, labels, centers, centers_per_class=k, backend=b
        ),
        "weighted_contrastive_loss": lambda e, b: rll_kernels.weighted_contrastive_loss(e, labels, backend=b),
    }, torch.randn(n, d, generator=g, dtype=torch.float64)


def _forward_backward(loss_fn, emb0, backend):
    emb = emb0.clone().requires_grad_(True)
    loss = loss_fn(emb, backend)
    loss.backward()
    assert torch.isfinite(loss).all() and torch.isfinite(emb.grad).all(), f"{backend}: non-finite result"
    return loss.detach(), emb.grad


def main() -> int:
    _installed_outside_checkout()
    _metadata_pins_build_torch()
    losses, emb = _losses()
    passed = 0
    for name, loss_fn in losses.items():
        ref_loss, ref_grad = _forward_backward(loss_fn, emb, "reference")
        passed += 1
        cpp_loss, cpp_grad = _forward_backward(loss_fn, emb, "cpp")
        torch.testing.assert_close(cpp_loss, ref_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cpp_grad, ref_grad, rtol=1e-10, atol=1e-12)
        passed += 1
        print(f"{name}: reference and cpp forward + backward finite and equal (loss {ref_loss.item():.6f})")
    print(f"wheel-test: {passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
