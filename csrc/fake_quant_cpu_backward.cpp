// CPU kernels of the ncnnqat backward operators: fake_quantize_per_tensor's clipped STE, its
// learned-threshold backward (TQT / LSQ), and the BN-fold weight backward.
// Bit-exact with lightning_ncnnqat/ops/reference.py, sums up to summation order (how:
// fake_quant_cpu_loops.h); declared in fake_quant_cpu_ops.h, registered in fake_quant_cpu_register.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "fake_quant_cpu_loops.h"
#include "fake_quant_cpu_ops.h"
#include "fake_quant_math.h"
#include "fold_args.h"
#include "op_args.h"

namespace ncnnqat {

using at::Tensor;

namespace {

// ---------------------------------------------------------------------------------------------
// Inner loops, always inlined into the multiversioned (per target) entry points below.

template <typename G, typename X>
NCNNQAT_ALWAYS_INLINE void ste_loop(const G* __restrict grad, const X* __restrict x, G* __restrict out,
                                    int64_t n, float scale, float qmax) {
  const G zero = static_cast<G>(0.0f);
  for (int64_t i = 0; i < n; ++i) out[i] = ste_keep(load_f(x, i), scale, qmax) ? grad[i] : zero;
}

// grad_w = g * s, and returns sum(g * w): kLanes interleaved float32 partial sums added in a fixed
// tree at the end, so the loop vectorises and the result does not depend on the instruction set.
template <typename T>
NCNNQAT_ALWAYS_INLINE float fold_backward_loop(const T* __restrict g, const T* __restrict w, T* __restrict grad_w,
                                               int64_t n, float s) {
  float acc[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float gj = load_f(g, i + j);
      acc[j] = fadd(acc[j], fmul(gj, load_f(w, i + j)));
      grad_w[i + j] = static_cast<T>(fmul(gj, s));
    }
  }
  for (int64_t i = body; i < n; ++i) {
    const float gi = load_f(g, i);
    acc[i - body] = fadd(acc[i - body], fmul(gi, load_f(w, i)));
    grad_w[i] = static_cast<T>(fmul(gi, s));
  }
  return lane_tree_sum(acc);
}

// Learned-threshold backward of one block: out = clipped STE of grad (as ste_loop), and returns
// sum(grad * threshold_grad_term) over the block, in kLanes interleaved float32 partial sums
// added in a fixed tree (deterministic; independent of the instruction set).
template <typename G, typename X>
NCNNQAT_ALWAYS_INLINE float ste_threshold_loop(const G* __restrict grad, const X* __restrict x, G* __restrict out,
                                               int64_t n, float scale, float qmax) {
  const G zero = static_cast<G>(0.0f);
  float acc[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float xv = load_f(x, i + j);
      const G gv = grad[i + j];
      out[i + j] = ste_keep(xv, scale, qmax) ? gv : zero;
      acc[j] = fadd(acc[j], fmul(static_cast<float>(gv), threshold_grad_term(xv, scale, qmax)));
    }
  }
  for (int64_t i = body; i < n; ++i) {
    const float xv = load_f(x, i);
    const G gv = grad[i];
    out[i] = ste_keep(xv, scale, qmax) ? gv : zero;
    acc[i - body] = fadd(acc[i - body], fmul(static_cast<float>(gv), threshold_grad_term(xv, scale, qmax)));
  }
  return lane_tree_sum(acc);
}

// Multiversioned entry points, one overload per dtype (target_clones needs real functions).
#define NCNNQAT_DEFINE_BACKWARD_LOOPS(T)                                                                    \
  NCNNQAT_MULTIVERSION void ste_kernel(const T* grad, const T* x, T* out, int64_t n, float scale,           \
                                       float qmax) {                                                        \
    ste_loop(grad, x, out, n, scale, qmax);                                                                 \
  }                                                                                                         \
  NCNNQAT_MULTIVERSION float ste_threshold_kernel(const T* grad, const T* x, T* out, int64_t n, float scale, \
                                                  float qmax) {                                             \
    return ste_threshold_loop(grad, x, out, n, scale, qmax);                                                \
  }                                                                                                         \
  NCNNQAT_MULTIVERSION float fold_backward_kernel(const T* g, const T* w, T* grad_w, int64_t n, float s) {  \
    return fold_backward_loop(g, w, grad_w, n, s);                                                          \
  }

NCNNQAT_DEFINE_BACKWARD_LOOPS(float)
NCNNQAT_DEFINE_BACKWARD_LOOPS(c10::Half)
NCNNQAT_DEFINE_BACKWARD_LOOPS(c10::BFloat16)
#undef NCNNQAT_DEFINE_BACKWARD_LOOPS

// A gradient whose dtype differs from x's (not produced by autograd, but allowed by the schema).
template <typename G, typename X>
void ste_kernel(const G* grad, const X* x, G* out, int64_t n, float scale, float qmax) {
  ste_loop(grad, x, out, n, scale, qmax);
}

template <typename G, typename X>
float ste_threshold_kernel(const G* grad, const X* x, G* out, int64_t n, float scale, float qmax) {
  return ste_threshold_loop(grad, x, out, n, scale, qmax);
}

// ---------------------------------------------------------------------------------------------
// BN fold backward. Weights are small, so this is a plain loop, parallel over rows.

template <typename T>
std::tuple<Tensor, Tensor> fold_backward_impl(const Tensor& g, const Tensor& gb, const FoldArgs& a) {
  const Tensor& w = a.weight;
  Tensor grad_w = at::empty(w.sizes(), w.options());
  Tensor vecs = at::empty({3, a.rows}, w.options().dtype(at::kFloat));
  const float* gamma = fold_ptr(a.bn_weight);
  const float* bias = fold_ptr(a.bias);
  const float* mean = a.bn_mean.data_ptr<float>();
  const float* inv_std = a.bn_inv_std.data_ptr<float>();
  const float* gbp = gb.data_ptr<float>();
  const T* gp = g.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op_ = grad_w.data_ptr<T>();
  float* v = vecs.data_ptr<float>();
  const int64_t len = a.row_len;
  const int64_t rows = a.rows;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, len)), [&](int64_t rb, int64_t re) {
    for (int64_t c = rb; c < re; ++c) {
      const float s = fold_scale(gamma, inv_std, c);
      const float dot = fold_backward_kernel(gp + c * len, wp + c * len, op_ + c * len, len, s);
      fold_vector_grads(dot, gbp[c], bias, mean, inv_std, c, s, v, rows);
    }
  });
  return {grad_w, vecs};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Operators.

Tensor fake_quantize_per_tensor_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& running_absmax,
                                             int64_t bits) {
  check_backward_args("fake_quantize_per_tensor_backward", grad, x, running_absmax, bits);
  const float r = read_running(running_absmax);
  if (r < 0.0f) return grad.clone(at::MemoryFormat::Contiguous);  // uninitialised: all passes
  const Tensor g = grad.contiguous();
  const Tensor xc = x.contiguous();
  Tensor out = at::empty(g.sizes(), g.options());
  const float qmax = qmax_of(bits);
  const float scale = scale_from_absmax(r, qmax);
  dispatch_float_types(g.scalar_type(), [&](auto tag) {
    using grad_t = typename decltype(tag)::type;
    dispatch_float_types(xc.scalar_type(), [&](auto xtag) {
      using scalar_t = typename decltype(xtag)::type;
      const grad_t* gp = g.data_ptr<grad_t>();
      const scalar_t* xp = xc.data_ptr<scalar_t>();
      grad_t* op_ = out.data_ptr<grad_t>();
      at::parallel_for(0, g.numel(), kGrain,
                       [&](int64_t b, int64_t e) { ste_kernel(gp + b, xp + b, op_ + b, e - b, scale, qmax); });
    });
  });
  return out;
}

// Backward of fake_quantize_per_tensor for a learned threshold t = running_absmax (TQT / LSQ):
// grad_x is the clipped STE (bit-identical to fake_quantize_per_tensor_backward), and
// grad_threshold = sum(grad * d out / d t) / qmax (d out / d t * qmax: threshold_grad_term), a
// float32 tensor of running_absmax's shape; 0 when the range is uninitialised (< 0).
// The sum is deterministic and independent of the thread count: fixed blocks of kGrain elements
// are summed in parallel (each in a fixed lane order), then the block sums in block order.
std::tuple<Tensor, Tensor> fake_quantize_per_tensor_threshold_backward_cpu(const Tensor& grad, const Tensor& x,
                                                                           const Tensor& running_absmax,
                                                                           int64_t bits) {
  check_backward_args("fake_quantize_per_tensor_threshold_backward", grad, x, running_absmax, bits);
  Tensor grad_t = at::empty(running_absmax.sizes(), running_absmax.options());
  float* gt = grad_t.data_ptr<float>();
  *gt = 0.0f;
  const float r = read_running(running_absmax);
  if (r < 0.0f) return {grad.clone(at::MemoryFormat::Contiguous), grad_t};  // uninitialised: all passes
  const Tensor g = grad.contiguous();
  const Tensor xc = x.contiguous();
  Tensor out = at::empty(g.sizes(), g.options());
  const float qmax = qmax_of(bits);
  const float scale = scale_from_absmax(r, qmax);
  const int64_t n = g.numel();
  const int64_t blocks = (n + kGrain - 1) / kGrain;
  std::vector<float> partial(static_cast<size_t>(blocks), 0.0f);
  dispatch_float_types(g.scalar_type(), [&](auto tag) {
    using grad_t_ = typename decltype(tag)::type;
    dispatch_float_types(xc.scalar_type(), [&](auto xtag) {
      using scalar_t = typename decltype(xtag)::type;
      const grad_t_* gp = g.data_ptr<grad_t_>();
      const scalar_t* xp = xc.data_ptr<scalar_t>();
      grad_t_* op_ = out.data_ptr<grad_t_>();
      at::parallel_for(0, blocks, 1, [&](int64_t bb, int64_t be) {
        for (int64_t blk = bb; blk < be; ++blk) {
          const int64_t b = blk * kGrain;
          const int64_t len = std::min(kGrain, n - b);
          partial[static_cast<size_t>(blk)] = ste_threshold_kernel(gp + b, xp + b, op_ + b, len, scale, qmax);
        }
      });
    });
  });
  float sum = 0.0f;
  for (const float p : partial) sum = fadd(sum, p);
  *gt = fdiv(sum, qmax);
  return {out, grad_t};
}

std::tuple<Tensor, Tensor> fold_fake_quantize_weight_backward_cpu(
    const Tensor& grad_weight_fq, const Tensor& grad_bias, const Tensor& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& bn_weight, const Tensor& bn_mean, const Tensor& bn_inv_std) {
  constexpr const char* op = "fold_fake_quantize_weight_backward";
  const FoldArgs a = prepare_fold_args(op, weight, bias, bn_weight, std::nullopt, bn_mean, bn_inv_std);
  const std::pair<Tensor, Tensor> grads = prepare_fold_grads(op, grad_weight_fq, grad_bias, weight);
  const Tensor& g = grads.first;
  const Tensor& gb = grads.second;
  std::tuple<Tensor, Tensor> result;
  dispatch_float_types(a.weight.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    result = fold_backward_impl<scalar_t>(g, gb, a);
  });
  return result;
}

}  // namespace ncnnqat
