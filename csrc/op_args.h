// Argument checks of the ncnnqat operators, shared by the CPU kernels and the CUDA bindings (both
// compiled by the host C++ compiler; no CUDA here). Errors name the op, the argument and the value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace ncnnqat {

// Integers and shapes go into error messages as std::to_string strings, never streamed: built
// against torch 2.11+cu130 with GCC 13.3 (an extension whose ldd listed no libstdc++.so, so
// probably a static copy), streaming an int64 into a TORCH_CHECK message segfaulted instead of
// raising, while strings, dtypes and devices were fine.
inline std::string num_str(int64_t v) { return std::to_string(v); }

inline std::string shape_str(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

// `arg` is float32, float16 or bfloat16 (the dtypes every kernel is written for).
inline void check_float_dtype(const char* op, const char* arg, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "ncnnqat::", op, ": `", arg,
              "` must be float32, float16 or bfloat16, got ", dt);
}

inline void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "ncnnqat::", op, ": `bits` must be in [2, 8], got ", num_str(bits));
}

// fake_quantize_per_channel's `num_groups`: >= 1 and a divisor of the weight's element count.
inline void check_per_channel_groups(const char* op, int64_t num_groups, int64_t numel) {
  TORCH_CHECK(num_groups >= 1, "ncnnqat::", op, ": `num_groups` must be >= 1, got ", num_str(num_groups));
  TORCH_CHECK(numel % num_groups == 0, "ncnnqat::", op, ": `num_groups`=", num_str(num_groups),
              " must divide weight.numel()=", num_str(numel));
}

// The dynamic quantizers' `dims`: how many trailing dims make one group, in [1, x.dim()].
inline void check_dynamic_dims(const char* op, int64_t dims, int64_t x_dim) {
  TORCH_CHECK(dims >= 1 && dims <= x_dim, "ncnnqat::", op, ": `dims` must be in [1, x.dim()=", num_str(x_dim),
              "], got ", num_str(dims));
}

// `running_absmax`: one float32 element (the range, < 0 while uninitialised), on x's device.
inline void check_running(const char* op, const at::Tensor& running, const at::Tensor& x) {
  TORCH_CHECK(running.scalar_type() == at::kFloat && running.numel() == 1, "ncnnqat::", op,
              ": `running_absmax` must be a 1-element float32 tensor, got ", running.scalar_type(),
              " of shape ", shape_str(running.sizes()));
  TORCH_CHECK(running.device() == x.device(), "ncnnqat::", op, ": `running_absmax` is on ",
              running.device(), " but `x` is on ", x.device());
}

// The arguments of fake_quantize_per_tensor's backward ops (the plain STE and the learned
// threshold's): grad and x of a float dtype each (they may differ), valid bits and running_absmax,
// grad on x's device and of x's shape. Checked in this order, so the first problem is reported.
inline void check_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                const at::Tensor& running_absmax, int64_t bits) {
  check_float_dtype(op, "grad", grad);
  check_float_dtype(op, "x", x);
  check_bits(op, bits);
  check_running(op, running_absmax, x);
  TORCH_CHECK(grad.device() == x.device(), "ncnnqat::", op, ": `grad` is on ", grad.device(), " but `x` is on ",
              x.device());
  TORCH_CHECK(grad.sizes() == x.sizes(), "ncnnqat::", op, ": `grad` has shape ", shape_str(grad.sizes()),
              " but `x` has shape ", shape_str(x.sizes()));
}

}  // namespace ncnnqat
