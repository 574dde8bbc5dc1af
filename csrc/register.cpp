// fastavg._C: the op schemas of namespace fastavg_native (equal to fastavg/ops.py's SCHEMAS; a test
// checks it) and the Python module whose import loads the library, with the parameter check of
// params_check.cpp.
#include <Python.h>
#include <torch/library.h>

#include "params_check.h"

TORCH_LIBRARY(fastavg_native, m) {
  m.def("update_(Tensor[] params, Tensor table, Tensor(a!)[] averages, float[] weights, Tensor(b!)[] rings, int[] slots) -> ()");
  m.def("swap_in_(Tensor(a!)[] params, Tensor table, Tensor(b!) backup, Tensor average) -> ()");
  m.def("swap_in_ring_(Tensor(a!)[] params, Tensor table, Tensor(b!) backup, Tensor ring, int count, ScalarType dtype) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor table, Tensor backup) -> ()");
  m.def("ring_mean_(Tensor(a!) out, Tensor ring, int count) -> ()");
}

extern "C" {
// Importing the module registers the ops (static initialisers above); its functions are the
// parameter check's.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastavg's compiled ops (torch.ops.fastavg_native)",
                                      -1, fastavg::kPythonMethods};
  return PyModule_Create(&module);
}
}
