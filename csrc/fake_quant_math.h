// Scalar math of the ncnn int8 fake quantizer, shared by the CPU (C++) and CUDA kernels.
//
// Every function here is bit-exact with lightning_ncnnqat/ops/reference.py, which is the
// definition. The rules that make that hold:
//  * float32 everywhere, each operation rounded once: the CUDA side uses the explicit
//    round-to-nearest intrinsics (nvcc would otherwise contract a*b+c into an FMA), the C++
//    side is compiled with -ffp-contract=off. Never build with -ffast-math / --use_fast_math.
//  * the scale is one IEEE float32 division qmax / absmax, exactly what ncnn2table computes.
//  * round() is C's: half away from zero, computed as trunc + (|v - trunc| >= 0.5 ? sign : 0),
//    which is exact (floor(|v| + 0.5) is not: it rounds 0.49999997 up).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define NCNNQAT_HD __host__ __device__ __forceinline__
#else
#define NCNNQAT_HD inline
#endif

namespace ncnnqat {

constexpr float kFltMax = 3.40282346638528859812e+38f;

// IEEE round-to-nearest float32 operations that the compiler may not fuse.
NCNNQAT_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
NCNNQAT_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
NCNNQAT_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
NCNNQAT_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// 2**(bits-1) - 1: 127 for 8 bits, 31 for 6.
NCNNQAT_HD float qmax_of(int64_t bits) { return static_cast<float>((int64_t{1} << (bits - 1)) - 1); }

// |x| if finite, else 0: ranges ignore NaN and +-inf.
NCNNQAT_HD float finite_abs(float x) {
  const float a = fabsf(x);
  return a <= kFltMax ? a : 0.0f;  // false for NaN and inf
}

// max of two non-negative, non-NaN floats.
NCNNQAT_HD float fmax_nn(float a, float b) { return a > b ? a : b; }

// Scale multiplier from a float32 absmax: qmax / absmax as one IEEE division (ncnn2table's
// `127 / absmax`); 1 when absmax is not > 0 (zero, NaN); clamped to FLT_MAX.
NCNNQAT_HD float scale_from_absmax(float absmax, float qmax) {
  if (!(absmax > 0.0f)) return 1.0f;
  const float s = fdiv(qmax, absmax);  // one correctly rounded division, as ncnn2table's 127 / absmax
  return s > kFltMax ? kFltMax : s;  // inf -> FLT_MAX
}

// C round() (half away from zero) of v, where |v| <= qmax or v is NaN. t + step is exactly the
// reference's float (its trunc(-0.3) = -0, and -0 + 0 = +0 here too); NaN stays NaN (the
// comparison is false, NaN + 0 = NaN). Branch-free, so the CPU loops auto-vectorise (GCC needs
// -fno-trapping-math for that; it changes no value).
NCNNQAT_HD float round_half_away(float v) {
  const float t = truncf(v);
  const float step = fabsf(fsub(v, t)) >= 0.5f ? copysignf(1.0f, v) : 0.0f;
  return fadd(t, step);
}

// Fake-quantize one value: q = round(clamp(x * scale, -qmax, qmax)), returns q / scale, in the
// reference's order. NaN propagates, +-inf saturates to +-qmax / scale.
NCNNQAT_HD float fake_quant(float x, float scale, float qmax) {
  float v = fmul(x, scale);
  v = v < -qmax ? -qmax : v;  // NaN compares false: stays NaN (torch.clamp propagates NaN)
  v = v > qmax ? qmax : v;
  return fdiv(round_half_away(v), scale);
}

// The clipped straight-through estimator's mask: true where round(x*scale) was not clamped.
NCNNQAT_HD bool ste_keep(float x, float scale, float qmax) {
  return fabsf(fmul(x, scale)) < qmax + 0.5f;  // false for NaN
}

// The threshold gradient of one element, times qmax (the ops divide the sum by qmax once).
// out = q * t / qmax with s = qmax / t and a straight-through round, so d out / d t =
// (q - x*s) / qmax where the STE keeps x (ste_keep), and q / qmax (= +-1) where x was clipped.
// NaN x gives NaN. The reference is fake_quantize_per_tensor_threshold_backward in reference.py.
NCNNQAT_HD float threshold_grad_term(float x, float scale, float qmax) {
  const float v = fmul(x, scale);
  float c = v < -qmax ? -qmax : v;
  c = c > qmax ? qmax : c;
  const float q = round_half_away(c);
  return fabsf(v) < qmax + 0.5f ? fsub(q, v) : q;
}

// Moving average of the batch absmax b into the running value r (r < 0: uninitialised).
NCNNQAT_HD float ema_update(float r, float b, float momentum) {
  return r < 0.0f ? b : fadd(r, fmul(momentum, fsub(b, r)));
}

// BatchNorm folded into the layer before it, one output channel c (vectors may be null when the
// BN has no affine parameters or the layer no bias); the reference is fold_factors /
// fold_weight_bias in reference.py. s = gamma * inv_std (inv_std alone without affine).
NCNNQAT_HD float fold_scale(const float* gamma, const float* inv_std, int64_t c) {
  return gamma ? fmul(gamma[c], inv_std[c]) : inv_std[c];
}

// Folded bias: t + bias * s with t = beta - mean * s (-(mean * s) without affine).
NCNNQAT_HD float fold_bias(const float* beta, const float* bias, const float* mean, int64_t c, float s) {
  const float ms = fmul(mean[c], s);
  const float t = beta ? fsub(beta[c], ms) : -ms;
  return bias ? fadd(t, fmul(bias[c], s)) : t;
}

// Gradients of one channel's fold vectors from dot = sum(grad_w * weight) and gb = grad of the
// folded bias: out[0] = d/d bias, out[1] = d/d gamma, out[2] = d/d beta (stride `stride`).
NCNNQAT_HD void fold_vector_grads(float dot, float gb, const float* bias, const float* mean, const float* inv_std,
                                  int64_t c, float s, float* out, int64_t stride) {
  const float centred = bias ? fsub(bias[c], mean[c]) : -mean[c];
  const float grad_s = fadd(dot, fmul(gb, centred));
  out[c] = fmul(gb, s);
  out[stride + c] = fmul(grad_s, inv_std[c]);
  out[2 * stride + c] = gb;
}

}  // namespace ncnnqat
