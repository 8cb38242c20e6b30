"""Every operator schema of rll_kernels, defined once.

Each loss has one op contract: a forward (and, where the gradient is not computed in the forward
pass, a backward) with one schema. The C++ extension implements the contract as
``rll_kernels::<op>`` (CPU kernels, and CUDA kernels when built with them: ``TORCH_LIBRARY_IMPL`` in
csrc/); the Triton backend implements the same schema under ``rll_kernels::<op-with-triton>``
(registered in ``rll_kernels.ops.<loss>``). The schemas are defined here, from Python, so that the
Triton ops exist even when the C++ extension is missing; the extension only adds implementations.

Float hyper-parameters are ``float`` (C++ ``double``) in every schema; each backend converts them to
its accumulation type (fp64 inputs keep fp64 hyper-parameters).
"""

from __future__ import annotations

import torch

__all__ = ["OPS"]

_RLL_FWD = (
    "(Tensor q, Tensor q_labels, Tensor? q_ids, Tensor? k, Tensor? k_labels, Tensor? k_ids, float alpha, "
    "float beta, float Tn, float Tp, float imbalance, float bias_per_row, SymInt? den_rows, bool normalize, "
    "bool attached, bool need_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_RLL_BWD = (
    "(Tensor grad_rows, Tensor q, Tensor q_labels, Tensor? q_ids, Tensor? k, Tensor? k_labels, "
    "Tensor? k_ids, Tensor stats, Tensor z, Tensor norms, float alpha, float beta, float Tn, float Tp, "
    "float imbalance, "
    "float bias_per_row, SymInt? den_rows, bool normalize, bool attached, bool need_gq, bool need_gk) "
    "-> (Tensor, Tensor)"
)
# SoftTriple and OSM take the raw embeddings and normalise them inside the op when `normalize`
# (docs/semantics.md §1.4); the SoftTriple forward returns z = x/|x| and |x| for its backward.
_SOFTTRIPLE_FWD = (
    "(Tensor x, Tensor labels, Tensor w, int centers_per_class, float la, float gamma, float margin, "
    "bool normalize) -> (Tensor, Tensor, Tensor, Tensor)"
)
_SOFTTRIPLE_BWD = (
    "(Tensor grad_rows, Tensor x, Tensor labels, Tensor w, Tensor lse, Tensor z, Tensor norms, "
    "int centers_per_class, float la, float gamma, float margin, bool normalize, bool need_gx, bool need_gw) "
    "-> (Tensor, Tensor)"
)
_OSM_FWD = (
    "(Tensor x, Tensor labels, Tensor? attention, float alpha, float sigma, float imbalance, bool normalize, "
    "bool need_grad) -> (Tensor, Tensor, Tensor)"
)

# loss -> backend -> (forward op, backward op or None); "cpp" names the C++ ops, which also carry the
# CUDA kernels (backend "cuda") when the extension is built with them.
OPS: dict[str, dict[str, tuple[str, str | None]]] = {
    "rll": {"cpp": ("rll_fwd", "rll_bwd"), "triton": ("rll_triton_fwd", "rll_triton_bwd")},
    "softtriple": {
        "cpp": ("softtriple_fwd", "softtriple_bwd"),
        "triton": ("softtriple_triton_fwd", "softtriple_triton_bwd"),
    },
    "osm": {"cpp": ("osm_fwd", None), "triton": ("osm_triton_fwd", None)},
}
_SCHEMAS = {
    "rll": (_RLL_FWD, _RLL_BWD),
    "softtriple": (_SOFTTRIPLE_FWD, _SOFTTRIPLE_BWD),
    "osm": (_OSM_FWD, None),
}

_LIB = torch.library.Library("rll_kernels", "DEF")  # kept alive for the life of the process
for _loss, _backends in OPS.items():
    for _fwd, _bwd in _backends.values():
        _LIB.define(_fwd + _SCHEMAS[_loss][0])
        if _bwd is not None:
            _LIB.define(_bwd + _SCHEMAS[_loss][1])
