// CUDA bindings of the ncnnqat operators (schemas: lightning_ncnnqat/ops/_registry.py): checks
// arguments, allocates outputs and scratch through torch (caching allocator, current stream),
// and calls the launchers of fake_quant_kernels.cu. Nothing here synchronises with the host.
// Only c10/cuda headers are used (at::cuda::getCurrentCUDAStream is c10::cuda's), so building
// needs no cuBLAS/cuSPARSE headers.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

#include "../fold_args.h"
#include "../op_args.h"
#include "fake_quant_kernels.h"

// Python module stub: `import lightning_ncnnqat._C_cuda` loads this library, whose static
// initialisers register the kernels below with the dispatcher.
extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace ncnnqat {
namespace {

using at::Tensor;

cuda::DType to_dtype(const char* op, const char* arg, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "ncnnqat::", op, ": `", arg, "` must be float32, float16 or bfloat16, got ", t.scalar_type());
  return cuda::DType::kFloat32;  // unreachable
}

void check_cuda(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "ncnnqat::", op, ": `", arg, "` must be a CUDA tensor, got one on ", t.device());
}

// Multiprocessor count of the current device (sizes the grids), cached per device.
int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  const int dev = c10::cuda::current_device();
  if (dev >= 0 && dev < kMaxDevices) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(count, std::memory_order_relaxed);
  return count;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<Tensor, Tensor> fake_quantize_per_channel_cuda(const Tensor& weight, int64_t num_groups, int64_t bits) {
  constexpr const char* op = "fake_quantize_per_channel";
  check_cuda(op, "weight", weight);
  const cuda::DType dtype = to_dtype(op, "weight", weight);
  check_bits(op, bits);
  check_per_channel_groups(op, num_groups, weight.numel());
  const c10::cuda::CUDAGuard guard(weight.device());
  const Tensor w = weight.contiguous();
  Tensor out = at::empty(w.sizes(), w.options());
  Tensor scales = at::empty({num_groups}, w.options().dtype(at::kFloat));
  const int64_t gs = w.numel() / num_groups;
  if (gs == 0) {
    scales.fill_(1.0f);  // an empty group's absmax is 0
    return {out, scales};
  }
  const int sms = sm_count();
  const int64_t scratch_size = cuda::per_channel_scratch_size(num_groups, gs, dtype, sms);
  Tensor scratch = at::empty({scratch_size > 0 ? scratch_size : 1}, w.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_fake_quantize_per_channel(w.data_ptr(), out.data_ptr(), scales.data_ptr<float>(), dtype,
                                                        num_groups, gs, static_cast<int>(bits),
                                                        scratch.data_ptr<float>(), sms,
                                                        current_stream()));
  return {out, scales};
}

void update_absmax_cuda(const Tensor& x, const Tensor& running_absmax, double momentum) {
  constexpr const char* op = "update_absmax_";
  check_cuda(op, "x", x);
  const cuda::DType dtype = to_dtype(op, "x", x);
  check_running(op, running_absmax, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous();
  const int sms = sm_count();
  Tensor scratch = at::empty({cuda::update_absmax_scratch_size(xc.numel(), sms)}, xc.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_update_absmax(xc.data_ptr(), dtype, xc.numel(), running_absmax.data_ptr<float>(),
                                            static_cast<float>(momentum), scratch.data_ptr<float>(), sms,
                                            current_stream()));
}

Tensor fake_quantize_per_tensor_cuda(const Tensor& x, const Tensor& running_absmax, int64_t bits) {
  constexpr const char* op = "fake_quantize_per_tensor";
  check_cuda(op, "x", x);
  const cuda::DType dtype = to_dtype(op, "x", x);
  check_bits(op, bits);
  check_running(op, running_absmax, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous();
  Tensor out = at::empty(xc.sizes(), xc.options());
  C10_CUDA_CHECK(cuda::launch_fake_quantize_per_tensor(xc.data_ptr(), out.data_ptr(), dtype, xc.numel(),
                                                       running_absmax.data_ptr<float>(), static_cast<int>(bits),
                                                       sm_count(), current_stream()));
  return out;
}

Tensor fake_quantize_per_tensor_backward_cuda(const Tensor& grad, const Tensor& x, const Tensor& running_absmax,
                                              int64_t bits) {
  constexpr const char* op = "fake_quantize_per_tensor_backward";
  check_cuda(op, "grad", grad);
  check_cuda(op, "x", x);
  check_backward_args(op, grad, x, running_absmax, bits);
  const cuda::DType grad_dtype = to_dtype(op, "grad", grad);
  const cuda::DType x_dtype = to_dtype(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor g = grad.contiguous();
  const Tensor xc = x.contiguous();
  Tensor out = at::empty(g.sizes(), g.options());
  C10_CUDA_CHECK(cuda::launch_fake_quantize_per_tensor_backward(
      g.data_ptr(), grad_dtype, xc.data_ptr(), x_dtype, out.data_ptr(), g.numel(), running_absmax.data_ptr<float>(),
      static_cast<int>(bits), sm_count(), current_stream()));
  return out;
}

// Learned threshold backward (see ../fake_quant_cpu_backward.cpp and reference.py): (grad_x, grad_threshold).
std::tuple<Tensor, Tensor> fake_quantize_per_tensor_threshold_backward_cuda(const Tensor& grad, const Tensor& x,
                                                                            const Tensor& running_absmax,
                                                                            int64_t bits) {
  constexpr const char* op = "fake_quantize_per_tensor_threshold_backward";
  check_cuda(op, "grad", grad);
  check_cuda(op, "x", x);
  check_backward_args(op, grad, x, running_absmax, bits);
  const cuda::DType grad_dtype = to_dtype(op, "grad", grad);
  const cuda::DType x_dtype = to_dtype(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor g = grad.contiguous();
  const Tensor xc = x.contiguous();
  Tensor out = at::empty(g.sizes(), g.options());
  Tensor grad_t = at::empty(running_absmax.sizes(), running_absmax.options());
  const int sms = sm_count();
  Tensor scratch =
      at::empty({cuda::threshold_backward_scratch_size(g.numel(), sms)}, running_absmax.options());
  C10_CUDA_CHECK(cuda::launch_fake_quantize_per_tensor_threshold_backward(
      g.data_ptr(), grad_dtype, xc.data_ptr(), x_dtype, out.data_ptr(), grad_t.data_ptr<float>(), g.numel(),
      running_absmax.data_ptr<float>(), static_cast<int>(bits), scratch.data_ptr<float>(), sms, current_stream()));
  return {out, grad_t};
}

cuda::FoldVectors fold_vectors(const FoldArgs& a) {
  return {fold_ptr(a.bias), fold_ptr(a.bn_weight), fold_ptr(a.bn_bias), fold_ptr(a.bn_mean), fold_ptr(a.bn_inv_std)};
}

std::tuple<Tensor, Tensor, Tensor> fold_fake_quantize_weight_cuda(const Tensor& weight, const std::optional<Tensor>& bias,
                                                                  const std::optional<Tensor>& bn_weight,
                                                                  const std::optional<Tensor>& bn_bias,
                                                                  const Tensor& bn_mean, const Tensor& bn_inv_std,
                                                                  int64_t num_groups, int64_t bits) {
  constexpr const char* op = "fold_fake_quantize_weight";
  check_cuda(op, "weight", weight);
  check_bits(op, bits);
  const c10::cuda::CUDAGuard guard(weight.device());
  const FoldArgs a = prepare_fold_args(op, weight, bias, bn_weight, bn_bias, bn_mean, bn_inv_std);
  check_fold_groups(op, num_groups, a.rows);
  const cuda::DType dtype = to_dtype(op, "weight", a.weight);
  Tensor out = at::empty(a.weight.sizes(), a.weight.options());
  Tensor bias_out = at::empty({a.rows}, a.weight.options());
  Tensor scales = at::empty({num_groups}, a.weight.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_fold_fake_quantize_weight(a.weight.data_ptr(), out.data_ptr(), bias_out.data_ptr(),
                                                        scales.data_ptr<float>(), dtype, a.rows, a.row_len, num_groups,
                                                        fold_vectors(a), static_cast<int>(bits), sm_count(),
                                                        current_stream()));
  return {out, bias_out, scales};
}

std::tuple<Tensor, Tensor> fold_fake_quantize_weight_backward_cuda(
    const Tensor& grad_weight_fq, const Tensor& grad_bias, const Tensor& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& bn_weight, const Tensor& bn_mean, const Tensor& bn_inv_std) {
  constexpr const char* op = "fold_fake_quantize_weight_backward";
  check_cuda(op, "weight", weight);
  check_cuda(op, "grad_weight_fq", grad_weight_fq);
  const c10::cuda::CUDAGuard guard(weight.device());
  const FoldArgs a = prepare_fold_args(op, weight, bias, bn_weight, std::nullopt, bn_mean, bn_inv_std);
  const std::pair<Tensor, Tensor> grads = prepare_fold_grads(op, grad_weight_fq, grad_bias, weight);
  const Tensor& g = grads.first;
  const Tensor& gb = grads.second;
  const cuda::DType dtype = to_dtype(op, "weight", a.weight);
  Tensor grad_w = at::empty(a.weight.sizes(), a.weight.options());
  Tensor vecs = at::empty({3, a.rows}, a.weight.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_fold_fake_quantize_weight_backward(g.data_ptr(), a.weight.data_ptr(), grad_w.data_ptr(),
                                                                 gb.data_ptr<float>(), vecs.data_ptr<float>(), dtype,
                                                                 a.rows, a.row_len, fold_vectors(a),
                                                                 current_stream()));
  return {grad_w, vecs};
}

// ncnn's dynamic int8 quantization (dynamic_quant_kernels.cu): (levels or fake-quantized values,
// absmax, scale) over groups of the last `dims` dims.
std::tuple<Tensor, Tensor, Tensor> dynamic_run_cuda(const char* op, const Tensor& x, int64_t dims, bool levels) {
  check_cuda(op, "x", x);
  const cuda::DType dtype = to_dtype(op, "x", x);
  check_dynamic_dims(op, dims, x.dim());
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous();
  const int64_t keep = xc.dim() - dims;
  const std::vector<int64_t> lead(xc.sizes().begin(), xc.sizes().begin() + keep);
  int64_t groups = 1;
  for (int64_t d : lead) groups *= d;
  const int64_t n = groups > 0 ? xc.numel() / groups : 0;
  Tensor out = at::empty(xc.sizes(), xc.options().dtype(levels ? at::kChar : at::kFloat));
  Tensor absmax = at::empty(lead, xc.options().dtype(at::kFloat));
  Tensor scale = at::empty(lead, xc.options().dtype(at::kFloat));
  if (groups > 0) {
    C10_CUDA_CHECK(cuda::launch_dynamic_quantize(xc.data_ptr(), dtype, out.data_ptr(), levels,
                                                 absmax.data_ptr<float>(), scale.data_ptr<float>(), groups, n,
                                                 sm_count(), current_stream()));
  }
  return {out, absmax, scale};
}

std::tuple<Tensor, Tensor, Tensor> dynamic_quantize_cuda(const Tensor& x, int64_t dims) {
  return dynamic_run_cuda("dynamic_quantize", x, dims, true);
}

std::tuple<Tensor, Tensor> dynamic_fake_quantize_cuda(const Tensor& x, int64_t dims) {
  auto [out, absmax, scale] = dynamic_run_cuda("dynamic_fake_quantize", x, dims, false);
  return {out, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(ncnnqat, CUDA, m) {
  m.impl("fake_quantize_per_channel", &fake_quantize_per_channel_cuda);
  m.impl("update_absmax_", &update_absmax_cuda);
  m.impl("fake_quantize_per_tensor", &fake_quantize_per_tensor_cuda);
  m.impl("fake_quantize_per_tensor_backward", &fake_quantize_per_tensor_backward_cuda);
  m.impl("fake_quantize_per_tensor_threshold_backward", &fake_quantize_per_tensor_threshold_backward_cuda);
  m.impl("fold_fake_quantize_weight", &fold_fake_quantize_weight_cuda);
  m.impl("fold_fake_quantize_weight_backward", &fold_fake_quantize_weight_backward_cuda);
  m.impl("dynamic_quantize", &dynamic_quantize_cuda);
  m.impl("dynamic_fake_quantize", &dynamic_fake_quantize_cuda);
}

}  // namespace ncnnqat
