// CUDA implementation of the rll_kernels::rll_fwd / rll_bwd ops (schemas in rll_kernels/ops/_schemas.py), on
// PyTorch's stable ABI (torch/csrc/stable, TORCH_TARGET_VERSION 2.10): checks the arguments,
// allocates the outputs and calls the torch-free launchers of rll_kernels.cuh on the current stream.
//
// Output dtypes: fp32/fp64 inputs give every output in the input dtype (as the CPU kernel);
// fp16/bf16 inputs give the loss and the stats in fp32 (the accumulation type) and the gradients
// in the input dtype (accumulated in fp32, converted once at the end).
#ifndef TORCH_TARGET_VERSION
#define TORCH_TARGET_VERSION 0x020a000000000000
#endif
#ifndef USE_CUDA
#define USE_CUDA  // aoti_torch_get_current_cuda_stream
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <optional>
#include <tuple>
#include <vector>

#include "rll_kernels.cuh"

namespace rll {
namespace cuda {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

cudaStream_t current_stream(const Tensor& t) {
  void* s = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &s) == AOTI_TORCH_SUCCESS,
                  "rll (cuda): cannot get the current CUDA stream");
  return static_cast<cudaStream_t>(s);
}

void check_launch(cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, "rll (cuda): ", what, " failed: ", cudaGetErrorString(err));
}

void check_ids(const std::optional<Tensor>& ids, int64_t n, const char* name, const Tensor& q) {
  if (!ids.has_value()) return;
  const Tensor& t = *ids;
  STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == ScalarType::Long,
                  "rll: ", name, " must be int64 of shape (", n, ",)");
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == q.get_device_index(), "rll (cuda): ", name,
                  " must be on the device of q");
  STD_TORCH_CHECK(t.is_contiguous(), "rll: ", name, " must be contiguous");
}

void check_inputs(const Tensor& q, const Tensor& ql, const std::optional<Tensor>& qid, const Tensor& k,
                  const Tensor& kl, const std::optional<Tensor>& kid) {
  STD_TORCH_CHECK(q.dim() == 2, "rll: q must be 2-D (N, D), got ", q.dim(), "-D");
  STD_TORCH_CHECK(k.dim() == 2, "rll: k must be 2-D (M, D), got ", k.dim(), "-D");
  STD_TORCH_CHECK(q.size(1) == k.size(1), "rll: q and k must have the same embedding size, got ", q.size(1),
                  " and ", k.size(1));
  STD_TORCH_CHECK(q.scalar_type() == k.scalar_type(), "rll: q and k must have the same dtype");
  const ScalarType st = q.scalar_type();
  STD_TORCH_CHECK(st == ScalarType::Float || st == ScalarType::Double || st == ScalarType::Half ||
                      st == ScalarType::BFloat16,
                  "rll (cuda): q must be float16, bfloat16, float32 or float64");
  STD_TORCH_CHECK(ql.dim() == 1 && ql.size(0) == q.size(0), "rll: q_labels must have shape (", q.size(0), ",)");
  STD_TORCH_CHECK(kl.dim() == 1 && kl.size(0) == k.size(0), "rll: k_labels must have shape (", k.size(0), ",)");
  STD_TORCH_CHECK(ql.scalar_type() == ScalarType::Long && kl.scalar_type() == ScalarType::Long,
                  "rll: labels must be int64");
  STD_TORCH_CHECK(qid.has_value() == kid.has_value(), "rll: q_ids and k_ids must be given together");
  check_ids(qid, q.size(0), "q_ids", q);
  check_ids(kid, k.size(0), "k_ids", q);
  for (const Tensor* t : {&q, &ql, &k, &kl}) {
    STD_TORCH_CHECK(t->is_cuda() && t->get_device_index() == q.get_device_index(),
                    "rll (cuda): all tensors must be on the device of q");
    STD_TORCH_CHECK(t->is_contiguous(), "rll: inputs must be contiguous");
  }
}

ScalarType acc_type(ScalarType st) { return st == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

template <class S>
Params<S> make_params(double alpha, double beta, double Tn, double Tp, double lam, double den_bias) {
  const std::string err = params_error(alpha, beta, Tn, Tp, lam, den_bias);
  STD_TORCH_CHECK(err.empty(), err);
  return params_in<S>(alpha, beta, Tn, Tp, lam, den_bias);
}

const int64_t* ids_ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? static_cast<const int64_t*>(t->data_ptr()) : nullptr;
}

template <class T>
Problem<T> make_problem(const Tensor& q, const Tensor& ql, const std::optional<Tensor>& qid, const Tensor& k,
                        const Tensor& kl, const std::optional<Tensor>& kid) {
  Problem<T> pb;
  pb.q = static_cast<const T*>(q.data_ptr());
  pb.k = static_cast<const T*>(k.data_ptr());
  pb.q_labels = static_cast<const int64_t*>(ql.data_ptr());
  pb.k_labels = static_cast<const int64_t*>(kl.data_ptr());
  pb.q_ids = ids_ptr(qid);
  pb.k_ids = ids_ptr(kid);
  pb.N = q.size(0);
  pb.M = k.size(0);
  pb.D = q.size(1);
  pb.ldq = q.stride(0);
  pb.ldk = k.stride(0);
  return pb;
}

// Calls f.template operator()<T>() with T the kernel type of st.
template <class F>
void dispatch_type(ScalarType st, F&& f) {
  switch (st) {
    case ScalarType::Float: f.template operator()<float>(); break;
    case ScalarType::Double: f.template operator()<double>(); break;
    case ScalarType::Half: f.template operator()<__half>(); break;
    case ScalarType::BFloat16: f.template operator()<__nv_bfloat16>(); break;
    default: STD_TORCH_CHECK(false, "rll (cuda): unsupported dtype");
  }
}

std::vector<int64_t> shape(std::initializer_list<int64_t> s) { return std::vector<int64_t>(s); }

std::tuple<Tensor, Tensor, Tensor> rll_fwd_cuda(Tensor q, Tensor q_labels, std::optional<Tensor> q_ids, Tensor k,
                                                Tensor k_labels, std::optional<Tensor> k_ids, double alpha,
                                                double beta, double Tn, double Tp, double imbalance,
                                                double den_bias, bool attached, bool need_grad) {
  check_inputs(q, q_labels, q_ids, k, k_labels, k_ids);
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const bool paper_grad = need_grad && !attached;
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  const ScalarType st = q.scalar_type(), acc = acc_type(st);
  Tensor loss = torch::stable::new_empty(q, shape({N}), acc);
  Tensor stats = torch::stable::new_empty(q, shape({N, 4}), acc);
  Tensor gq = paper_grad ? torch::stable::new_zeros(q, shape({N, D}), acc) : torch::stable::new_empty(q, shape({0}));
  if (N > 0) {
    Tensor norms = torch::stable::new_empty(q, shape({N + M}), acc);
    const cudaStream_t stream = current_stream(q);
    dispatch_type(st, [&]<class T>() {
      using S = acc_t<T>;
      const Problem<T> pb = make_problem<T>(q, q_labels, q_ids, k, k_labels, k_ids);
      const Params<S> prm = make_params<S>(alpha, beta, Tn, Tp, imbalance, den_bias);
      check_launch(launch_rll_fwd<T>(pb, prm, static_cast<S*>(loss.data_ptr()), static_cast<S*>(stats.data_ptr()),
                                     paper_grad ? static_cast<S*>(gq.data_ptr()) : nullptr,
                                     static_cast<S*>(norms.data_ptr()), stream),
                   "rll_fwd kernel launch");
    });
  }
  if (paper_grad && acc != st) gq = torch::stable::to(gq, st);
  return {loss, gq, stats};
}

std::tuple<Tensor, Tensor> rll_bwd_cuda(Tensor grad_rows, Tensor q, Tensor q_labels, std::optional<Tensor> q_ids,
                                        Tensor k, Tensor k_labels, std::optional<Tensor> k_ids, Tensor stats,
                                        double alpha, double beta, double Tn, double Tp, double imbalance,
                                        double den_bias, bool attached, bool need_gq, bool need_gk) {
  check_inputs(q, q_labels, q_ids, k, k_labels, k_ids);
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  const ScalarType st = q.scalar_type(), acc = acc_type(st);
  STD_TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == N, "rll_bwd: grad_rows must have shape (", N, ",)");
  STD_TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == 4, "rll_bwd: stats must be (", N,
                  ", 4)");
  STD_TORCH_CHECK(grad_rows.is_cuda() && stats.is_cuda(), "rll_bwd (cuda): grad_rows and stats must be on CUDA");
  // the kernels read both in the accumulation type, contiguous
  const auto as_acc = [&](const Tensor& t) {
    return torch::stable::contiguous(t.scalar_type() == acc ? t : torch::stable::to(t, acc));
  };
  const Tensor g = as_acc(grad_rows);
  const Tensor s = as_acc(stats);
  Tensor gq = need_gq ? torch::stable::new_zeros(q, shape({N, D}), acc) : torch::stable::new_empty(q, shape({0}));
  Tensor gk = need_gk ? torch::stable::new_zeros(k, shape({M, D}), acc) : torch::stable::new_empty(k, shape({0}));
  if (N > 0 && (need_gq || need_gk)) {
    Tensor norms = torch::stable::new_empty(q, shape({N + M}), acc);
    const cudaStream_t stream = current_stream(q);
    dispatch_type(st, [&]<class T>() {
      using S = acc_t<T>;
      const Problem<T> pb = make_problem<T>(q, q_labels, q_ids, k, k_labels, k_ids);
      const Params<S> prm = make_params<S>(alpha, beta, Tn, Tp, imbalance, den_bias);
      check_launch(launch_rll_bwd<T>(pb, prm, static_cast<const S*>(g.data_ptr()),
                                     static_cast<const S*>(s.data_ptr()), attached,
                                     need_gq ? static_cast<S*>(gq.data_ptr()) : nullptr,
                                     need_gk ? static_cast<S*>(gk.data_ptr()) : nullptr,
                                     static_cast<S*>(norms.data_ptr()), stream),
                   "rll_bwd kernel launch");
    });
  }
  if (acc != st) {
    if (need_gq) gq = torch::stable::to(gq, st);
    if (need_gk) gk = torch::stable::to(gk, st);
  }
  return {gq, gk};
}

}  // namespace
}  // namespace cuda
}  // namespace rll

STABLE_TORCH_LIBRARY_IMPL(rll_kernels, CUDA, m) {
  m.impl("rll_fwd", TORCH_BOX(&rll::cuda::rll_fwd_cuda));
  m.impl("rll_bwd", TORCH_BOX(&rll::cuda::rll_bwd_cuda));
}
