"""SoftTriple loss, fused (SPEC section 2): functional entry, ``SoftTripleFused`` module and the
fake/autograd registration of the C++ ops ``rll_kernels::softtriple_fwd`` / ``softtriple_bwd``.

The fused kernels never materialise the N x C*K similarity tensor: they stream class tiles with an
online log-sum-exp, save only the per-row LSE, and recompute the tiles in backward. The embeddings
are normalised in PyTorch autograd; the centers enter raw and the kernels apply (and
differentiate) the per-column normalisation on the fly, because a normalised copy of the
D x C*K centers, and its gradient, would cost more memory than the N x C*K tensors avoided
(SOP: 232 MB vs 116 MB).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import _ops
from ._dispatch import warn_once
from ._reference_softtriple import REG_EPS, soft_triple_compute_dtype
from ._reference_softtriple import soft_triple_loss as _reference_loss
from ._validate import check_choice, check_embeddings, check_labels

__all__ = ["SoftTripleFused", "soft_triple_loss"]

BACKENDS = ("auto", "cpp", "triton", "reference")

# ---------------------------------------------------------------- C++ op registration
if _ops.HAS_C and _ops.has_kernel("softtriple_fwd", "cpu"):

    @torch.library.register_fake("rll_kernels::softtriple_fwd")
    def _softtriple_fwd_fake(x, labels, w, centers_per_class, la, gamma, margin):
        torch._check(x.dim() == 2 and w.dim() == 2, lambda: "softtriple_fwd: x and w must be 2-D")
        torch._check(x.shape[1] == w.shape[0], lambda: "softtriple_fwd: x and w embedding sizes differ")
        n = x.shape[0]
        return x.new_empty(n), x.new_empty(n)

    @torch.library.register_fake("rll_kernels::softtriple_bwd")
    def _softtriple_bwd_fake(
        grad_rows, x, labels, w, lse, centers_per_class, la, gamma, margin, need_gx, need_gw
    ):
        gx = torch.empty_like(x) if need_gx else x.new_empty(0)
        gw = torch.empty_like(w) if need_gw else w.new_empty(0)
        return gx, gw

    def _softtriple_setup_context(ctx, inputs, output):
        x, labels, w, k, la, gamma, margin = inputs
        _, lse = output
        ctx.params = (k, la, gamma, margin)
        ctx.save_for_backward(x, labels, w, lse)

    def _softtriple_backward(ctx, g_rows, _g_lse):
        # LSE is a saved statistic: its gradient is not propagated (it is never used by the API)
        x, labels, w, lse = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        gx, gw = torch.ops.rll_kernels.softtriple_bwd(
            g_rows.contiguous(), x, labels, w, lse, *ctx.params, need_x, need_w
        )
        return (gx if need_x else None, None, gw if need_w else None, None, None, None, None)

    torch.library.register_autograd(
        "rll_kernels::softtriple_fwd", _softtriple_backward, setup_context=_softtriple_setup_context
    )


# ---------------------------------------------------------------- backends
def _triton_status(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return "Triton runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)"


# probed once at import (the dispatcher query cannot be traced by torch.compile)
_CPP_REGISTERED = _ops.HAS_C and _ops.has_kernel("softtriple_fwd", "cpu")


def _cpp_status(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return "the cpp backend runs on CPU tensors only"
    if not _CPP_REGISTERED:
        return f"C++ extension not built ({_ops.C_IMPORT_ERROR})"
    return None


_STATUS = {"reference": lambda dev: None, "cpp": _cpp_status, "triton": _triton_status}


def available_backends(device: torch.device | str = "cpu") -> dict[str, Optional[str]]:
    """SoftTriple backends: name -> None if usable on ``device``, else the reason it is not."""
    dev = torch.device(device)
    return {name: status(dev) for name, status in _STATUS.items()}


def _resolve_backend(backend: str, device: torch.device) -> str:
    check_choice(backend, "backend", BACKENDS)
    if backend != "auto":
        why = _STATUS[backend](device)
        if why is not None:
            raise RuntimeError(
                f"rll_kernels: SoftTriple backend {backend!r} is not available on {device}: {why}"
            )
        return backend
    name = "cpp" if device.type == "cpu" else "triton"
    why = _STATUS[name](device)  # probe only the backend "auto" wants (no triton import on CPU)
    if why is None:
        return name
    warn_once(
        f"softtriple-fallback-{device.type}",
        f"rll_kernels: no fused SoftTriple backend for {device.type} tensors ({name}: {why}); "
        "falling back to the dense reference (materialises N x C*K)",
    )
    return "reference"


def _fused_fwd(name: str):
    if name == "triton":
        from .triton import softtriple as _tst  # noqa: F401  (registers the Triton custom ops)

        return torch.ops.rll_kernels.softtriple_triton_fwd
    return torch.ops.rll_kernels.softtriple_fwd


# ---------------------------------------------------------------- argument checks
def _check_params(centers_per_class, la, gamma, margin, tau) -> None:
    if isinstance(centers_per_class, bool) or not isinstance(centers_per_class, int) or centers_per_class < 1:
        raise ValueError(f"centers_per_class must be a positive int, got {centers_per_class!r}")
    for nm, v in (("la", la), ("gamma", gamma), ("margin", margin), ("tau", tau)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{nm} must be a finite number, got {v!r}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")


def _check_centers(centers, d: int, k: int, device: torch.device) -> int:
    if not isinstance(centers, torch.Tensor):
        raise ValueError(f"centers must be a torch.Tensor, got {type(centers).__name__}")
    if centers.dim() != 2 or centers.shape[0] != d:
        raise ValueError(
            f"centers must be (embedding_size={d}, num_classes * centers_per_class), "
            f"got shape {tuple(centers.shape)}"
        )
    if centers.shape[1] == 0 or centers.shape[1] % k != 0:
        raise ValueError(
            f"centers has {centers.shape[1]} columns, expected a positive multiple of centers_per_class={k}"
        )
    if not centers.is_floating_point():
        raise ValueError(f"centers must be a floating-point tensor, got {centers.dtype}")
    if centers.device != device:
        raise ValueError(f"centers must be on the embeddings' device {device}, got {centers.device}")
    return centers.shape[1] // k


def _check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got {bad}")


class _SparseCentersRaw(torch.autograd.Function):
    """R from the raw centers with a hand-written backward that makes one D x C*K gradient.

    Plain autograd through the batched Gram makes two (C, K, D) gradients (one per bmm operand),
    a layout copy and their sum: about 3 x 232 MB at SOP scale. Here
    dR/dw_t = sum_s M_ts w_s per class, with M = r A r^T + diag(-q_t sum_s A_ts cos_ts),
    A = dR/dcos (symmetric), r = 1/|w| and q = r^2 (0 where F.normalize clamps the norm).
    """

    @staticmethod
    def forward(ctx, centers: torch.Tensor, k: int, reg_eps: float) -> torch.Tensor:
        d, ck = centers.shape
        c = ck // k
        wc = centers.view(d, c, k).permute(1, 2, 0)  # (C, K, D) view
        nrm = torch.linalg.vector_norm(centers, dim=0)
        rn = 1.0 / nrm.clamp_min(1e-12)
        cos = torch.bmm(wc, wc.transpose(1, 2)) * (rn.view(c, k, 1) * rn.view(c, 1, k))
        root = torch.sqrt(2.0 + reg_eps - 2.0 * cos)
        upper = torch.ones(k, k, dtype=torch.bool, device=centers.device).triu(1)
        ctx.save_for_backward(centers, nrm, cos, root)
        ctx.k = k
        return (root * upper).sum() / (c * k * (k - 1))

    @staticmethod
    def backward(ctx, g):
        centers, nrm, cos, root = ctx.saved_tensors
        k = ctx.k
        d, ck = centers.shape
        c = ck // k
        rn = (1.0 / nrm.clamp_min(1e-12)).view(c, k)
        q = torch.where(nrm > 1e-12, 1.0 / nrm.clamp_min(1e-12) ** 2, torch.zeros_like(nrm)).view(c, k)
        off = ~torch.eye(k, dtype=torch.bool, device=centers.device)
        # dR/dcos_ts for t != s, both orders (each unordered pair appears once in R)
        a = torch.where(off, -g / (root * (c * k * (k - 1))), torch.zeros_like(root))
        m = a * (rn.unsqueeze(2) * rn.unsqueeze(1))
        m = m - torch.diag_embed(q * (a * cos).sum(2))  # (C, K, K)
        out = torch.empty_like(centers)
        step = max(1, (1 << 22) // max(1, ck))  # D rows per chunk: temporaries of about 16 MB
        for d0 in range(0, d, step):
            blk = centers[d0 : d0 + step].view(-1, c, k)  # (dc, C, K)
            out[d0 : d0 + step].view(-1, c, k).copy_(torch.einsum("dcs,cts->dct", blk, m))
        return out, None, None


def sparse_centers_raw(
    centers: torch.Tensor, centers_per_class: int, *, reg_eps: float = REG_EPS
) -> torch.Tensor:
    """SoftTriple's regulariser R from the raw (D, C*K) centers, without a normalised copy of them.

    Per class, the K x K Gram of the raw centers divided by the outer product of their norms (the
    norms clamped at 1e-12, as F.normalize) gives the cosines; equal to
    ``reference.soft_triple_regularizer`` up to rounding.
    """
    k = int(centers_per_class)
    if k == 1:
        return centers.new_zeros(())
    return _SparseCentersRaw.apply(centers.contiguous(), k, float(reg_eps))


# ---------------------------------------------------------------- functional
def soft_triple_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    centers_per_class: int = 10,
    la: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    tau: float = 0.2,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""SoftTriple loss (Qian et al., ICCV 2019), fused: never materialises N x C*K (SPEC section 2).

    With :math:`x_i = e_i/\|e_i\|`, :math:`\hat w_{ck} = W_{:, cK+k}/\|W_{:, cK+k}\|`,
    :math:`s_{ick} = x_i^\top \hat w_{ck}`:

    .. math::
        S_{ic} = \sum_k \mathrm{softmax}_k(s_{ick}/\gamma)\, s_{ick}, \qquad
        \ell_i = -\log \mathrm{softmax}_c\big(\lambda (S_{ic} - \delta [c = y_i])\big)_{y_i}

        L = \frac{1}{N}\sum_i \ell_i + \tau R, \qquad
        R = \frac{1}{C K (K-1)} \sum_c \sum_{t<s} \sqrt{2 + 10^{-5} - 2\,\hat w_{ct}^\top \hat w_{cs}}

    Args:
        embeddings: (N, D). labels: (N,) integers in [0, C).
        centers: (D, C*K) centers, column ``c*K + k`` is center k of class c (PML's ``fc``).
        centers_per_class: K. la: lambda. gamma: K-softmax temperature. margin: delta.
        tau: regulariser weight (R is skipped when ``tau == 0`` or K = 1; PML's default is off).
        reduction: ``"mean"`` (the loss above), ``"sum"`` (sum of :math:`\ell_i` + tau R) or
            ``"none"`` (the per-row :math:`\ell_i`, without R).
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpp"``, ``"triton"`` or ``"reference"``.

    Computed (and returned) in float64 if the embeddings or the centers are float64, else float32;
    gradients reach both the embeddings and the centers.
    """
    _check_params(centers_per_class, la, gamma, margin, tau)
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    check_embeddings(embeddings, "embeddings")
    labels = check_labels(labels, embeddings.shape[0], "labels", embeddings.device)
    k = centers_per_class
    num_classes = _check_centers(centers, embeddings.shape[1], k, embeddings.device)
    _check_label_range(labels, num_classes)
    name = _resolve_backend(backend, embeddings.device)
    dt = soft_triple_compute_dtype(embeddings.dtype, centers.dtype)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        if name == "reference":
            return _reference_loss(
                embeddings.to(dt), labels, centers.to(dt), k, la, gamma, margin, tau, reduction=reduction
            )
        x = F.normalize(embeddings.to(dt), dim=1).contiguous()
        w = centers.to(dt).contiguous()  # raw: the kernel normalises each center column itself
        rows, _ = _fused_fwd(name)(x, labels, w, k, float(la), float(gamma), float(margin))
        if reduction == "none":
            return rows
        loss = rows.mean() if reduction == "mean" else rows.sum()
        if tau > 0 and k > 1:
            loss = loss + tau * sparse_centers_raw(w, k)
        return loss


# ---------------------------------------------------------------- module
class SoftTripleFused(torch.nn.Module):
    r"""Fused SoftTriple loss with its centers as the parameter ``fc`` (D x C*K, PML's name and shape).

    A PML ``SoftTripleLoss`` state_dict loads unchanged. ``fc`` stays float32 whatever the input
    dtype (fp16/bf16 embeddings are computed in fp32; PML casts ``fc`` to the input dtype, PML
    issues #293/#309) unless the module itself is converted (``.double()``). ``tau=0`` equals PML's
    default (no regulariser). See :func:`soft_triple_loss` for the equation.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        margin: float = 0.01,
        tau: float = 0.2,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for nm, v in (("num_classes", num_classes), ("embedding_size", embedding_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        _check_params(centers_per_class, la, gamma, margin, tau)
        check_choice(backend, "backend", BACKENDS)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.centers_per_class = centers_per_class
        self.la, self.gamma, self.margin, self.tau = la, gamma, margin, tau
        self.backend = backend
        self.fc = torch.nn.Parameter(torch.empty(embedding_size, num_classes * centers_per_class))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PML's default init (c_f.TorchInitWrapper(kaiming_uniform_, a=sqrt(5)))
        torch.nn.init.kaiming_uniform_(self.fc, a=math.sqrt(5))

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple=None,
        ref_emb=None,
        ref_labels=None,
    ) -> torch.Tensor:
        if labels is None:
            raise ValueError("labels are required for this loss function")
        if indices_tuple is not None:
            raise ValueError("indices_tuple is not supported for this loss function")
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb is not supported for this loss function")
        return soft_triple_loss(
            embeddings,
            labels,
            self.fc,
            self.centers_per_class,
            self.la,
            self.gamma,
            self.margin,
            self.tau,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
            f"margin={self.margin}, tau={self.tau}, backend={self.backend!r}"
        )
