// Autograd of the ncnnqat operators in C++ (schemas: lightning_ncnnqat/ops/_registry.py).
//
// Device-independent: each function calls the operator below autograd, which dispatches to the
// CPU or CUDA kernel (or the pure-PyTorch reference where no kernel is compiled), and its
// backward calls the backward operator the same way. This replaces the Python autograd of
// _registry.py (used only when this library is not loaded), whose per-call Python overhead
// dominated a QAT training step on a GPU: the host could not keep the GPU busy.
//
// Straight-through estimators, as documented in lightning_ncnnqat/ops/__init__.py: a weight's
// gradient passes unchanged (through the BN fold's scale when folded), an activation's passes
// where it was not clipped. Scales are statistics and never differentiable, except a per-tensor
// threshold passed as a tensor that requires grad (a learned range, TQT/LSQ): then the backward
// calls fake_quantize_per_tensor_threshold_backward, which also returns d loss / d threshold.
// A running_absmax buffer (no grad) takes the plain STE backward, at no extra cost.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace ncnnqat {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using PerChannelSig = std::tuple<Tensor, Tensor>(const Tensor&, int64_t, int64_t);
using PerTensorSig = Tensor(const Tensor&, const Tensor&, int64_t);
using PerTensorBwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t);
using PerTensorThresholdBwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t);
using ThresholdFromLogSig = Tensor(const Tensor&);
using FoldSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&,
                                                   const std::optional<Tensor>&, const std::optional<Tensor>&,
                                                   const Tensor&, const Tensor&, int64_t, int64_t);
using FoldBwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                              const std::optional<Tensor>&, const std::optional<Tensor>&,
                                              const Tensor&, const Tensor&);

const c10::TypedOperatorHandle<PerChannelSig>& per_channel_op() {
  static const auto op = find_op<PerChannelSig>("ncnnqat::fake_quantize_per_channel");
  return op;
}
const c10::TypedOperatorHandle<PerTensorSig>& per_tensor_op() {
  static const auto op = find_op<PerTensorSig>("ncnnqat::fake_quantize_per_tensor");
  return op;
}
const c10::TypedOperatorHandle<PerTensorBwdSig>& per_tensor_bwd_op() {
  static const auto op = find_op<PerTensorBwdSig>("ncnnqat::fake_quantize_per_tensor_backward");
  return op;
}
const c10::TypedOperatorHandle<PerTensorThresholdBwdSig>& per_tensor_threshold_bwd_op() {
  static const auto op =
      find_op<PerTensorThresholdBwdSig>("ncnnqat::fake_quantize_per_tensor_threshold_backward");
  return op;
}
const c10::TypedOperatorHandle<ThresholdFromLogSig>& threshold_from_log_op() {
  static const auto op = find_op<ThresholdFromLogSig>("ncnnqat::threshold_from_log");
  return op;
}
const c10::TypedOperatorHandle<FoldSig>& fold_op() {
  static const auto op = find_op<FoldSig>("ncnnqat::fold_fake_quantize_weight");
  return op;
}
const c10::TypedOperatorHandle<FoldBwdSig>& fold_bwd_op() {
  static const auto op = find_op<FoldBwdSig>("ncnnqat::fold_fake_quantize_weight_backward");
  return op;
}

Tensor or_undefined(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }
std::optional<Tensor> as_optional(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

struct PerChannel : public torch::autograd::Function<PerChannel> {
  static variable_list forward(AutogradContext* ctx, const Tensor& weight, int64_t num_groups, int64_t bits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, scales] = per_channel_op().call(weight, num_groups, bits);
    ctx->mark_non_differentiable({scales});
    return {out, scales};
  }
  static variable_list backward(AutogradContext* /*ctx*/, variable_list grads) {
    return {grads[0], Tensor(), Tensor()};
  }
};

struct PerTensor : public torch::autograd::Function<PerTensor> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& running_absmax, int64_t bits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, running_absmax});
    ctx->saved_data["bits"] = bits;
    return per_tensor_op().call(x, running_absmax, bits);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const int64_t bits = ctx->saved_data["bits"].toInt();
    if (ctx->needs_input_grad(1)) {  // a learned threshold: both gradients in one pass
      auto [grad_x, grad_t] = per_tensor_threshold_bwd_op().call(grads[0], saved[0], saved[1], bits);
      return {ctx->needs_input_grad(0) ? grad_x : Tensor(), grad_t, Tensor()};
    }
    return {per_tensor_bwd_op().call(grads[0], saved[0], saved[1], bits), Tensor(), Tensor()};
  }
};

// threshold = exp(log_threshold), an opaque op so that torch.compile cannot lower the exp to its
// own code (inductor's exp differs from ATen's in the last bit for about 1% of inputs): the
// learned threshold the forward uses is then always bit-identical to the eager
// running_absmax = exp(log_threshold) that the table carries. d/dx exp(x) = exp(x).
struct ThresholdFromLog : public torch::autograd::Function<ThresholdFromLog> {
  static Tensor forward(AutogradContext* ctx, const Tensor& log_threshold) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = threshold_from_log_op().call(log_threshold);
    ctx->save_for_backward({out});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {at::mul(grads[0], ctx->get_saved_variables()[0])};
  }
};

struct Fold : public torch::autograd::Function<Fold> {
  static variable_list forward(AutogradContext* ctx, const Tensor& weight, const std::optional<Tensor>& bias,
                               const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
                               const Tensor& bn_mean, const Tensor& bn_inv_std, int64_t num_groups, int64_t bits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [wq, b, scales] = fold_op().call(weight, bias, bn_weight, bn_bias, bn_mean, bn_inv_std, num_groups, bits);
    ctx->save_for_backward({weight, or_undefined(bias), or_undefined(bn_weight), bn_mean, bn_inv_std});
    const bool has_bn_bias = bn_bias.has_value() && bn_bias->defined();
    ctx->saved_data["bn_bias_dtype"] = has_bn_bias ? static_cast<int64_t>(bn_bias->scalar_type()) : int64_t{-1};
    ctx->mark_non_differentiable({scales});
    return {wq, b, scales};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor& weight = s[0];
    const Tensor& bias = s[1];
    const Tensor& bn_weight = s[2];
    // Grads of unused outputs arrive undefined (or as zeros).
    const Tensor grad_wq = grads[0].defined() ? grads[0] : at::zeros_like(weight);
    const Tensor grad_b = grads[1].defined() ? grads[1] : at::zeros({weight.size(0)}, weight.options());
    auto [grad_weight, vecs] =
        fold_bwd_op().call(grad_wq, grad_b, weight, as_optional(bias), as_optional(bn_weight), s[3], s[4]);
    const int64_t bn_bias_dtype = ctx->saved_data["bn_bias_dtype"].toInt();
    // vecs rows: grad of bias, of bn_weight, of bn_bias (float32); each returned in its input's dtype.
    auto row = [&](int64_t i, at::ScalarType dtype) {
      Tensor r = vecs.select(0, i);
      return r.scalar_type() == dtype ? r : r.to(dtype);
    };
    return {grad_weight,
            bias.defined() ? row(0, bias.scalar_type()) : Tensor(),
            bn_weight.defined() ? row(1, bn_weight.scalar_type()) : Tensor(),
            bn_bias_dtype >= 0 ? row(2, static_cast<at::ScalarType>(bn_bias_dtype)) : Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor> per_channel_autograd(const Tensor& weight, int64_t num_groups, int64_t bits) {
  const variable_list out = PerChannel::apply(weight, num_groups, bits);
  return {out[0], out[1]};
}

Tensor per_tensor_autograd(const Tensor& x, const Tensor& running_absmax, int64_t bits) {
  return PerTensor::apply(x, running_absmax, bits);
}

Tensor threshold_from_log_autograd(const Tensor& log_threshold) { return ThresholdFromLog::apply(log_threshold); }

// The kernel below autograd, for every device: ATen's exp, as on the buffer in eager mode.
Tensor threshold_from_log_kernel(const Tensor& log_threshold) { return at::exp(log_threshold); }

std::tuple<Tensor, Tensor, Tensor> fold_autograd(const Tensor& weight, const std::optional<Tensor>& bias,
                                                 const std::optional<Tensor>& bn_weight,
                                                 const std::optional<Tensor>& bn_bias, const Tensor& bn_mean,
                                                 const Tensor& bn_inv_std, int64_t num_groups, int64_t bits) {
  const variable_list out = Fold::apply(weight, bias, bn_weight, bn_bias, bn_mean, bn_inv_std, num_groups, bits);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(ncnnqat, Autograd, m) {
  m.impl("fake_quantize_per_channel", &per_channel_autograd);
  m.impl("fake_quantize_per_tensor", &per_tensor_autograd);
  m.impl("fold_fake_quantize_weight", &fold_autograd);
  m.impl("threshold_from_log", &threshold_from_log_autograd);
}

TORCH_LIBRARY_IMPL(ncnnqat, CompositeExplicitAutograd, m) {
  m.impl("threshold_from_log", &threshold_from_log_kernel);
}

}  // namespace ncnnqat
