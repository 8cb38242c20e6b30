"""Tolerances derived from the reference's own rounding error, never guessed.

For a float32 kernel we measure how far the float32 *reference* lands from the float64 reference
on the same inputs, and allow the kernel a small multiple of that (FlashAttention's rule):
    |kernel32 - ref64| <= factor * |ref32 - ref64| + floor
The floor is a few ulps of the result's scale, for results the fp32 reference happens to hit
exactly.
"""
from __future__ import annotations

import torch


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_derived(kernel32, ref32, ref64, name: str = "value", factor: float = 4.0,
                         ulps: float = 8.0) -> None:
    """Assert the fp32 kernel result is within ``factor`` x the fp32 reference's own error."""
    ref_err = max_abs(ref32, ref64)
    scale = ref64.double().abs().max().item() if ref64.numel() else 0.0
    floor = ulps * torch.finfo(torch.float32).eps * max(scale, 1e-30)
    err = max_abs(kernel32, ref64)
    bound = factor * ref_err + floor
    assert err <= bound, (f"{name}: fp32 kernel error {err:.3e} exceeds {factor} x fp32-reference error "
                          f"{ref_err:.3e} + floor {floor:.3e} (scale {scale:.3e})")


def assert_close_fp64(actual, expected, name: str = "value", rtol: float = 1e-10) -> None:
    """Relative error (max-norm) in float64."""
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    err = max_abs(actual, expected)
    assert err <= rtol * max(scale, 1e-300), f"{name}: fp64 error {err:.3e} > {rtol} x scale {scale:.3e}"
