// CPU kernels of the ncnnqat fake-quant operators (schemas: lightning_ncnnqat/ops/_registry.py).
//
// Bit-exact with lightning_ncnnqat/ops/reference.py: the scalar math is fake_quant_math.h and
// is applied element by element in float32, so neither the split into threads nor vector
// width can change a result (max is order independent). The float32 sums (the fold backward's
// dot products, the learned threshold's gradient) use explicit lanes added in a fixed tree over
// fixed-size blocks, so they too are the same for any thread count and instruction set; they
// differ from the reference's torch.sum only by summation order.
// The inner loops are written to auto-vectorise; on x86-64 (GCC/Clang) they are compiled for
// AVX-512F, AVX2 and the baseline, and the loader picks one at run time (target_clones). Built
// with -ffp-contract=off, so no FMA can change a result on any of them.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "fake_quant_math.h"
#include "fold_args.h"

// Python module stub: `import lightning_ncnnqat._C` loads this library, whose static
// initialisers register the kernels below with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32) && \
    !defined(NCNNQAT_NO_MULTIVERSION)
#define NCNNQAT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NCNNQAT_MULTIVERSION
#endif

#if defined(__GNUC__) || defined(__clang__)
#define NCNNQAT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define NCNNQAT_ALWAYS_INLINE inline
#endif

namespace ncnnqat {
namespace {

using at::Tensor;

// Elements per parallel task: below this a loop runs on one thread.
constexpr int64_t kGrain = 32768;

// ---------------------------------------------------------------------------------------------
// Inner loops. Templates are always inlined into the multiversioned (per target) wrappers below,
// so each wrapper's body is compiled for its own instruction set.

template <typename T>
NCNNQAT_ALWAYS_INLINE float load_f(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

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

template <typename G, typename X>
NCNNQAT_ALWAYS_INLINE void ste_loop(const G* __restrict grad, const X* __restrict x, G* __restrict out,
                                    int64_t n, float scale, float qmax) {
  const G zero = static_cast<G>(0.0f);
  for (int64_t i = 0; i < n; ++i) out[i] = ste_keep(load_f(x, i), scale, qmax) ? grad[i] : zero;
}

// Multiversioned entry points, one overload per dtype (target_clones needs real functions).
#define NCNNQAT_DEFINE_LOOPS(T)                                                                   \
  NCNNQAT_MULTIVERSION float absmax_kernel(const T* x, int64_t n) { return absmax_loop(x, n); } \
  NCNNQAT_MULTIVERSION void quantize_kernel(const T* x, T* out, int64_t n, float scale,         \
                                            float qmax) {                                       \
    quantize_loop(x, out, n, scale, qmax);                                                      \
  }                                                                                             \
  NCNNQAT_MULTIVERSION void ste_kernel(const T* grad, const T* x, T* out, int64_t n, float scale, \
                                       float qmax) {                                            \
    ste_loop(grad, x, out, n, scale, qmax);                                                     \
  }

NCNNQAT_DEFINE_LOOPS(float)
NCNNQAT_DEFINE_LOOPS(c10::Half)
NCNNQAT_DEFINE_LOOPS(c10::BFloat16)
#undef NCNNQAT_DEFINE_LOOPS

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

// grad_w = g * s, and returns sum(g * w): kLanes interleaved float32 partial sums added in a fixed
// tree at the end, so the loop vectorises and the result does not depend on the instruction set.
constexpr int kLanes = 16;
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
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) acc[j] = fadd(acc[j], acc[j + width]);
  }
  return acc[0];
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
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) acc[j] = fadd(acc[j], acc[j + width]);
  }
  return acc[0];
}

#define NCNNQAT_DEFINE_FOLD_LOOPS(T)                                                                        \
  NCNNQAT_MULTIVERSION float fold_absmax_kernel(const T* x, int64_t n, float s) {                          \
    return fold_absmax_loop(x, n, s);                                                                      \
  }                                                                                                        \
  NCNNQAT_MULTIVERSION void fold_quantize_kernel(const T* x, T* out, int64_t n, float s, float scale,      \
                                                 float qmax) {                                             \
    fold_quantize_loop(x, out, n, s, scale, qmax);                                                         \
  }                                                                                                        \
  NCNNQAT_MULTIVERSION float fold_backward_kernel(const T* g, const T* w, T* grad_w, int64_t n, float s) { \
    return fold_backward_loop(g, w, grad_w, n, s);                                                         \
  }

#define NCNNQAT_DEFINE_THRESHOLD_LOOPS(T)                                                                   \
  NCNNQAT_MULTIVERSION float ste_threshold_kernel(const T* grad, const T* x, T* out, int64_t n, float scale, \
                                                  float qmax) {                                              \
    return ste_threshold_loop(grad, x, out, n, scale, qmax);                                                 \
  }

NCNNQAT_DEFINE_THRESHOLD_LOOPS(float)
NCNNQAT_DEFINE_THRESHOLD_LOOPS(c10::Half)
NCNNQAT_DEFINE_THRESHOLD_LOOPS(c10::BFloat16)
#undef NCNNQAT_DEFINE_THRESHOLD_LOOPS

NCNNQAT_DEFINE_FOLD_LOOPS(float)
NCNNQAT_DEFINE_FOLD_LOOPS(c10::Half)
NCNNQAT_DEFINE_FOLD_LOOPS(c10::BFloat16)
#undef NCNNQAT_DEFINE_FOLD_LOOPS

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
// Argument checks: errors name the op, the argument and the value.

void check_float_dtype(const char* op, const char* arg, const Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "ncnnqat::", op, ": `", arg,
              "` must be float32, float16 or bfloat16, got ", dt);
}

// Integers and shapes go into error messages as std::to_string strings, never streamed: built
// against torch 2.11+cu130 with GCC 13.3 (an extension whose ldd listed no libstdc++.so, so
// probably a static copy), streaming an int64 into a TORCH_CHECK message segfaulted instead of
// raising, while strings, dtypes and devices were fine.
std::string num_str(int64_t v) { return std::to_string(v); }

std::string shape_str(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "ncnnqat::", op, ": `bits` must be in [2, 8], got ", num_str(bits));
}

void check_running(const char* op, const Tensor& running, const Tensor& x) {
  TORCH_CHECK(running.scalar_type() == at::kFloat && running.numel() == 1, "ncnnqat::", op,
              ": `running_absmax` must be a 1-element float32 tensor, got ", running.scalar_type(),
              " of shape ", shape_str(running.sizes()));
  TORCH_CHECK(running.device() == x.device(), "ncnnqat::", op, ": `running_absmax` is on ",
              running.device(), " but `x` is on ", x.device());
}

// Calls f(Tag<T>{}) with T the C++ type of a float32 / float16 / bfloat16 tensor.
template <typename T>
struct Tag {
  using type = T;
};
template <typename F>
void dispatch_float_types(at::ScalarType dt, const F& f) {
  switch (dt) {
    case at::kFloat: return f(Tag<float>{});
    case at::kHalf: return f(Tag<c10::Half>{});
    case at::kBFloat16: return f(Tag<c10::BFloat16>{});
    default: TORCH_CHECK(false, "ncnnqat: unsupported dtype ", dt);  // checked before
  }
}

float read_running(const Tensor& running) {
  return *running.data_ptr<float>();  // 1 element: any stride is fine
}

// Max of finite |x| over a contiguous tensor, in parallel (per-thread partial maxima).
template <typename T>
float parallel_absmax(const T* x, int64_t n) {
  return at::parallel_reduce(
      0, n, kGrain, 0.0f,
      [x](int64_t b, int64_t e, float ident) { return fmax_nn(ident, absmax_kernel(x + b, e - b)); },
      [](float a, float b) { return fmax_nn(a, b); });
}

// ---------------------------------------------------------------------------------------------
// Operators.

std::tuple<Tensor, Tensor> fake_quantize_per_channel_cpu(const Tensor& weight, int64_t num_groups,
                                                         int64_t bits) {
  constexpr const char* op = "fake_quantize_per_channel";
  check_float_dtype(op, "weight", weight);
  check_bits(op, bits);
  TORCH_CHECK(num_groups >= 1, "ncnnqat::", op, ": `num_groups` must be >= 1, got ", num_str(num_groups));
  TORCH_CHECK(weight.numel() % num_groups == 0, "ncnnqat::", op, ": `num_groups`=", num_str(num_groups),
              " must divide weight.numel()=", num_str(weight.numel()));
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

Tensor fake_quantize_per_tensor_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& running_absmax,
                                             int64_t bits) {
  constexpr const char* op = "fake_quantize_per_tensor_backward";
  check_float_dtype(op, "grad", grad);
  check_float_dtype(op, "x", x);
  check_bits(op, bits);
  check_running(op, running_absmax, x);
  TORCH_CHECK(grad.sizes() == x.sizes(), "ncnnqat::", op, ": `grad` has shape ", shape_str(grad.sizes()),
              " but `x` has shape ", shape_str(x.sizes()));
  const float r = read_running(running_absmax);
  if (r < 0.0f) return grad.clone(at::MemoryFormat::Contiguous);  // uninitialised: all passes
  const Tensor g = grad.contiguous();
  const Tensor xc = x.contiguous();
  Tensor out = at::empty(g.sizes(), g.options());
  const float qmax = qmax_of(bits);
  const float scale = scale_from_absmax(r, qmax);
  dispatch_float_types(g.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using grad_t = scalar_t;
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
  constexpr const char* op = "fake_quantize_per_tensor_threshold_backward";
  check_float_dtype(op, "grad", grad);
  check_float_dtype(op, "x", x);
  check_bits(op, bits);
  check_running(op, running_absmax, x);
  TORCH_CHECK(grad.sizes() == x.sizes(), "ncnnqat::", op, ": `grad` has shape ", shape_str(grad.sizes()),
              " but `x` has shape ", shape_str(x.sizes()));
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

// ---------------------------------------------------------------------------------------------
// BN fold + per-group fake quantization of a weight (and its backward). Weights are small, so
// these are plain loops, parallel over groups / rows.

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

}  // namespace

TORCH_LIBRARY_IMPL(ncnnqat, CPU, m) {
  m.impl("fake_quantize_per_channel", &fake_quantize_per_channel_cpu);
  m.impl("update_absmax_", &update_absmax_cpu);
  m.impl("fake_quantize_per_tensor", &fake_quantize_per_tensor_cpu);
  m.impl("fake_quantize_per_tensor_backward", &fake_quantize_per_tensor_backward_cpu);
  m.impl("fake_quantize_per_tensor_threshold_backward", &fake_quantize_per_tensor_threshold_backward_cpu);
  m.impl("fold_fake_quantize_weight", &fold_fake_quantize_weight_cpu);
  m.impl("fold_fake_quantize_weight_backward", &fold_fake_quantize_weight_backward_cpu);
}

}  // namespace ncnnqat
