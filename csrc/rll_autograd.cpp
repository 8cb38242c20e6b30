// Autograd of the C++ Ranked List Loss op (rll_kernels::rll_fwd: its CPU kernels and, when built,
// its CUDA kernels), registered in C++ at the Autograd key: an eager training step then runs no
// Python between the module's call and the kernels, forward or backward (torch.library's Python
// autograd costs ~150 us per call, more than the whole kernel at N = 64). The formula is the one of
// the Triton twin's Python autograd (rll_kernels/ops/rll.py, docs/architecture.md "Autograd"):
// "paper" (need_grad and not attached) scales the forward's query gradient by the upstream row
// gradients; "pml" in-batch on the CPU with need_grad hands on the forward's gradient of the rows'
// mean, scaled to the (uniform) upstream gradient (gradient_from_mean); else "pml" calls rll_bwd on
// the saved inputs and row statistics. torch.compile traces this node's backward like any other (the
// op's fake kernels are in rll_kernels/ops/rll.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace rll {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;
using OptSymInt = c10::optional<c10::SymInt>;

using FwdResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using FwdSignature = FwdResult(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                               const OptTensor&, double, double, double, double, double, double, OptSymInt, bool,
                               bool, bool);
using BwdSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                                const Tensor&, const Tensor&, double, double, double, double, double,
                                                double, OptSymInt, bool, bool, bool, bool);

// The schemas are defined from Python (rll_kernels/ops/_schemas.py) before this library loads;
// the handles are looked up on the first call.
const c10::TypedOperatorHandle<FwdSignature>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("rll_kernels::rll_fwd", "").typed<FwdSignature>();
  return op;
}
const c10::TypedOperatorHandle<BwdSignature>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("rll_kernels::rll_bwd", "").typed<BwdSignature>();
  return op;
}

// The hyper-parameters as the op takes them, kept for the backward.
struct Hyper {
  double alpha, beta, Tn, Tp, imbalance, bias_per_row;
  OptSymInt den_rows;
};
const char* const kHyperNames[] = {"alpha", "beta", "Tn", "Tp", "imbalance", "bias_per_row"};

void save_hyper(AutogradContext* ctx, const Hyper& h) {
  const double values[] = {h.alpha, h.beta, h.Tn, h.Tp, h.imbalance, h.bias_per_row};
  for (int i = 0; i < 6; ++i) ctx->saved_data[kHyperNames[i]] = values[i];
  ctx->saved_data["den_rows"] = h.den_rows.has_value() ? c10::IValue(*h.den_rows) : c10::IValue();
}

Hyper load_hyper(AutogradContext* ctx) {
  double v[6];
  for (int i = 0; i < 6; ++i) v[i] = ctx->saved_data[kHyperNames[i]].toDouble();
  const c10::IValue& den = ctx->saved_data["den_rows"];
  return {v[0], v[1], v[2], v[3], v[4], v[5], den.isNone() ? OptSymInt() : OptSymInt(den.toSymInt())};
}

OptTensor optional_of(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

// "pml" with need_grad (a uniform upstream gradient: the mean and sum reductions), in-batch, on the
// CPU: the forward returns the gradient of the rows' mean (rll_pml_in_batch_with_grad, csrc/rll_cpu.cpp);
// the fake kernel's rule is the same (rll_kernels/ops/rll.py).
bool pml_grad_in_forward(const Tensor& q, const OptTensor& k) { return !k.has_value() && q.device().is_cpu(); }

constexpr const char* kNotUniform =
    "rll_fwd: with attached and need_grad in-batch (pml, a mean or sum reduction) the forward computed the "
    "gradient of the rows mean; the upstream gradient of the rows must be uniform: call it with need_grad=False "
    "for any other";

// The gradient from the forward's gradient of the rows' mean (row weights 1/N) and the rows' upstream
// gradient g, which must be uniform (NaN too): N g times it. A plain CPU tensor is read in place (~N ns),
// and when g = 1/N (a mean reduction's backward) the forward's tensor is returned as it is: no copy,
// and autograd can hand it on as the leaf's gradient. A traced one (fake or functional tensors,
// torch.compile) gets the check as ops, which the compiled code runs, and the scale sum(g) = N g.
Tensor gradient_from_mean(const Tensor& grad_of_mean, const Tensor& g) {
  const bool traced = g.unsafeGetTensorImpl()->is_python_dispatch() || at::functionalization::impl::isFunctionalTensor(g);
  if (traced || !g.is_cpu()) {
    at::_assert_async(((g == g.roll(1)) | g.isnan()).all(), kNotUniform);
    return grad_of_mean * g.sum();
  }
  const int64_t n = g.numel();
  if (n == 0) return grad_of_mean;
  double scale = 1.0;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gradient_from_mean", [&] {
    const scalar_t* v = g.const_data_ptr<scalar_t>();
    for (int64_t i = 1; i < n; ++i)
      TORCH_CHECK(v[i] == v[0] || (std::isnan(v[i]) && std::isnan(v[0])), kNotUniform);
    const bool mean = v[0] == static_cast<scalar_t>(1.0 / static_cast<double>(n));  // the kernel's row weight
    scale = mean ? 1.0 : static_cast<double>(v[0]) * static_cast<double>(n);
  });
  return scale == 1.0 ? grad_of_mean : grad_of_mean * scale;
}

class RankedListFunction : public torch::autograd::Function<RankedListFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& q_labels, const OptTensor& q_ids,
                               const OptTensor& k, const OptTensor& k_labels, const OptTensor& k_ids, Hyper h,
                               bool normalize, bool attached, bool need_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [rows, gradq, stats, z, norms] = forward_op().call(q, q_labels, q_ids, k, k_labels, k_ids, h.alpha, h.beta, h.Tn,
                                                            h.Tp, h.imbalance, h.bias_per_row, h.den_rows, normalize,
                                                            attached, need_grad);
    const bool grad_in_forward = need_grad && (!attached || pml_grad_in_forward(q, k));
    ctx->saved_data["grad_in_forward"] = grad_in_forward;
    ctx->saved_data["uniform_upstream"] = grad_in_forward && attached;
    ctx->saved_data["q_dtype"] = static_cast<int64_t>(q.scalar_type());
    // needs_input_grad counts the tensor inputs given: q, q_labels, then q_ids if given, then k
    ctx->saved_data["k_edge"] = k.has_value() ? int64_t(q_ids.has_value() ? 3 : 2) : int64_t(-1);
    if (grad_in_forward) {
      ctx->save_for_backward({gradq});  // "paper": every row's query gradient is already there
    } else {
      ctx->save_for_backward({q, q_labels, q_ids.value_or(Tensor()), k.value_or(Tensor()), k_labels.value_or(Tensor()),
                              k_ids.value_or(Tensor()), stats, z, norms});
      save_hyper(ctx, h);
      ctx->saved_data["normalize"] = normalize;
      ctx->saved_data["attached"] = attached;
    }
    ctx->mark_non_differentiable({gradq, stats, z, norms});
    // the four outputs above never get a gradient: no zero (N, D) tensors for them in the backward
    ctx->set_materialize_grads(false);
    return {rows, gradq, stats, z, norms};
  }

  // Gradients of (q, q_labels, q_ids, k, k_labels, k_ids, hyper-parameters, normalize, attached, need_grad).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);
    if (!grads[0].defined()) return out;  // the row losses were not used: no gradient
    const Tensor g_rows = grads[0].contiguous();
    const bool need_q = ctx->needs_input_grad(0);
    const auto q_dtype = static_cast<at::ScalarType>(ctx->saved_data["q_dtype"].toInt());
    const variable_list saved = ctx->get_saved_variables();
    if (ctx->saved_data["grad_in_forward"].toBool()) {
      if (ctx->saved_data["uniform_upstream"].toBool()) {
        if (need_q) out[0] = gradient_from_mean(saved[0], g_rows);
        return out;
      }
      if (need_q) out[0] = (saved[0] * g_rows.unsqueeze(1)).to(q_dtype);
      return out;
    }
    const bool attached = ctx->saved_data["attached"].toBool();
    const int64_t k_edge = ctx->saved_data["k_edge"].toInt();
    const bool need_k = attached && k_edge >= 0 && ctx->needs_input_grad(k_edge);  // "paper": k is a constant
    const Hyper h = load_hyper(ctx);
    auto [gq, gk] = backward_op().call(g_rows, saved[0], saved[1], optional_of(saved[2]), optional_of(saved[3]),
                                       optional_of(saved[4]), optional_of(saved[5]), saved[6], saved[7], saved[8],
                                       h.alpha, h.beta, h.Tn, h.Tp, h.imbalance, h.bias_per_row, h.den_rows,
                                       ctx->saved_data["normalize"].toBool(), attached, need_q, need_k);
    if (need_q) out[0] = gq;
    if (need_k) out[3] = gk;
    return out;
  }
};

FwdResult rll_fwd_autograd(const Tensor& q, const Tensor& q_labels, const OptTensor& q_ids, const OptTensor& k,
                           const OptTensor& k_labels, const OptTensor& k_ids, double alpha, double beta, double Tn,
                           double Tp, double imbalance, double bias_per_row, OptSymInt den_rows, bool normalize,
                           bool attached, bool need_grad) {
  const Hyper h{alpha, beta, Tn, Tp, imbalance, bias_per_row, std::move(den_rows)};
  const variable_list out =
      RankedListFunction::apply(q, q_labels, q_ids, k, k_labels, k_ids, h, normalize, attached, need_grad);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rll_kernels, Autograd, m) { m.impl("rll_fwd", &rll_fwd_autograd); }

}  // namespace rll
