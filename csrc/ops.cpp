// The Python module rll_kernels._C. The op schemas are defined once, from Python
// (rll_kernels/ops/_schemas.py), before this library is loaded; cpu_dispatch.cpp registers the CPU
// kernels of the build it picks for this CPU (and the CUDA glue its own) with TORCH_LIBRARY_IMPL.
// Fake kernels and autograd: rll_kernels/ops/.
#include <Python.h>

namespace rll {
const char* cpu_capability_name();
const char* cpu_capability_why();
const char* cpu_capability_error();
}  // namespace rll

namespace {
// _C.cpu_capability() -> (name, why): the build of the CPU kernels this process runs, e.g.
// ("avx512", "chosen from the CPU (ATen's CPU capability: avx512)").
PyObject* cpu_capability(PyObject*, PyObject*) {
  return Py_BuildValue("(ss)", rll::cpu_capability_name(), rll::cpu_capability_why());
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "(name, why) of the CPU kernel build in use"},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// Loading the library runs the static registrations; a bad RLL_KERNELS_CPU_CAPABILITY (no CPU kernels
// registered) makes the import raise a ValueError naming it. Only the Python C API is used, so no
// libtorch_python symbols are needed.
PyObject* PyInit__C(void) {
  const char* error = rll::cpu_capability_error();
  if (error[0] != '\0') {
    PyErr_SetString(PyExc_ValueError, error);
    return nullptr;
  }
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
