"""Tolerances derived from the reference's own rounding error, never guessed.

For a float32 kernel we measure how far the float32 *reference* lands from the float64 reference
on the same inputs, and allow the kernel a small multiple of that (FlashAttention's rule):
    |kernel32 - ref64| <= factor * |ref32 - ref64| + floor
The floor is a few fp32 ulps of max(result scale, 1), for results the fp32 reference happens to
hit exactly (e.g. a gradient that is exactly 0 after projection in D = 1): the summands of these
losses and gradients are O(1) (distances <= 2, weights <= 1), so their rounding is at least
~eps even where the result itself is 0.
"""

from __future__ import annotations

import torch


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_derived(
    kernel32, ref32, ref64, name: str = "value", factor: float = 4.0, ulps: float = 8.0
) -> None:
    """Assert the fp32 kernel result is within ``factor`` x the fp32 reference's own error."""
    ref_err = max_abs(ref32, ref64)
    scale = ref64.double().abs().max().item() if ref64.numel() else 0.0
    floor = ulps * torch.finfo(torch.float32).eps * max(scale, 1.0)
    err = max_abs(kernel32, ref64)
    bound = factor * ref_err + floor
    assert err <= bound, (
        f"{name}: fp32 kernel error {err:.3e} exceeds {factor} x fp32-reference error "
        f"{ref_err:.3e} + floor {floor:.3e} (scale {scale:.3e})"
    )


def assert_close_fp64(actual, expected, name: str = "value", rtol: float = 1e-10, ulps: float = 8.0) -> None:
    """Relative error (max-norm) in float64, with the same O(1)-summand rounding floor as above."""
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    err = max_abs(actual, expected)
    bound = max(rtol * scale, ulps * torch.finfo(torch.float64).eps)
    assert err <= bound, f"{name}: fp64 error {err:.3e} > {rtol} x scale {scale:.3e} (bound {bound:.3e})"
