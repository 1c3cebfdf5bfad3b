// Argument checks and preparation of ncnnqat::fold_fake_quantize_weight(_backward), shared by the
// CPU and CUDA bindings. Errors name the op, the argument and the value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <utility>

#include "op_args.h"

namespace ncnnqat {

// Per-output-channel vectors of the fold, as contiguous float32 (undefined when absent), and the
// weight's shape as rows x row_len.
struct FoldArgs {
  at::Tensor weight;  // contiguous
  at::Tensor bias, bn_weight, bn_bias, bn_mean, bn_inv_std;
  int64_t rows = 0;
  int64_t row_len = 0;
};

inline at::Tensor fold_vector(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& weight) {
  check_float_dtype(op, arg, t);
  TORCH_CHECK(t.device() == weight.device(), "ncnnqat::", op, ": `", arg, "` is on ", t.device(),
              " but `weight` is on ", weight.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == weight.size(0), "ncnnqat::", op, ": `", arg,
              "` must have shape [", std::to_string(weight.size(0)), "] (one value per output channel), got ",
              std::to_string(t.dim()), " dims of ", std::to_string(t.numel()), " elements");
  // Usually already contiguous float32: then no dispatcher call at all (this is on the hot path).
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

inline at::Tensor fold_optional(const char* op, const char* arg, const std::optional<at::Tensor>& t,
                                const at::Tensor& weight) {
  return t.has_value() && t->defined() ? fold_vector(op, arg, *t, weight) : at::Tensor();
}

inline FoldArgs prepare_fold_args(const char* op, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& bn_weight,
                                  const std::optional<at::Tensor>& bn_bias, const at::Tensor& bn_mean,
                                  const at::Tensor& bn_inv_std) {
  check_float_dtype(op, "weight", weight);
  TORCH_CHECK(weight.dim() >= 1, "ncnnqat::", op, ": `weight` must have at least 1 dimension, got a scalar");
  FoldArgs a;
  a.weight = weight.contiguous();
  a.rows = weight.size(0);
  a.row_len = a.rows > 0 ? weight.numel() / a.rows : 0;
  a.bias = fold_optional(op, "bias", bias, weight);
  a.bn_weight = fold_optional(op, "bn_weight", bn_weight, weight);
  a.bn_bias = fold_optional(op, "bn_bias", bn_bias, weight);
  a.bn_mean = fold_vector(op, "bn_mean", bn_mean, weight);
  a.bn_inv_std = fold_vector(op, "bn_inv_std", bn_inv_std, weight);
  return a;
}

inline void check_fold_groups(const char* op, int64_t num_groups, int64_t rows) {
  TORCH_CHECK(num_groups >= 1, "ncnnqat::", op, ": `num_groups` must be >= 1, got ", std::to_string(num_groups));
  TORCH_CHECK(rows % num_groups == 0, "ncnnqat::", op, ": `num_groups`=", std::to_string(num_groups),
              " must divide weight.shape[0]=", std::to_string(rows));
}

// The incoming gradients of the backward: grad_weight_fq (weight's dtype, shape and device),
// returned contiguous, and grad_bias as a contiguous float32 vector.
inline std::pair<at::Tensor, at::Tensor> prepare_fold_grads(const char* op, const at::Tensor& grad_weight_fq,
                                                            const at::Tensor& grad_bias, const at::Tensor& weight) {
  TORCH_CHECK(grad_weight_fq.scalar_type() == weight.scalar_type(), "ncnnqat::", op,
              ": `grad_weight_fq` must have weight's dtype ", weight.scalar_type(), ", got ",
              grad_weight_fq.scalar_type());
  TORCH_CHECK(grad_weight_fq.sizes() == weight.sizes(), "ncnnqat::", op, ": `grad_weight_fq` has shape ",
              shape_str(grad_weight_fq.sizes()), " but `weight` has shape ", shape_str(weight.sizes()));
  TORCH_CHECK(grad_weight_fq.device() == weight.device(), "ncnnqat::", op, ": `grad_weight_fq` is on ",
              grad_weight_fq.device(), " but `weight` is on ", weight.device());
  return {grad_weight_fq.contiguous(), fold_vector(op, "grad_bias", grad_bias, weight)};
}

// Raw pointer of an optional float32 vector (nullptr when absent).
inline const float* fold_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

}  // namespace ncnnqat
