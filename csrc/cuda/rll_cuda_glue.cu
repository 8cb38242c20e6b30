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

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
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

void check_rows(const Tensor& x, const char* name, const Tensor& q) {
  STD_TORCH_CHECK(x.dim() == 2, "rll: ", name, " must be 2-D, got ", x.dim(), "-D");
  const ScalarType st = x.scalar_type();
  STD_TORCH_CHECK(st == ScalarType::Float || st == ScalarType::Double || st == ScalarType::Half ||
                      st == ScalarType::BFloat16,
                  "rll (cuda): ", name, " must be float16, bfloat16, float32 or float64");
  STD_TORCH_CHECK(x.is_cuda() && x.get_device_index() == q.get_device_index(), "rll (cuda): ", name,
                  " must be on the device of q");
}

// In-batch (k absent): no gallery labels or ids either.
void check_inputs(const Tensor& q, const Tensor& ql, const std::optional<Tensor>& qid, const std::optional<Tensor>& k,
                  const std::optional<Tensor>& kl, const std::optional<Tensor>& kid) {
  check_rows(q, "q", q);
  check_ids(ql, q.size(0), "q_labels", q);
  check_ids(qid, q.size(0), "q_ids", q);
  if (!k.has_value()) {
    STD_TORCH_CHECK(!kl.has_value() && !kid.has_value(), "rll: k_labels and k_ids need k (in-batch: all absent)");
    return;
  }
  check_rows(*k, "k", q);
  STD_TORCH_CHECK(q.size(1) == k->size(1), "rll: q and k must have the same embedding size, got ", q.size(1),
                  " and ", k->size(1));
  STD_TORCH_CHECK(q.scalar_type() == k->scalar_type(), "rll: q and k must have the same dtype");
  STD_TORCH_CHECK(kl.has_value(), "rll: k_labels must be given with k");
  check_ids(kl, k->size(0), "k_labels", q);
  STD_TORCH_CHECK(qid.has_value() == kid.has_value(), "rll: q_ids and k_ids must be given together");
  check_ids(kid, k->size(0), "k_ids", q);
}

ScalarType acc_type(ScalarType st) { return st == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

// den_bias = bias_per_row x (den_rows, or the gallery's rows): PML's M * 1e-5 (docs/semantics.md §2.8).
template <class S>
Params<S> make_params(double alpha, double beta, double Tn, double Tp, double lam, double bias_per_row,
                      std::optional<int64_t> den_rows, int64_t M) {
  const double den_bias = bias_per_row * static_cast<double>(den_rows.value_or(M));
  const std::string err = params_error(alpha, beta, Tn, Tp, lam, den_bias);
  STD_TORCH_CHECK(err.empty(), err);
  return params_in<S>(alpha, beta, Tn, Tp, lam, den_bias);
}

const int64_t* ids_ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? static_cast<const int64_t*>(t->data_ptr()) : nullptr;
}

// The kernels' rows: z (normalize: queries then, unless in-batch, the gallery; row stride D) or the
// raw rows (contiguous copies when they are not).
struct Rows {
  Tensor q, k;  // k is q in-batch
  bool in_batch;
};

Rows raw_rows(const Tensor& q, const std::optional<Tensor>& k) {
  const Tensor qc = torch::stable::contiguous(q);
  return {qc, k.has_value() ? torch::stable::contiguous(*k) : qc, !k.has_value()};
}

template <class T>
Problem<T> make_problem(const Tensor& z, const Rows& raw, bool normalize, const Tensor& ql,
                        const std::optional<Tensor>& qid, const std::optional<Tensor>& kl,
                        const std::optional<Tensor>& kid, int64_t N, int64_t M, int64_t D) {
  Problem<T> pb;
  const T* zq = normalize ? static_cast<const T*>(z.data_ptr()) : static_cast<const T*>(raw.q.data_ptr());
  pb.q = zq;
  pb.k = raw.in_batch ? zq : (normalize ? zq + N * D : static_cast<const T*>(raw.k.data_ptr()));
  pb.q_labels = static_cast<const int64_t*>(ql.data_ptr());
  pb.k_labels = raw.in_batch ? pb.q_labels : static_cast<const int64_t*>(kl->data_ptr());
  pb.q_ids = ids_ptr(qid);
  pb.k_ids = raw.in_batch ? pb.q_ids : ids_ptr(kid);
  pb.self_pairs = raw.in_batch && !qid.has_value();
  pb.N = N;
  pb.M = M;
  pb.D = D;
  pb.ldq = pb.ldk = D;
  return pb;
}

// RLL_STRICT_FINITE=1 (docs/semantics.md §6): norms copied to the host (a sync), an error naming the
// tensor of the first non-finite row. Off by default: a non-finite row then gives NaN losses.
bool strict_finite() {
  const char* v = std::getenv("RLL_STRICT_FINITE");
  return v != nullptr && std::string(v) == "1";
}

template <class S>
void check_finite_on_host(const S* norms, int64_t n_q, int64_t n_total, cudaStream_t stream) {
  std::vector<S> h(static_cast<size_t>(n_total));
  check_launch(cudaMemcpyAsync(h.data(), norms, sizeof(S) * n_total, cudaMemcpyDeviceToHost, stream),
               "strict finite check copy");
  check_launch(cudaStreamSynchronize(stream), "strict finite check");
  for (int64_t r = 0; r < n_total; ++r)
    STD_TORCH_CHECK(h[r] - h[r] == S(0), r < n_q ? "embeddings" : "ref_emb", " contains NaN or Inf (row ",
                    r < n_q ? r : r - n_q, ")");
}

// Dispatch on the input type; f receives a null pointer of the type (T*) to deduce it from.
template <class F>
void dispatch_type(ScalarType st, F&& f) {
  switch (st) {
    case ScalarType::Float: f(static_cast<float*>(nullptr)); break;
    case ScalarType::Double: f(static_cast<double*>(nullptr)); break;
    case ScalarType::Half: f(static_cast<__half*>(nullptr)); break;
    case ScalarType::BFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: STD_TORCH_CHECK(false, "rll (cuda): unsupported dtype");
  }
}

std::vector<int64_t> shape(std::initializer_list<int64_t> s) { return std::vector<int64_t>(s); }

// normalize: z and norms of the queries and (unless in-batch) the gallery, from the raw strided rows.
template <class T>
void normalize_inputs(const Tensor& q, const std::optional<Tensor>& k, Tensor& z, Tensor& norms, cudaStream_t stream) {
  using S = acc_t<T>;
  const int64_t N = q.size(0), D = q.size(1);
  T* Z = static_cast<T*>(z.data_ptr());
  S* NR = static_cast<S*>(norms.data_ptr());
  check_launch(launch_rll_normalize<T>(static_cast<const T*>(q.data_ptr()), N, D, q.stride(0), q.stride(1), Z, NR,
                                       stream),
               "rll normalize");
  if (!k.has_value()) return;
  check_launch(launch_rll_normalize<T>(static_cast<const T*>(k->data_ptr()), k->size(0), D, k->stride(0),
                                       k->stride(1), Z + N * D, NR + N, stream),
               "rll normalize");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rll_fwd_cuda(
    Tensor q, Tensor q_labels, std::optional<Tensor> q_ids, std::optional<Tensor> k, std::optional<Tensor> k_labels,
    std::optional<Tensor> k_ids, double alpha, double beta, double Tn, double Tp, double imbalance,
    double bias_per_row, std::optional<int64_t> den_rows, bool normalize, bool attached, bool need_grad) {
  check_inputs(q, q_labels, q_ids, k, k_labels, k_ids);
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const bool paper_grad = need_grad && !attached, in_batch = !k.has_value();
  const int64_t N = q.size(0), D = q.size(1), M = in_batch ? N : k->size(0), R = N + (in_batch ? 0 : M);
  const ScalarType st = q.scalar_type(), acc = acc_type(st);
  Tensor loss = torch::stable::new_empty(q, shape({N}), acc);
  Tensor stats = torch::stable::new_empty(q, shape({N, 4}), acc);
  Tensor gq = paper_grad ? torch::stable::new_zeros(q, shape({N, D}), acc) : torch::stable::new_empty(q, shape({0}));
  Tensor z = torch::stable::new_empty(q, shape({normalize ? R : 0, D}));
  Tensor norms = torch::stable::new_empty(q, shape({normalize ? R : 0}), acc);
  if (N > 0) {
    Tensor sq = torch::stable::new_empty(q, shape({N + M}), acc);  // the Gram form's squared norms
    const cudaStream_t stream = current_stream(q);
    const Rows raw = normalize ? Rows{q, q, in_batch} : raw_rows(q, k);
    dispatch_type(st, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using S = acc_t<T>;
      const Params<S> prm = make_params<S>(alpha, beta, Tn, Tp, imbalance, bias_per_row, den_rows, M);
      if (normalize) normalize_inputs<T>(q, k, z, norms, stream);
      const Problem<T> pb = make_problem<T>(z, raw, normalize, q_labels, q_ids, k_labels, k_ids, N, M, D);
      S* g = paper_grad ? static_cast<S*>(gq.data_ptr()) : nullptr;
      check_launch(launch_rll_fwd<T>(pb, prm, static_cast<S*>(loss.data_ptr()), static_cast<S*>(stats.data_ptr()),
                                     g, static_cast<S*>(sq.data_ptr()), stream),
                   "rll_fwd kernel launch");
      if (strict_finite())
        check_finite_on_host(static_cast<const S*>(normalize ? norms.data_ptr() : sq.data_ptr()), N,
                             in_batch ? N : N + M, stream);
      if (paper_grad && normalize)
        check_launch(launch_rll_normalize_backward<T>(g, static_cast<const T*>(z.data_ptr()),
                                                      static_cast<const S*>(norms.data_ptr()), N, D, stream),
                     "rll normalize backward");
    });
  }
  if (paper_grad && acc != st) gq = torch::stable::to(gq, st);
  return {loss, gq, stats, z, norms};
}

std::tuple<Tensor, Tensor> rll_bwd_cuda(Tensor grad_rows, Tensor q, Tensor q_labels, std::optional<Tensor> q_ids,
                                        std::optional<Tensor> k, std::optional<Tensor> k_labels,
                                        std::optional<Tensor> k_ids, Tensor stats, Tensor z, Tensor norms,
                                        double alpha, double beta, double Tn, double Tp, double imbalance,
                                        double bias_per_row, std::optional<int64_t> den_rows, bool normalize,
                                        bool attached, bool need_gq, bool need_gk) {
  check_inputs(q, q_labels, q_ids, k, k_labels, k_ids);
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const bool in_batch = !k.has_value();
  const int64_t N = q.size(0), M = in_batch ? N : k->size(0), D = q.size(1);
  const ScalarType st = q.scalar_type(), acc = acc_type(st);
  STD_TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == N, "rll_bwd: grad_rows must have shape (", N, ",)");
  STD_TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == 4, "rll_bwd: stats must be (", N,
                  ", 4)");
  STD_TORCH_CHECK(grad_rows.is_cuda() && stats.is_cuda(), "rll_bwd (cuda): grad_rows and stats must be on CUDA");
  if (normalize)
    STD_TORCH_CHECK(z.dim() == 2 && z.size(0) == N + (in_batch ? 0 : M) && z.is_contiguous() &&
                        norms.size(0) == z.size(0),
                    "rll_bwd: z and norms must be the forward's");
  need_gk = need_gk && !in_batch;  // in-batch, the whole gradient is grad q
  const auto as_acc = [&](const Tensor& t) {
    return torch::stable::contiguous(t.scalar_type() == acc ? t : torch::stable::to(t, acc));
  };
  const Tensor g = as_acc(grad_rows);
  const Tensor s = as_acc(stats);
  Tensor gq = need_gq ? torch::stable::new_zeros(q, shape({N, D}), acc) : torch::stable::new_empty(q, shape({0}));
  Tensor gk = need_gk ? torch::stable::new_zeros(q, shape({M, D}), acc) : torch::stable::new_empty(q, shape({0}));
  if (N > 0 && (need_gq || need_gk)) {
    Tensor sq = torch::stable::new_empty(q, shape({N + M}), acc);
    const cudaStream_t stream = current_stream(q);
    const Rows raw = normalize ? Rows{q, q, in_batch} : raw_rows(q, k);
    dispatch_type(st, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using S = acc_t<T>;
      const Problem<T> pb = make_problem<T>(z, raw, normalize, q_labels, q_ids, k_labels, k_ids, N, M, D);
      const Params<S> prm = make_params<S>(alpha, beta, Tn, Tp, imbalance, bias_per_row, den_rows, M);
      S* GQ = need_gq ? static_cast<S*>(gq.data_ptr()) : nullptr;
      // in-batch "pml": the gallery ends of every pair accumulate into grad q
      S* GK = need_gk ? static_cast<S*>(gk.data_ptr()) : (in_batch && attached ? GQ : nullptr);
      check_launch(launch_rll_bwd<T>(pb, prm, static_cast<const S*>(g.data_ptr()),
                                     static_cast<const S*>(s.data_ptr()), attached, GQ, GK,
                                     static_cast<S*>(sq.data_ptr()), stream),
                   "rll_bwd kernel launch");
      if (!normalize) return;
      const T* Z = static_cast<const T*>(z.data_ptr());
      const S* NR = static_cast<const S*>(norms.data_ptr());
      if (GQ) check_launch(launch_rll_normalize_backward<T>(GQ, Z, NR, N, D, stream), "rll normalize backward");
      if (need_gk)
        check_launch(launch_rll_normalize_backward<T>(GK, Z + N * D, NR + N, M, D, stream), "rll normalize backward");
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
