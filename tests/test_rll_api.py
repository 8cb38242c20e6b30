"""Public API: RLLFused as a PML drop-in, backends, and clear errors for bad input."""

import warnings

import pytest
import torch

import rll_kernels
from rll_kernels import RLLFused, reference

fused = rll_kernels.ranked_list_loss


def test_module_matches_pml_drop_in():
    from pytorch_metric_learning.losses import RankedListLoss

    emb = torch.randn(64, 16, dtype=torch.float64)
    labels = torch.arange(64) // 4
    ours = RLLFused(margin=0.4, Tn=4.0, semantics="pml")(emb, labels)
    theirs = RankedListLoss(margin=0.4, Tn=4.0)(emb, labels)
    assert abs(ours.item() - theirs.item()) <= 1e-10 * abs(theirs.item())


def test_module_positional_signature_and_repr():
    m = RLLFused(0.3, 5.0, 0.4, 1.1, 1.0)
    assert (m.margin, m.Tn, m.imbalance, m.alpha, m.Tp) == (0.3, 5.0, 0.4, 1.1, 1.0)
    assert RLLFused().alpha == pytest.approx(1.2)
    assert "semantics='paper'" in repr(RLLFused())


def test_backend_reference_equals_cpp():
    emb, labels = torch.randn(20, 6, dtype=torch.float64), torch.arange(20) // 4
    assert torch.allclose(
        fused(emb, labels, backend="reference"), fused(emb, labels, backend="cpp"), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_unavailable_named_backend_raises(name):
    if rll_kernels.available_backends("cpu", "rll")[name] is None:
        pytest.skip(f"{name} is usable on CPU tensors in this environment")
    with pytest.raises(RuntimeError, match=name):
        fused(torch.randn(4, 3), torch.arange(4), backend=name)


def test_fallback_to_reference_warns_once(monkeypatch):
    from rll_kernels import _backends

    monkeypatch.setitem(
        _backends._AVAILABLE,
        ("rll", "cpu"),
        {"reference": None, "cpp": "not built (test)", "triton": "no", "cuda": "no"},
    )
    monkeypatch.setattr(_backends, "_warned", set())
    emb, labels = torch.randn(8, 3), torch.arange(8) // 2
    with pytest.warns(RuntimeWarning, match="falling back"):
        a = fused(emb, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(emb, labels)  # second time: silent
    assert torch.allclose(a, reference.ranked_list_loss(emb, labels))


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


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: torch.ops.rll_kernels.rll_fwd(
                torch.randn(4, 3),
                torch.arange(4),
                None,
                torch.randn(5, 2),
                torch.arange(5),
                None,
                1.2,
                0.8,
                10.0,
                0.0,
                0.5,
                0.0,
                False,
                False,
            ),
            "same embedding size",
        ),
        (
            lambda: torch.ops.rll_kernels.rll_fwd(
                torch.randn(4, 3),
                torch.arange(3),
                None,
                torch.randn(5, 3),
                torch.arange(5),
                None,
                1.2,
                0.8,
                10.0,
                0.0,
                0.5,
                0.0,
                False,
                False,
            ),
            "q_labels must have shape",
        ),
        (
            lambda: torch.ops.rll_kernels.rll_fwd(
                torch.randn(4, 3),
                torch.arange(4).int(),
                None,
                torch.randn(5, 3),
                torch.arange(5),
                None,
                1.2,
                0.8,
                10.0,
                0.0,
                0.5,
                0.0,
                False,
                False,
            ),
            "int64",
        ),
        (
            lambda: torch.ops.rll_kernels.rll_fwd(
                torch.randn(4, 3).half(),
                torch.arange(4),
                None,
                torch.randn(5, 3).half(),
                torch.arange(5),
                None,
                1.2,
                0.8,
                10.0,
                0.0,
                0.5,
                0.0,
                False,
                False,
            ),
            "float32 or float64",
        ),
        (
            lambda: torch.ops.rll_kernels.rll_fwd(
                torch.randn(4, 3),
                torch.arange(4),
                None,
                torch.randn(5, 3),
                torch.arange(5),
                None,
                float("nan"),
                1.2,
                10.0,
                0.0,
                0.5,
                0.0,
                False,
                False,
            ),
            "must be finite",
        ),
        (
            lambda: torch.ops.rll_kernels.rll_fwd(
                torch.randn(4, 3),
                torch.arange(4),
                torch.arange(4),
                torch.randn(5, 3),
                torch.arange(5),
                None,
                1.2,
                0.8,
                10.0,
                0.0,
                0.5,
                0.0,
                False,
                False,
            ),
            "given together",
        ),
        (
            lambda: torch.ops.rll_kernels.rll_fwd(
                torch.randn(4, 6)[:, ::2],
                torch.arange(4),
                None,
                torch.randn(5, 3),
                torch.arange(5),
                None,
                1.2,
                0.8,
                10.0,
                0.0,
                0.5,
                0.0,
                False,
                False,
            ),
            "contiguous",
        ),
    ],
)
def test_op_level_checks_runtime_error(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_labels_on_other_int_dtypes_and_non_contiguous_inputs():
    emb = torch.randn(10, 16, dtype=torch.float64)[:, ::2]  # non-contiguous view
    labels = (torch.arange(10) // 2).to(torch.int32)
    a = fused(emb, labels)
    b = reference.ranked_list_loss(emb, labels.long())
    assert abs(a.item() - b.item()) <= 1e-12
