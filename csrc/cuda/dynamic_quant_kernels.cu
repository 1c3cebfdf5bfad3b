// CUDA kernel of ncnn's dynamic int8 quantization (the ncnnqat::dynamic_quantize and
// dynamic_fake_quantize operators; CPU: ../fake_quant_cpu_dynamic.cpp, which documents the rule).
// No torch headers: plain nvcc builds this file; fake_quant_cuda.cpp binds it.
//
// Bit-exact with lightning_ncnnqat/ops/reference.py: the element math is ../fake_quant_math.h
// (explicitly rounded intrinsics: nvcc cannot fuse them into FMAs) and the group maximum is exact
// in any order. One block per group (grid-stride over groups): the block reads its group once for
// the finite absmax and the NaN flag, reduces them through warp shuffles and shared memory, then
// reads it again to write int8 levels or float32 fake-quantized values. Rows of Gemm / attention
// inputs (hundreds to thousands of elements) fill the GPU with many blocks; a per-tensor group
// (a weight, one attention matrix) is one block, which is fine at those sizes but would be slow
// for a tensor of many millions of elements. Never build with --use_fast_math.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../fake_quant_math.h"
#include "fake_quant_kernels.h"

namespace ncnnqat {
namespace cuda {
namespace {

constexpr int kDynThreads = 256;
constexpr int kDynWarps = kDynThreads / 32;
constexpr float kDynQmax = 127.0f;  // ncnn's dynamic int8 is 8-bit only

__device__ __forceinline__ float dyn_to_f(float v) { return v; }
__device__ __forceinline__ float dyn_to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float dyn_to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// A group holding a NaN: levels 0, fake-quantized values NaN.
__device__ __forceinline__ void dyn_store_nan(int8_t* out) { *out = 0; }
__device__ __forceinline__ void dyn_store_nan(float* out) { *out = __int_as_float(0x7fc00000); }

// round(clamp(x * scale, -127, 127)), half away from zero, as int8; or level / scale as float32.
__device__ __forceinline__ void dyn_store(int8_t* out, float x, float scale) {
  float v = fmul(x, scale);
  v = v < -kDynQmax ? -kDynQmax : v;
  v = v > kDynQmax ? kDynQmax : v;
  *out = static_cast<int8_t>(static_cast<int>(round_half_away(v)));
}
__device__ __forceinline__ void dyn_store(float* out, float x, float scale) { *out = fake_quant(x, scale, kDynQmax); }

template <typename T, typename O>
__global__ void __launch_bounds__(kDynThreads) dynamic_group_kernel(const T* __restrict__ x, O* __restrict__ out,
                                                                    float* __restrict__ absmax,
                                                                    float* __restrict__ scale, int64_t groups,
                                                                    int64_t n) {
  __shared__ float s_max[kDynWarps];
  __shared__ int s_nan[kDynWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const T* xg = x + g * n;
    O* og = out + g * n;
    float m = 0.0f;
    int has_nan = 0;
    for (int64_t i = threadIdx.x; i < n; i += kDynThreads) {
      const float v = dyn_to_f(xg[i]);
      has_nan |= v != v;
      m = fmax_nn(m, finite_abs(v));
    }
    for (int off = 16; off > 0; off >>= 1) {
      m = fmax_nn(m, __shfl_down_sync(0xffffffffu, m, off));
      has_nan |= __shfl_down_sync(0xffffffffu, has_nan, off);
    }
    if (lane == 0) {
      s_max[warp] = m;
      s_nan[warp] = has_nan;
    }
    __syncthreads();
    if (warp == 0) {
      m = lane < kDynWarps ? s_max[lane] : 0.0f;
      has_nan = lane < kDynWarps ? s_nan[lane] : 0;
      for (int off = 16; off > 0; off >>= 1) {
        m = fmax_nn(m, __shfl_down_sync(0xffffffffu, m, off));
        has_nan |= __shfl_down_sync(0xffffffffu, has_nan, off);
      }
      if (lane == 0) {
        s_max[0] = m;
        s_nan[0] = has_nan;
      }
    }
    __syncthreads();
    const bool nan = s_nan[0] != 0;
    const float amax = s_max[0];
    const float s = nan ? __int_as_float(0x7fc00000) : scale_from_absmax(amax, kDynQmax);
    if (threadIdx.x == 0) {
      absmax[g] = nan ? s : amax;
      scale[g] = s;
    }
    for (int64_t i = threadIdx.x; i < n; i += kDynThreads) {
      if (nan) {
        dyn_store_nan(og + i);
      } else {
        dyn_store(og + i, dyn_to_f(xg[i]), s);
      }
    }
    __syncthreads();  // s_max / s_nan are rewritten by the next group
  }
}

template <typename T>
cudaError_t launch_typed(const void* x, void* out, bool levels, float* absmax, float* scale, int64_t groups,
                         int64_t n, int sm_count, cudaStream_t stream) {
  const int64_t max_blocks = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * 32;
  const unsigned blocks = static_cast<unsigned>(groups < max_blocks ? groups : max_blocks);
  const T* xt = static_cast<const T*>(x);
  if (levels) {
    dynamic_group_kernel<T, int8_t><<<blocks, kDynThreads, 0, stream>>>(xt, static_cast<int8_t*>(out), absmax,
                                                                         scale, groups, n);
  } else {
    dynamic_group_kernel<T, float><<<blocks, kDynThreads, 0, stream>>>(xt, static_cast<float*>(out), absmax,
                                                                        scale, groups, n);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dynamic_quantize(const void* x, DType dtype, void* out, bool levels, float* absmax, float* scale,
                                    int64_t groups, int64_t n, int sm_count, cudaStream_t stream) {
  if (groups <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(x, out, levels, absmax, scale, groups, n, sm_count, stream);
    case DType::kFloat16: return launch_typed<__half>(x, out, levels, absmax, scale, groups, n, sm_count, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(x, out, levels, absmax, scale, groups, n, sm_count, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ncnnqat
