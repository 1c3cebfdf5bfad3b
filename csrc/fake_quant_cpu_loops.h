// Building blocks of the CPU kernels' loops (fake_quant_cpu_forward.cpp, fake_quant_cpu_backward.cpp):
// per-target compilation, block sizes, the fixed-order lane sum, dtype dispatch.
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
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "fake_quant_math.h"

// On a function: compile it once per instruction set, picked at load time. Each kernel file
// defines its multiversioned entry points (one overload per dtype: target_clones needs real
// functions) around the always-inlined loop templates, so each clone's body is compiled for its
// own instruction set.
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

// Elements per parallel task: below this a loop runs on one thread. Also the fixed block size of
// the deterministic sums.
constexpr int64_t kGrain = 32768;

// Interleaved float32 partial sums of the summing loops (a multiple of any vector width).
constexpr int kLanes = 16;

template <typename T>
NCNNQAT_ALWAYS_INLINE float load_f(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// The kLanes partial sums added in a fixed tree (halves, then quarters...): the result does not
// depend on the instruction set the lanes were accumulated with.
NCNNQAT_ALWAYS_INLINE float lane_tree_sum(float (&acc)[kLanes]) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) acc[j] = fadd(acc[j], acc[j + width]);
  }
  return acc[0];
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

inline float read_running(const at::Tensor& running) {
  return *running.data_ptr<float>();  // 1 element: any stride is fine
}

}  // namespace ncnnqat
