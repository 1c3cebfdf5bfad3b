// CPU kernels of the ncnnqat forward operators: per-channel and per-tensor fake quantization,
// the running-range update, and the BN fold + per-group fake quantization of a weight.
// Bit-exact with lightning_ncnnqat/ops/reference.py (how: fake_quant_cpu_loops.h); declared in
// fake_quant_cpu_ops.h, registered in fake_quant_cpu_register.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

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

// Max of finite |x[i]| over [0, n), on the bit patterns: for non-negative IEEE values the
// integer order is the numeric order, |x| is `bits & sign_mask`, and x is finite iff
// |x|'s bits < the bits of +inf. So this is an integer max reduction, which vectorises without
// reassociating any float arithmetic, and float16/bfloat16 need no conversion. Exact.
template <typename Bits, Bits kAbsMask, Bits kInfBits>
NCNNQAT_ALWAYS_INLINE Bits max_finite_abs_bits(const Bits* __restrict bits, int64_t n) {
  Bits m = 0;
  for (int64_t i = 0; i < n; ++i) {
    Bits b = static_cast<Bits>(bits[i] & kAbsMask);
    b = b < kInfBits ? b : Bits{0};
    m = b > m ? b : m;
  }
  return m;
}

// Integer views of float storage that may alias it (no strict-aliasing assumptions).
#if defined(__GNUC__) || defined(__clang__)
typedef int32_t __attribute__((may_alias)) alias_i32;
typedef int16_t __attribute__((may_alias)) alias_i16;
#else
typedef int32_t alias_i32;
typedef int16_t alias_i16;
#endif

NCNNQAT_ALWAYS_INLINE float absmax_loop(const float* x, int64_t n) {
  // int32 (not uint32): masked values are < 2**31, and signed max/compare exist in SSE2/AVX2.
  const int32_t m = max_finite_abs_bits<alias_i32, 0x7fffffff, 0x7f800000>(reinterpret_cast<const alias_i32*>(x), n);
  float f;
  std::memcpy(&f, &m, sizeof(f));
  return f;
}

NCNNQAT_ALWAYS_INLINE float absmax_loop(const c10::Half* x, int64_t n) {
  const int16_t m = max_finite_abs_bits<alias_i16, 0x7fff, 0x7c00>(reinterpret_cast<const alias_i16*>(x), n);
  return static_cast<float>(c10::Half(static_cast<uint16_t>(m), c10::Half::from_bits()));
}

NCNNQAT_ALWAYS_INLINE float absmax_loop(const c10::BFloat16* x, int64_t n) {
  const int16_t m = max_finite_abs_bits<alias_i16, 0x7fff, 0x7f80>(reinterpret_cast<const alias_i16*>(x), n);
  return static_cast<float>(c10::BFloat16(static_cast<uint16_t>(m), c10::BFloat16::from_bits()));
}

template <typename T>
NCNNQAT_ALWAYS_INLINE void quantize_loop(const T* __restrict x, T* __restrict out, int64_t n,
                                         float scale, float qmax) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(fake_quant(load_f(x, i), scale, qmax));
}

// BN-fold row loops: x scaled by the row's fold factor s, in float32 (never rounded to T).
// Max of finite |x * s|, on the bit patterns as in max_finite_abs_bits (an integer max
// vectorises; a float max reduction would need -ffinite-math-only). Exact.
template <typename T>
NCNNQAT_ALWAYS_INLINE float fold_absmax_loop(const T* __restrict x, int64_t n, float s) {
  int32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = fmul(load_f(x, i), s);
    int32_t b;
    std::memcpy(&b, &v, sizeof(b));
    b &= 0x7fffffff;
    b = b < 0x7f800000 ? b : 0;  // NaN and inf count as 0
    m = b > m ? b : m;
  }
  float f;
  std::memcpy(&f, &m, sizeof(f));
  return f;
}

template <typename T>
NCNNQAT_ALWAYS_INLINE void fold_quantize_loop(const T* __restrict x, T* __restrict out, int64_t n, float s,
                                              float scale, float qmax) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(fake_quant(fmul(load_f(x, i), s), scale, qmax));
}

// Multiversioned entry points, one overload per dtype (target_clones needs real functions).
#define NCNNQAT_DEFINE_LOOPS(T)                                                                   \
  NCNNQAT_MULTIVERSION float absmax_kernel(const T* x, int64_t n) { return absmax_loop(x, n); } \
  NCNNQAT_MULTIVERSION void quantize_kernel(const T* x, T* out, int64_t n, float scale,         \
                                            float qmax) {                                       \
    quantize_loop(x, out, n, scale, qmax);                                                      \
  }

#define NCNNQAT_DEFINE_FOLD_LOOPS(T)                                                                        \
  NCNNQAT_MULTIVERSION float fold_absmax_kernel(const T* x, int64_t n, float s) {                          \
    return fold_absmax_loop(x, n, s);                                                                      \
  }                                                                                                        \
  NCNNQAT_MULTIVERSION void fold_quantize_kernel(const T* x, T* out, int64_t n, float s, float scale,      \
                                                 float qmax) {                                             \
    fold_quantize_loop(x, out, n, s, scale, qmax);                                                         \
  }

NCNNQAT_DEFINE_LOOPS(float)
NCNNQAT_DEFINE_LOOPS(c10::Half)
NCNNQAT_DEFINE_LOOPS(c10::BFloat16)
#undef NCNNQAT_DEFINE_LOOPS

NCNNQAT_DEFINE_FOLD_LOOPS(float)
NCNNQAT_DEFINE_FOLD_LOOPS(c10::Half)
NCNNQAT_DEFINE_FOLD_LOOPS(c10::BFloat16)
#undef NCNNQAT_DEFINE_FOLD_LOOPS

// Max of finite |x| over a contiguous tensor, in parallel (per-thread partial maxima).
template <typename T>
float parallel_absmax(const T* x, int64_t n) {
  return at::parallel_reduce(
      0, n, kGrain, 0.0f,
      [x](int64_t b, int64_t e, float ident) { return fmax_nn(ident, absmax_kernel(x + b, e - b)); },
      [](float a, float b) { return fmax_nn(a, b); });
}

// ---------------------------------------------------------------------------------------------
// BN fold + per-group fake quantization of a weight. Weights are small, so this is a plain loop,
// parallel over groups.

template <typename T>
std::tuple<Tensor, Tensor, Tensor> fold_forward_impl(const FoldArgs& a, int64_t num_groups, float qmax) {
  const Tensor& w = a.weight;
  Tensor out = at::empty(w.sizes(), w.options());
  Tensor bias_out = at::empty({a.rows}, w.options());
  Tensor scales = at::empty({num_groups}, w.options().dtype(at::kFloat));
  const float* gamma = fold_ptr(a.bn_weight);
  const float* beta = fold_ptr(a.bn_bias);
  const float* bias = fold_ptr(a.bias);
  const float* mean = a.bn_mean.data_ptr<float>();
  const float* inv_std = a.bn_inv_std.data_ptr<float>();
  T* b = bias_out.data_ptr<T>();
  for (int64_t c = 0; c < a.rows; ++c) b[c] = static_cast<T>(fold_bias(beta, bias, mean, c, fold_scale(gamma, inv_std, c)));
  const T* src = w.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  float* sc = scales.data_ptr<float>();
  const int64_t rows_per_group = a.rows / num_groups;
  const int64_t len = a.row_len;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, rows_per_group * len));
  at::parallel_for(0, num_groups, grain, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t r0 = g * rows_per_group;
      float m = 0.0f;
      for (int64_t r = r0; r < r0 + rows_per_group; ++r) {
        m = fmax_nn(m, fold_absmax_kernel(src + r * len, len, fold_scale(gamma, inv_std, r)));
      }
      const float scale = scale_from_absmax(m, qmax);
      sc[g] = scale;
      for (int64_t r = r0; r < r0 + rows_per_group; ++r) {
        fold_quantize_kernel(src + r * len, dst + r * len, len, fold_scale(gamma, inv_std, r), scale, qmax);
      }
    }
  });
  return {out, bias_out, scales};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Operators.

std::tuple<Tensor, Tensor> fake_quantize_per_channel_cpu(const Tensor& weight, int64_t num_groups,
                                                         int64_t bits) {
  constexpr const char* op = "fake_quantize_per_channel";
  check_float_dtype(op, "weight", weight);
  check_bits(op, bits);
  check_per_channel_groups(op, num_groups, weight.numel());
  const Tensor w = weight.contiguous();
  Tensor out = at::empty(w.sizes(), w.options());
  Tensor scales = at::empty({num_groups}, w.options().dtype(at::kFloat));
  const int64_t gs = w.numel() / num_groups;
  const float qmax = qmax_of(bits);
  float* s = scales.data_ptr<float>();
  if (gs == 0) {
    std::fill(s, s + num_groups, 1.0f);  // an empty group's absmax is 0
    return {out, scales};
  }
  dispatch_float_types(w.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* src = w.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const bool few_large_groups = gs >= 4 * kGrain && num_groups < 4 * at::get_num_threads();
    if (few_large_groups) {
      // Parallel inside each group: a reduction pass, then a quantize pass.
      for (int64_t g = 0; g < num_groups; ++g) {
        const scalar_t* x = src + g * gs;
        scalar_t* y = dst + g * gs;
        const float scale = scale_from_absmax(parallel_absmax(x, gs), qmax);
        s[g] = scale;
        at::parallel_for(0, gs, kGrain, [&](int64_t b, int64_t e) { quantize_kernel(x + b, y + b, e - b, scale, qmax); });
      }
    } else {
      // Parallel over groups; each group is reduced then quantized while it is in cache.
      const int64_t grain = std::max<int64_t>(1, kGrain / gs);
      at::parallel_for(0, num_groups, grain, [&](int64_t gb, int64_t ge) {
        for (int64_t g = gb; g < ge; ++g) {
          const float scale = scale_from_absmax(absmax_kernel(src + g * gs, gs), qmax);
          s[g] = scale;
          quantize_kernel(src + g * gs, dst + g * gs, gs, scale, qmax);
        }
      });
    }
  });
  return {out, scales};
}

void update_absmax_cpu(const Tensor& x, const Tensor& running_absmax, double momentum) {
  constexpr const char* op = "update_absmax_";
  check_float_dtype(op, "x", x);
  check_running(op, running_absmax, x);
  const Tensor xc = x.contiguous();
  float b = 0.0f;
  dispatch_float_types(xc.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    b = parallel_absmax(xc.data_ptr<scalar_t>(), xc.numel());
  });
  float* r = running_absmax.data_ptr<float>();
  *r = ema_update(*r, b, static_cast<float>(momentum));
}

Tensor fake_quantize_per_tensor_cpu(const Tensor& x, const Tensor& running_absmax, int64_t bits) {
  constexpr const char* op = "fake_quantize_per_tensor";
  check_float_dtype(op, "x", x);
  check_bits(op, bits);
  check_running(op, running_absmax, x);
  const float r = read_running(running_absmax);
  if (r < 0.0f) return x.clone(at::MemoryFormat::Contiguous);  // uninitialised range: identity
  const Tensor xc = x.contiguous();
  Tensor out = at::empty(xc.sizes(), xc.options());
  const float qmax = qmax_of(bits);
  const float scale = scale_from_absmax(r, qmax);
  dispatch_float_types(xc.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* src = xc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, xc.numel(), kGrain,
                     [&](int64_t b, int64_t e) { quantize_kernel(src + b, dst + b, e - b, scale, qmax); });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> fold_fake_quantize_weight_cpu(const Tensor& weight, const std::optional<Tensor>& bias,
                                                                 const std::optional<Tensor>& bn_weight,
                                                                 const std::optional<Tensor>& bn_bias,
                                                                 const Tensor& bn_mean, const Tensor& bn_inv_std,
                                                                 int64_t num_groups, int64_t bits) {
  constexpr const char* op = "fold_fake_quantize_weight";
  check_bits(op, bits);
  const FoldArgs a = prepare_fold_args(op, weight, bias, bn_weight, bn_bias, bn_mean, bn_inv_std);
  check_fold_groups(op, num_groups, a.rows);
  std::tuple<Tensor, Tensor, Tensor> result;
  dispatch_float_types(a.weight.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    result = fold_forward_impl<scalar_t>(a, num_groups, qmax_of(bits));
  });
  return result;
}

}  // namespace ncnnqat
