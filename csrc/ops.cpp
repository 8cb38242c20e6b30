// Operator schemas of rll_kernels (defined once; each backend registers its implementation with
// TORCH_LIBRARY_IMPL in its own file). Fake kernels and autograd live in rll_kernels/_ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing rll_kernels._C runs the static registrations below; the module itself is empty, so
// no libtorch_python symbols are needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rll_kernels, m) {
  // Ranked List Loss forward. Returns (per-row losses (N,), the query gradient of each row's loss
  // (N, D) when need_grad and not attached, else (0,), row statistics (N, 4) =
  // [log den_P, L_P, log den_N, L_N]). Pairs with q_ids[i] == k_ids[j] are excluded.
  // attached=false: softmax weights are constants and the gallery is fixed ("paper");
  // attached=true: both are differentiated, through rll_bwd ("pml").
  m.def(
      "rll_fwd(Tensor q, Tensor q_labels, Tensor? q_ids, Tensor k, Tensor k_labels, Tensor? k_ids, "
      "float alpha, float beta, float Tn, float Tp, float imbalance, float den_bias, bool attached, bool need_grad) "
      "-> (Tensor, Tensor, Tensor)");
  // Ranked List Loss backward from the saved row statistics: (grad q (N, D) or (0,), grad k (M, D) or
  // (0,)). attached=true differentiates the softmax weights too (PML semantics).
  m.def(
      "rll_bwd(Tensor grad_rows, Tensor q, Tensor q_labels, Tensor? q_ids, Tensor k, Tensor k_labels, "
      "Tensor? k_ids, Tensor stats, float alpha, float beta, float Tn, float Tp, float imbalance, "
      "float den_bias, bool attached, bool need_gq, bool need_gk) -> (Tensor, Tensor)");
}
