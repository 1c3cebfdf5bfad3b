// The Python module of the CPU library (lightning_ncnnqat._C) and the registration of its kernels
// (fake_quant_cpu_forward.cpp, fake_quant_cpu_backward.cpp, fake_quant_cpu_dynamic.cpp) for the
// CPU dispatch key.
// The schemas are defined in Python (lightning_ncnnqat/ops/_registry.py); the library's autograd
// and composite kernels are registered in autograd.cpp.
#include <Python.h>

#include <torch/library.h>

#include "fake_quant_cpu_ops.h"

// Python module stub: `import lightning_ncnnqat._C` loads this library, whose static
// initialisers register the kernels below (and those of autograd.cpp) with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace ncnnqat {

// The one CPU registration block of this library.
TORCH_LIBRARY_IMPL(ncnnqat, CPU, m) {
  m.impl("fake_quantize_per_channel", &fake_quantize_per_channel_cpu);
  m.impl("update_absmax_", &update_absmax_cpu);
  m.impl("fake_quantize_per_tensor", &fake_quantize_per_tensor_cpu);
  m.impl("fake_quantize_per_tensor_backward", &fake_quantize_per_tensor_backward_cpu);
  m.impl("fake_quantize_per_tensor_threshold_backward", &fake_quantize_per_tensor_threshold_backward_cpu);
  m.impl("fold_fake_quantize_weight", &fold_fake_quantize_weight_cpu);
  m.impl("fold_fake_quantize_weight_backward", &fold_fake_quantize_weight_backward_cpu);
  m.impl("dynamic_quantize", &dynamic_quantize_cpu);
  m.impl("dynamic_fake_quantize", &dynamic_fake_quantize_cpu);
}

}  // namespace ncnnqat
