// The Python module rll_kernels._C. The op schemas are defined once, from Python
// (rll_kernels/ops/_schemas.py), before this library is loaded; each C++ kernel file registers its
// implementations on them with TORCH_LIBRARY_IMPL. Fake kernels and autograd: rll_kernels/ops/.
#include <Python.h>

extern "C" {
// Importing rll_kernels._C runs the static TORCH_LIBRARY_IMPL registrations of the kernel files;
// the module itself is empty, so no libtorch_python symbols are needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
