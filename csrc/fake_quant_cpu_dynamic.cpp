// CPU kernels of ncnn's dynamic int8 quantization: the activations of int8 Gemm, MultiHeadAttention
// and SDPA, quantized at run time with a symmetric scale from their own absmax (per row, per matrix
// or per tensor: one group = the last `dims` dims). ncnn (src/layer/gemm.cpp, multiheadattention.cpp,
// sdpa.cpp and their x86/arm kernels) computes, in float32 per group:
//     absmax = max |x|,  scale = absmax == 0 ? 1 : 127 / absmax,  q = float2int8(x * scale)
// with float2int8 rounding half away from zero and clamping to [-127, 127]. The package's range
// policy is kept: absmax ignores +-inf (an inf saturates to +-127), and a group holding a NaN gets
// absmax = scale = NaN (its levels are 0), so everything dequantized with it is NaN: never a
// silently wrong number.
//
// Bit-exact with lightning_ncnnqat/ops/reference.py (dynamic_quantize / dynamic_fake_quantize):
// the element math is fake_quant_math.h, the maxima are integer maxima of the bit patterns
// (exact in any order, so thread count and vector width change nothing). Declared in
// fake_quant_cpu_ops.h, registered in fake_quant_cpu_register.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "fake_quant_cpu_loops.h"
#include "fake_quant_cpu_ops.h"
#include "fake_quant_math.h"
#include "op_args.h"

namespace ncnnqat {

using at::Tensor;

namespace {

constexpr float kDynQmax = 127.0f;  // ncnn's dynamic int8 is 8-bit only
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

#if defined(__GNUC__) || defined(__clang__)
typedef int32_t __attribute__((may_alias)) dyn_i32;
typedef int16_t __attribute__((may_alias)) dyn_i16;
#else
typedef int32_t dyn_i32;
typedef int16_t dyn_i16;
#endif

// One pass over a group's bit patterns: the largest finite |x| and the largest |x| of all (a NaN's
// masked bits are above +inf's). Two integer max reductions: they vectorise and are exact.
template <typename Bits, Bits kAbsMask, Bits kInfBits>
NCNNQAT_ALWAYS_INLINE void scan_bits(const Bits* __restrict bits, int64_t n, Bits& finite_max, Bits& any_max) {
  Bits fm = 0, am = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Bits b = static_cast<Bits>(bits[i] & kAbsMask);
    const Bits f = b < kInfBits ? b : Bits{0};
    fm = f > fm ? f : fm;
    am = b > am ? b : am;
  }
  finite_max = fm;
  any_max = am;
}

// The group statistic: max finite |x| as float32, or NaN when the group holds a NaN.
NCNNQAT_ALWAYS_INLINE float scan_loop(const float* x, int64_t n) {
  int32_t fm, am;
  scan_bits<dyn_i32, 0x7fffffff, 0x7f800000>(reinterpret_cast<const dyn_i32*>(x), n, fm, am);
  if (am > 0x7f800000) return kNaN;
  float f;
  std::memcpy(&f, &fm, sizeof(f));
  return f;
}

NCNNQAT_ALWAYS_INLINE float scan_loop(const c10::Half* x, int64_t n) {
  int16_t fm, am;
  scan_bits<dyn_i16, 0x7fff, 0x7c00>(reinterpret_cast<const dyn_i16*>(x), n, fm, am);
  if (am > 0x7c00) return kNaN;
  return static_cast<float>(c10::Half(static_cast<uint16_t>(fm), c10::Half::from_bits()));
}

NCNNQAT_ALWAYS_INLINE float scan_loop(const c10::BFloat16* x, int64_t n) {
  int16_t fm, am;
  scan_bits<dyn_i16, 0x7fff, 0x7f80>(reinterpret_cast<const dyn_i16*>(x), n, fm, am);
  if (am > 0x7f80) return kNaN;
  return static_cast<float>(c10::BFloat16(static_cast<uint16_t>(fm), c10::BFloat16::from_bits()));
}

// int8 levels: round(clamp(x * scale, -127, 127)), half away from zero; x holds no NaN here.
template <typename T>
NCNNQAT_ALWAYS_INLINE void levels_loop(const T* __restrict x, int8_t* __restrict out, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) {
    float v = fmul(load_f(x, i), scale);
    v = v < -kDynQmax ? -kDynQmax : v;
    v = v > kDynQmax ? kDynQmax : v;
    out[i] = static_cast<int8_t>(static_cast<int32_t>(round_half_away(v)));
  }
}

// float32 fake-quantized values: level / scale (fake_quant of fake_quant_math.h).
template <typename T>
NCNNQAT_ALWAYS_INLINE void dequant_loop(const T* __restrict x, float* __restrict out, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) out[i] = fake_quant(load_f(x, i), scale, kDynQmax);
}

#define NCNNQAT_DEFINE_DYNAMIC_LOOPS(T)                                                                      \
  NCNNQAT_MULTIVERSION float dyn_scan_kernel(const T* x, int64_t n) { return scan_loop(x, n); }             \
  NCNNQAT_MULTIVERSION void dyn_write_kernel(const T* x, int8_t* out, int64_t n, float scale) {            \
    levels_loop(x, out, n, scale);                                                                         \
  }                                                                                                        \
  NCNNQAT_MULTIVERSION void dyn_write_kernel(const T* x, float* out, int64_t n, float scale) {             \
    dequant_loop(x, out, n, scale);                                                                        \
  }

NCNNQAT_DEFINE_DYNAMIC_LOOPS(float)
NCNNQAT_DEFINE_DYNAMIC_LOOPS(c10::Half)
NCNNQAT_DEFINE_DYNAMIC_LOOPS(c10::BFloat16)
#undef NCNNQAT_DEFINE_DYNAMIC_LOOPS

// NaN-propagating max of two group statistics (non-negative or NaN).
inline float stat_max(float a, float b) {
  if (a != a || b != b) return kNaN;
  return a > b ? a : b;
}

// A NaN group's output: levels 0, fake-quantized values NaN.
inline void fill_nan_group(int8_t* out, int64_t n) { std::fill(out, out + n, int8_t{0}); }
inline void fill_nan_group(float* out, int64_t n) { std::fill(out, out + n, kNaN); }

// Quantizes `groups` groups of `n` contiguous elements: absmax[g], scale[g], out (int8 levels or
// float32 fake-quantized values). Many small groups run in parallel over groups, each reduced and
// written while in cache; a few large groups (a per-tensor scale) in parallel inside each group.
template <typename T, typename O>
void dynamic_impl(const T* x, O* out, float* absmax, float* scale, int64_t groups, int64_t n) {
  auto finish = [&](int64_t g, float stat) {
    absmax[g] = stat;
    scale[g] = stat != stat ? kNaN : scale_from_absmax(stat, kDynQmax);
    return scale[g];
  };
  const bool few_large_groups = n >= 4 * kGrain && groups < 4 * at::get_num_threads();
  if (few_large_groups) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* xg = x + g * n;
      O* og = out + g * n;
      const float stat = at::parallel_reduce(
          0, n, kGrain, 0.0f,
          [xg](int64_t b, int64_t e, float ident) { return stat_max(ident, dyn_scan_kernel(xg + b, e - b)); },
          [](float a, float b) { return stat_max(a, b); });
      const float s = finish(g, stat);
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        if (s != s) {
          fill_nan_group(og + b, e - b);
        } else {
          dyn_write_kernel(xg + b, og + b, e - b, s);
        }
      });
    }
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n));
  at::parallel_for(0, groups, grain, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      const float s = finish(g, dyn_scan_kernel(x + g * n, n));
      if (s != s) {
        fill_nan_group(out + g * n, n);
      } else {
        dyn_write_kernel(x + g * n, out + g * n, n, s);
      }
    }
  });
}

// Shapes of the outputs and the group split of x for `dims` trailing dims per group.
struct DynamicShape {
  std::vector<int64_t> lead;  // x.shape[:-dims], the shape of absmax and scale
  int64_t groups;
  int64_t n;
};

DynamicShape dynamic_shape(const Tensor& x, int64_t dims) {
  DynamicShape s;
  const int64_t keep = x.dim() - dims;
  s.lead.assign(x.sizes().begin(), x.sizes().begin() + keep);
  s.groups = 1;
  for (int64_t d : s.lead) s.groups *= d;
  s.n = 1;
  for (int64_t i = keep; i < x.dim(); ++i) s.n *= x.size(i);
  return s;
}

template <typename O>
std::tuple<Tensor, Tensor, Tensor> dynamic_run(const char* op, const Tensor& x, int64_t dims, at::ScalarType out_dtype) {
  check_float_dtype(op, "x", x);
  check_dynamic_dims(op, dims, x.dim());
  const Tensor xc = x.contiguous();
  const DynamicShape s = dynamic_shape(xc, dims);
  Tensor out = at::empty(xc.sizes(), xc.options().dtype(out_dtype));
  Tensor absmax = at::empty(s.lead, xc.options().dtype(at::kFloat));
  Tensor scale = at::empty(s.lead, xc.options().dtype(at::kFloat));
  if (s.groups == 0) return {out, absmax, scale};
  dispatch_float_types(xc.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    dynamic_impl<scalar_t, O>(xc.data_ptr<scalar_t>(), out.data_ptr<O>(), absmax.data_ptr<float>(),
                              scale.data_ptr<float>(), s.groups, s.n);
  });
  return {out, absmax, scale};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> dynamic_quantize_cpu(const Tensor& x, int64_t dims) {
  return dynamic_run<int8_t>("dynamic_quantize", x, dims, at::kChar);
}

std::tuple<Tensor, Tensor> dynamic_fake_quantize_cpu(const Tensor& x, int64_t dims) {
  auto [out, absmax, scale] = dynamic_run<float>("dynamic_fake_quantize", x, dims, at::kFloat);
  return {out, scale};
}

}  // namespace ncnnqat
