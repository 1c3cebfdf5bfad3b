// The CPU implementations of the ncnnqat operators (schemas: lightning_ncnnqat/ops/_registry.py),
// defined in fake_quant_cpu_forward.cpp and fake_quant_cpu_backward.cpp and registered for the
// CPU dispatch key in fake_quant_cpu_register.cpp. Shapes, dtypes and errors: the schemas' docs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace ncnnqat {

// Forward (fake_quant_cpu_forward.cpp).
std::tuple<at::Tensor, at::Tensor> fake_quantize_per_channel_cpu(const at::Tensor& weight, int64_t num_groups,
                                                                 int64_t bits);
void update_absmax_cpu(const at::Tensor& x, const at::Tensor& running_absmax, double momentum);
at::Tensor fake_quantize_per_tensor_cpu(const at::Tensor& x, const at::Tensor& running_absmax, int64_t bits);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fold_fake_quantize_weight_cpu(
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& bn_mean, const at::Tensor& bn_inv_std,
    int64_t num_groups, int64_t bits);

// Backward (fake_quant_cpu_backward.cpp).
at::Tensor fake_quantize_per_tensor_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                 const at::Tensor& running_absmax, int64_t bits);
std::tuple<at::Tensor, at::Tensor> fake_quantize_per_tensor_threshold_backward_cpu(const at::Tensor& grad,
                                                                                   const at::Tensor& x,
                                                                                   const at::Tensor& running_absmax,
                                                                                   int64_t bits);
std::tuple<at::Tensor, at::Tensor> fold_fake_quantize_weight_backward_cpu(
    const at::Tensor& grad_weight_fq, const at::Tensor& grad_bias, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight, const at::Tensor& bn_mean,
    const at::Tensor& bn_inv_std);

// ncnn's dynamic int8 quantization, groups of the last `dims` dims (fake_quant_cpu_dynamic.cpp):
// (int8 levels, absmax, scale) and (float32 fake-quantized values, scale).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_quantize_cpu(const at::Tensor& x, int64_t dims);
std::tuple<at::Tensor, at::Tensor> dynamic_fake_quantize_cpu(const at::Tensor& x, int64_t dims);

}  // namespace ncnnqat
