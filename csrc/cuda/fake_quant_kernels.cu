// CUDA kernels of the ncnnqat fake-quant operators. No torch headers: plain nvcc builds this
// file (`nvcc -c -std=c++17 -arch=sm_90 fake_quant_kernels.cu`); fake_quant_cuda.cpp binds it.
//
// Bit-exact with lightning_ncnnqat/ops/reference.py: the per-element math is
// ../fake_quant_math.h (explicitly rounded intrinsics, so nvcc cannot fuse into FMAs), and the
// maxima are exact in any order. The float32 sums (fold backward's dot products, a learned
// threshold's gradient) are deterministic: fixed per-thread order, fixed-order block_sum, and a
// one-block finalize over the per-block partials; the grid depends only on n and the SM count,
// so a given GPU model gives the same bits every run. They differ from the reference's
// torch.sum only by summation order. Never build with --use_fast_math.
//
// Memory traffic (the kernels are bandwidth bound):
//  * per-tensor, training: a partial-max kernel reads x once (one maximum per block), a
//    one-block kernel reduces those and updates running_absmax on the device; the quantize
//    kernel reads running_absmax from device memory, reads x again and writes out. No host
//    synchronisation anywhere.
//  * per-channel: a group of up to kRegGroupMax elements is read once into registers by 32 to
//    256 threads, reduced, quantized and written (8 bytes per float32 element). Larger groups
//    are split into chunks: partial maxima, one scale per group, then a quantize pass.
//  * 16-byte vector loads and stores wherever the buffers and groups are aligned to 16 bytes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../fake_quant_math.h"
#include "fake_quant_kernels.h"

namespace ncnnqat {
namespace cuda {
namespace {

constexpr int kThreads = 256;       // threads per block of every streaming kernel
constexpr int kUnroll = 4;          // vectors each thread keeps in flight in the chunk loops
constexpr int kItemsPerThread = 16; // elements per thread of the single-pass per-channel kernel
constexpr int64_t kRegGroupMax = int64_t{kThreads} * kItemsPerThread;  // 4096 elements
constexpr int64_t kMinChunk = 1024;   // elements per block of the chunked kernels: at least...
constexpr int64_t kMaxChunk = 16384;  // ...and at most

// ------------------------------------------------------------------------------------------
// Element conversion (float32 math, storage in the input dtype; round to nearest even, as torch).

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// W consecutive elements, loaded and stored in one access (16 bytes when W = 16 / sizeof(T)).
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <typename T>
__host__ __device__ constexpr int vec_width() { return 16 / static_cast<int>(sizeof(T)); }

template <typename T, bool VEC>
__host__ __device__ constexpr int pack_width() { return VEC ? vec_width<T>() : 1; }

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid sizes are computed in int64; a launch past CUDA's grid limit fails cleanly instead.
bool grid_ok(int64_t blocks) { return blocks >= 0 && blocks <= 0x7fffffff; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ------------------------------------------------------------------------------------------
// Reductions of non-negative, non-NaN floats.

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax_nn(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Max over the whole block; every thread gets the result. All threads must call it.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float smem[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = lane < nwarps ? smem[lane] : 0.0f;
  return warp_max(v);
}

// Sum over the whole block in a fixed order (so the result is deterministic); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float smem[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fadd(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = lane < nwarps ? smem[lane] : 0.0f;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fadd(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// ------------------------------------------------------------------------------------------
// Chunked streaming kernels. Block b covers chunk (b % chunks_per_group) of group
// (b / chunks_per_group): elements [g * group_size + c * chunk, ... + min(chunk, rest)).
// With VEC, every chunk starts on a 16-byte boundary (checked by the launcher), and a chunk's
// last len % W elements are done one by one.

struct ChunkGrid {
  int64_t group_size;
  int64_t chunk;
  int64_t chunks_per_group;
};

__device__ __forceinline__ void chunk_range(const ChunkGrid& grid, int64_t* group, int64_t* start, int64_t* len) {
  const int64_t b = blockIdx.x;
  const int64_t g = b / grid.chunks_per_group;
  const int64_t c = b - g * grid.chunks_per_group;
  const int64_t off = c * grid.chunk;
  *group = g;
  *start = g * grid.group_size + off;
  *len = min(grid.chunk, grid.group_size - off);
}

// Per-chunk maximum of finite |x| into partials[blockIdx.x].
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) absmax_partial_kernel(const T* __restrict__ x, ChunkGrid grid,
                                                                  float* __restrict__ partials) {
  constexpr int W = pack_width<T, VEC>();
  using P = Pack<T, W>;
  int64_t g, start, len;
  chunk_range(grid, &g, &start, &len);
  const P* src = reinterpret_cast<const P*>(x + start);
  const int64_t npacks = len / W;
  float m = 0.0f;
  int64_t i = threadIdx.x;
  for (; i + int64_t{kUnroll - 1} * kThreads < npacks; i += int64_t{kThreads} * kUnroll) {
    P p[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) p[k] = src[i + k * kThreads];  // all loads in flight first
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
      for (int e = 0; e < W; ++e) m = fmax_nn(m, finite_abs(to_f(p[k].v[e])));
    }
  }
  for (; i < npacks; i += kThreads) {
    const P p = src[i];
#pragma unroll
    for (int e = 0; e < W; ++e) m = fmax_nn(m, finite_abs(to_f(p.v[e])));
  }
  for (int64_t i = npacks * W + threadIdx.x; i < len; i += kThreads) m = fmax_nn(m, finite_abs(to_f(x[start + i])));
  m = block_max(m);
  if (threadIdx.x == 0) partials[blockIdx.x] = m;
}

// running_absmax[0] = ema(running_absmax[0], max(partials), momentum), one block.
__global__ void __launch_bounds__(1024) ema_finalize_kernel(const float* __restrict__ partials, int64_t num_partials,
                                                            float* __restrict__ running_absmax, float momentum) {
  float m = 0.0f;
  for (int64_t i = threadIdx.x; i < num_partials; i += blockDim.x) m = fmax_nn(m, partials[i]);
  m = block_max(m);
  if (threadIdx.x == 0) running_absmax[0] = ema_update(running_absmax[0], m, momentum);
}

// scales[g] = scale of max(partials[g * chunks_per_group ...]); one warp per group.
__global__ void __launch_bounds__(kThreads) scales_finalize_kernel(const float* __restrict__ partials,
                                                                   int64_t num_groups, int64_t chunks_per_group,
                                                                   float* __restrict__ scales, float qmax) {
  const int64_t g = (int64_t{blockIdx.x} * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (g >= num_groups) return;  // whole warps
  float m = 0.0f;
  for (int64_t c = lane; c < chunks_per_group; c += 32) m = fmax_nn(m, partials[g * chunks_per_group + c]);
  m = warp_max(m);
  if (lane == 0) scales[g] = scale_from_absmax(m, qmax);
}

// out = fake_quant(x) per chunk. FROM_RUNNING: the scale comes from running[0] (per-tensor; a
// negative value means uninitialised, then out = x); otherwise scale = scales[group].
template <typename T, bool VEC, bool FROM_RUNNING>
__global__ void __launch_bounds__(kThreads) quantize_chunks_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                                   ChunkGrid grid, const float* __restrict__ scale_src,
                                                                   float qmax) {
  constexpr int W = pack_width<T, VEC>();
  using P = Pack<T, W>;
  int64_t g, start, len;
  chunk_range(grid, &g, &start, &len);
  float scale;
  bool identity = false;
  if (FROM_RUNNING) {
    const float r = scale_src[0];
    identity = r < 0.0f;
    scale = scale_from_absmax(r, qmax);
  } else {
    scale = scale_src[g];
  }
  const P* src = reinterpret_cast<const P*>(x + start);
  P* dst = reinterpret_cast<P*>(out + start);
  const int64_t npacks = len / W;
  auto quantize = [&](P& p) {
    if (!identity) {
#pragma unroll
      for (int e = 0; e < W; ++e) p.v[e] = from_f<T>(fake_quant(to_f(p.v[e]), scale, qmax));
    }
  };
  int64_t i = threadIdx.x;
  for (; i + int64_t{kUnroll - 1} * kThreads < npacks; i += int64_t{kThreads} * kUnroll) {
    P p[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) p[k] = src[i + k * kThreads];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      quantize(p[k]);
      dst[i + k * kThreads] = p[k];
    }
  }
  for (; i < npacks; i += kThreads) {
    P p = src[i];
    quantize(p);
    dst[i] = p;
  }
  for (int64_t i = npacks * W + threadIdx.x; i < len; i += kThreads) {
    const T v = x[start + i];
    out[start + i] = identity ? v : from_f<T>(fake_quant(to_f(v), scale, qmax));
  }
}

// out = keep ? grad : 0 per chunk (one group: the whole tensor). VEC only when G == X.
// THRESHOLD (a learned threshold's backward): also partials[blockIdx.x] = the chunk's
// sum(grad * threshold_grad_term) (0 when running[0] < 0), per thread in a fixed order, then
// block_sum (fixed order): deterministic.
template <typename G, typename X, bool VEC, bool THRESHOLD>
__global__ void __launch_bounds__(kThreads) ste_chunks_kernel(const G* __restrict__ grad, const X* __restrict__ x,
                                                              G* __restrict__ out, ChunkGrid grid,
                                                              const float* __restrict__ running, float qmax,
                                                              float* __restrict__ partials) {
  constexpr int W = pack_width<G, VEC>();
  static_assert(!VEC || std::is_same<G, X>::value, "the vector path needs one dtype");
  using PG = Pack<G, W>;
  using PX = Pack<X, W>;
  int64_t g, start, len;
  chunk_range(grid, &g, &start, &len);
  const float r = running[0];
  const bool pass_all = r < 0.0f;
  const float scale = scale_from_absmax(r, qmax);
  const G zero = from_f<G>(0.0f);
  const PG* gsrc = reinterpret_cast<const PG*>(grad + start);
  const PX* xsrc = reinterpret_cast<const PX*>(x + start);
  PG* dst = reinterpret_cast<PG*>(out + start);
  const int64_t npacks = len / W;
  float acc = 0.0f;  // THRESHOLD only
  auto mask = [&](PG& pg, const PX& px) {
#pragma unroll
    for (int e = 0; e < W; ++e) {
      if constexpr (THRESHOLD) {
        if (!pass_all) {
          const float xv = to_f(px.v[e]);
          acc = fadd(acc, fmul(to_f(pg.v[e]), threshold_grad_term(xv, scale, qmax)));
          if (!ste_keep(xv, scale, qmax)) pg.v[e] = zero;
        }
      } else {
        if (!(pass_all || ste_keep(to_f(px.v[e]), scale, qmax))) pg.v[e] = zero;
      }
    }
  };
  int64_t i = threadIdx.x;
  for (; i + int64_t{kUnroll - 1} * kThreads < npacks; i += int64_t{kThreads} * kUnroll) {
    PG pg[kUnroll];
    PX px[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      pg[k] = gsrc[i + k * kThreads];
      px[k] = xsrc[i + k * kThreads];
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      mask(pg[k], px[k]);
      dst[i + k * kThreads] = pg[k];
    }
  }
  for (; i < npacks; i += kThreads) {
    PG pg = gsrc[i];
    mask(pg, xsrc[i]);
    dst[i] = pg;
  }
  for (int64_t i = npacks * W + threadIdx.x; i < len; i += kThreads) {
    const float xv = to_f(x[start + i]);
    const G gv = grad[start + i];
    const bool keep = pass_all || ste_keep(xv, scale, qmax);
    out[start + i] = keep ? gv : zero;
    if constexpr (THRESHOLD) {
      if (!pass_all) acc = fadd(acc, fmul(to_f(gv), threshold_grad_term(xv, scale, qmax)));
    }
  }
  if constexpr (THRESHOLD) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
  }
}

// grad_threshold[0] = sum(partials) / qmax (0 when running[0] < 0 or there are no partials),
// one block, fixed order: deterministic.
__global__ void __launch_bounds__(1024) threshold_finalize_kernel(const float* __restrict__ partials,
                                                                  int64_t num_partials,
                                                                  const float* __restrict__ running,
                                                                  float* __restrict__ grad_threshold, float qmax) {
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < num_partials; i += blockDim.x) s = fadd(s, partials[i]);
  s = block_sum(s);
  if (threadIdx.x == 0) grad_threshold[0] = running[0] < 0.0f ? 0.0f : fdiv(s, qmax);
}

// ------------------------------------------------------------------------------------------
// Single-pass per-channel kernel: TPG threads per group (TPG in {32, 64, 128, 256}), each holding
// up to kItemsPerThread elements in registers, so a group is read once and written once.

template <typename T, bool VEC, int TPG>
__global__ void __launch_bounds__(kThreads) per_channel_regs_kernel(const T* __restrict__ w, T* __restrict__ out,
                                                                    float* __restrict__ scales, int64_t num_groups,
                                                                    int64_t group_size, float qmax) {
  constexpr int W = pack_width<T, VEC>();
  constexpr int NP = kItemsPerThread / W;  // packs per thread
  constexpr int kGroupsPerBlock = kThreads / TPG;
  using P = Pack<T, W>;
  const int tig = threadIdx.x % TPG;  // thread in group
  const int64_t g = int64_t{blockIdx.x} * kGroupsPerBlock + threadIdx.x / TPG;
  const bool valid = g < num_groups;  // no early return: the block reduction below syncs
  const int64_t npacks = valid ? group_size / W : 0;
  const P* src = reinterpret_cast<const P*>(w + (valid ? g * group_size : 0));
  P* dst = reinterpret_cast<P*>(out + (valid ? g * group_size : 0));

  P p[NP];
#pragma unroll
  for (int k = 0; k < NP; ++k) {
    const int64_t j = tig + int64_t{k} * TPG;
    if (j < npacks) p[k] = src[j];
  }
  float m = 0.0f;
#pragma unroll
  for (int k = 0; k < NP; ++k) {
    if (tig + int64_t{k} * TPG < npacks) {
#pragma unroll
      for (int e = 0; e < W; ++e) m = fmax_nn(m, finite_abs(to_f(p[k].v[e])));
    }
  }
  m = warp_max(m);
  if constexpr (TPG > 32) {
    __shared__ float smem[kThreads / 32];
    if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = m;
    __syncthreads();
    const int first = (threadIdx.x / TPG) * (TPG / 32);
#pragma unroll
    for (int k = 0; k < TPG / 32; ++k) m = fmax_nn(m, smem[first + k]);
  }
  if (!valid) return;
  const float scale = scale_from_absmax(m, qmax);
  if (tig == 0) scales[g] = scale;
#pragma unroll
  for (int k = 0; k < NP; ++k) {
    const int64_t j = tig + int64_t{k} * TPG;
    if (j < npacks) {
#pragma unroll
      for (int e = 0; e < W; ++e) p[k].v[e] = from_f<T>(fake_quant(to_f(p[k].v[e]), scale, qmax));
      dst[j] = p[k];
    }
  }
}

// ------------------------------------------------------------------------------------------
// BN fold + per-group fake quantization of a weight [rows, row_len]. Weights are small (they
// stay in L2), so these favour simplicity: the scale pass and the quantize pass each read w.

// One block per group: scales[g] from the folded rows' finite absmax; folded biases of its rows.
template <typename T>
__global__ void __launch_bounds__(kThreads) fold_scales_kernel(const T* __restrict__ w, T* __restrict__ bias_out,
                                                               float* __restrict__ scales, int64_t rows_per_group,
                                                               int64_t row_len, FoldVectors v, float qmax) {
  const int64_t g = blockIdx.x;
  const int64_t r0 = g * rows_per_group;
  const int64_t n = rows_per_group * row_len;
  const T* src = w + r0 * row_len;
  float m = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const int64_t r = r0 + i / row_len;
    m = fmax_nn(m, finite_abs(fmul(to_f(src[i]), fold_scale(v.gamma, v.inv_std, r))));
  }
  m = block_max(m);
  if (threadIdx.x == 0) scales[g] = scale_from_absmax(m, qmax);
  for (int64_t r = r0 + threadIdx.x; r < r0 + rows_per_group; r += kThreads) {
    bias_out[r] = from_f<T>(fold_bias(v.beta, v.bias, v.mean, r, fold_scale(v.gamma, v.inv_std, r)));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fold_quantize_kernel(const T* __restrict__ w, T* __restrict__ out,
                                                                 const float* __restrict__ scales, int64_t n,
                                                                 int64_t row_len, int64_t rows_per_group,
                                                                 FoldVectors v, float qmax) {
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / row_len;
    const float s = fold_scale(v.gamma, v.inv_std, r);
    out[i] = from_f<T>(fake_quant(fmul(to_f(w[i]), s), scales[r / rows_per_group], qmax));
  }
}

// One block per row: grad_w = grad * s, dot = sum(grad * w), then the row's vector gradients.
template <typename T>
__global__ void __launch_bounds__(kThreads) fold_backward_kernel(const T* __restrict__ grad, const T* __restrict__ w,
                                                                 T* __restrict__ grad_w,
                                                                 const float* __restrict__ grad_bias,
                                                                 float* __restrict__ vecs, int64_t rows,
                                                                 int64_t row_len, FoldVectors v) {
  const int64_t c = blockIdx.x;
  const float s = fold_scale(v.gamma, v.inv_std, c);
  const int64_t base = c * row_len;
  float dot = 0.0f;
  for (int64_t k = threadIdx.x; k < row_len; k += kThreads) {
    const float gk = to_f(grad[base + k]);
    dot = fadd(dot, fmul(gk, to_f(w[base + k])));
    grad_w[base + k] = from_f<T>(fmul(gk, s));
  }
  dot = block_sum(dot);
  if (threadIdx.x == 0) fold_vector_grads(dot, grad_bias[c], v.bias, v.mean, v.inv_std, c, s, vecs, rows);
}

// ------------------------------------------------------------------------------------------
// Launch helpers.

// Elements per block of the chunked kernels: about 4 blocks per SM for small inputs, capped
// so that large inputs get many blocks; a multiple of 1024 (whole 16-byte vectors per thread).
int64_t chunk_elems(int64_t total, int sm_count) {
  const int64_t per_block = ceil_div(total, int64_t{sm_count > 0 ? sm_count : 1} * 4);
  const int64_t rounded = ceil_div(per_block, kMinChunk) * kMinChunk;
  return rounded < kMinChunk ? kMinChunk : (rounded > kMaxChunk ? kMaxChunk : rounded);
}

ChunkGrid make_grid(int64_t group_size, int sm_count, int64_t num_groups) {
  ChunkGrid grid;
  grid.group_size = group_size;
  grid.chunk = chunk_elems(group_size * num_groups, sm_count);
  if (grid.chunk > group_size && group_size > 0) grid.chunk = ceil_div(group_size, kMinChunk) * kMinChunk;
  grid.chunks_per_group = group_size > 0 ? ceil_div(group_size, grid.chunk) : 0;
  return grid;
}

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

template <typename T, bool VEC>
void launch_regs(const T* w, T* out, float* scales, int64_t num_groups, int64_t gs, float qmax, cudaStream_t s) {
  // Smallest group width whose registers hold the group.
  if (gs <= 32 * kItemsPerThread) {
    const int64_t blocks = ceil_div(num_groups, kThreads / 32);
    per_channel_regs_kernel<T, VEC, 32><<<blocks, kThreads, 0, s>>>(w, out, scales, num_groups, gs, qmax);
  } else if (gs <= 64 * kItemsPerThread) {
    const int64_t blocks = ceil_div(num_groups, kThreads / 64);
    per_channel_regs_kernel<T, VEC, 64><<<blocks, kThreads, 0, s>>>(w, out, scales, num_groups, gs, qmax);
  } else if (gs <= 128 * kItemsPerThread) {
    const int64_t blocks = ceil_div(num_groups, kThreads / 128);
    per_channel_regs_kernel<T, VEC, 128><<<blocks, kThreads, 0, s>>>(w, out, scales, num_groups, gs, qmax);
  } else {
    per_channel_regs_kernel<T, VEC, 256><<<num_groups, kThreads, 0, s>>>(w, out, scales, num_groups, gs, qmax);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Public launchers.

int64_t update_absmax_scratch_size(int64_t n, int sm_count) {
  if (n <= 0) return 1;
  return make_grid(n, sm_count, 1).chunks_per_group;
}

cudaError_t launch_update_absmax(const void* x, DType dtype, int64_t n, float* running_absmax, float momentum,
                                 float* scratch, int sm_count, cudaStream_t stream) {
  int64_t num_partials = 0;
  if (n > 0) {
    const ChunkGrid grid = make_grid(n, sm_count, 1);
    num_partials = grid.chunks_per_group;
    if (!grid_ok(num_partials)) return cudaErrorInvalidConfiguration;
    const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      const T* p = static_cast<const T*>(x);
      if (aligned16(p)) {
        absmax_partial_kernel<T, true><<<num_partials, kThreads, 0, stream>>>(p, grid, scratch);
      } else {
        absmax_partial_kernel<T, false><<<num_partials, kThreads, 0, stream>>>(p, grid, scratch);
      }
    });
    if (err != cudaSuccess) return err;
  }
  ema_finalize_kernel<<<1, 1024, 0, stream>>>(scratch, num_partials, running_absmax, momentum);
  return cudaGetLastError();
}

cudaError_t launch_fake_quantize_per_tensor(const void* x, void* out, DType dtype, int64_t n,
                                            const float* running_absmax, int bits, int sm_count,
                                            cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const ChunkGrid grid = make_grid(n, sm_count, 1);
  if (!grid_ok(grid.chunks_per_group)) return cudaErrorInvalidConfiguration;
  const float qmax = qmax_of(bits);
  const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(x);
    T* dst = static_cast<T*>(out);
    const int64_t blocks = grid.chunks_per_group;
    if (aligned16(src) && aligned16(dst)) {
      quantize_chunks_kernel<T, true, true><<<blocks, kThreads, 0, stream>>>(src, dst, grid, running_absmax, qmax);
    } else {
      quantize_chunks_kernel<T, false, true><<<blocks, kThreads, 0, stream>>>(src, dst, grid, running_absmax, qmax);
    }
  });
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

cudaError_t launch_fake_quantize_per_tensor_backward(const void* grad, DType grad_dtype, const void* x,
                                                     DType x_dtype, void* out, int64_t n,
                                                     const float* running_absmax, int bits, int sm_count,
                                                     cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const ChunkGrid grid = make_grid(n, sm_count, 1);
  const float qmax = qmax_of(bits);
  const int64_t blocks = grid.chunks_per_group;
  if (!grid_ok(blocks)) return cudaErrorInvalidConfiguration;
  cudaError_t inner = cudaSuccess;
  const cudaError_t err = dispatch_dtype(grad_dtype, [&](auto gtag) {
    using G = decltype(gtag);
    inner = dispatch_dtype(x_dtype, [&](auto xtag) {
      using X = decltype(xtag);
      const G* gp = static_cast<const G*>(grad);
      const X* xp = static_cast<const X*>(x);
      G* op = static_cast<G*>(out);
      if constexpr (std::is_same<G, X>::value) {
        if (aligned16(gp) && aligned16(xp) && aligned16(op)) {
          ste_chunks_kernel<G, X, true, false>
              <<<blocks, kThreads, 0, stream>>>(gp, xp, op, grid, running_absmax, qmax, nullptr);
          return;
        }
      }
      ste_chunks_kernel<G, X, false, false>
          <<<blocks, kThreads, 0, stream>>>(gp, xp, op, grid, running_absmax, qmax, nullptr);
    });
  });
  if (err != cudaSuccess) return err;
  if (inner != cudaSuccess) return inner;
  return cudaGetLastError();
}

int64_t threshold_backward_scratch_size(int64_t n, int sm_count) {
  if (n <= 0) return 1;
  return make_grid(n, sm_count, 1).chunks_per_group;
}

cudaError_t launch_fake_quantize_per_tensor_threshold_backward(const void* grad, DType grad_dtype, const void* x,
                                                               DType x_dtype, void* grad_x, float* grad_threshold,
                                                               int64_t n, const float* running_absmax, int bits,
                                                               float* scratch, int sm_count, cudaStream_t stream) {
  const float qmax = qmax_of(bits);
  int64_t blocks = 0;
  if (n > 0) {
    const ChunkGrid grid = make_grid(n, sm_count, 1);
    blocks = grid.chunks_per_group;
    if (!grid_ok(blocks)) return cudaErrorInvalidConfiguration;
    cudaError_t inner = cudaSuccess;
    const cudaError_t err = dispatch_dtype(grad_dtype, [&](auto gtag) {
      using G = decltype(gtag);
      inner = dispatch_dtype(x_dtype, [&](auto xtag) {
        using X = decltype(xtag);
        const G* gp = static_cast<const G*>(grad);
        const X* xp = static_cast<const X*>(x);
        G* op = static_cast<G*>(grad_x);
        if constexpr (std::is_same<G, X>::value) {
          if (aligned16(gp) && aligned16(xp) && aligned16(op)) {
            ste_chunks_kernel<G, X, true, true>
                <<<blocks, kThreads, 0, stream>>>(gp, xp, op, grid, running_absmax, qmax, scratch);
            return;
          }
        }
        ste_chunks_kernel<G, X, false, true>
            <<<blocks, kThreads, 0, stream>>>(gp, xp, op, grid, running_absmax, qmax, scratch);
      });
    });
    if (err != cudaSuccess) return err;
    if (inner != cudaSuccess) return inner;
  }
  threshold_finalize_kernel<<<1, 1024, 0, stream>>>(scratch, blocks, running_absmax, grad_threshold, qmax);
  return cudaGetLastError();
}

int64_t per_channel_scratch_size(int64_t num_groups, int64_t group_size, DType /*dtype*/, int sm_count) {
  if (group_size <= kRegGroupMax) return 0;
  return num_groups * make_grid(group_size, sm_count, num_groups).chunks_per_group;
}

cudaError_t launch_fake_quantize_per_channel(const void* w, void* out, float* scales, DType dtype,
                                             int64_t num_groups, int64_t group_size, int bits, float* scratch,
                                             int sm_count, cudaStream_t stream) {
  if (num_groups <= 0 || group_size <= 0) return cudaSuccess;  // the binding fills empty groups' scales
  const float qmax = qmax_of(bits);
  const ChunkGrid grid = make_grid(group_size, sm_count, num_groups);
  if (!grid_ok(num_groups) || !grid_ok(num_groups * grid.chunks_per_group) || !grid_ok(num_groups * 32)) {
    return cudaErrorInvalidConfiguration;
  }
  const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(w);
    T* dst = static_cast<T*>(out);
    const bool vec = aligned16(src) && aligned16(dst) && group_size % vec_width<T>() == 0;
    if (group_size <= kRegGroupMax) {
      if (vec) {
        launch_regs<T, true>(src, dst, scales, num_groups, group_size, qmax, stream);
      } else {
        launch_regs<T, false>(src, dst, scales, num_groups, group_size, qmax, stream);
      }
      return;
    }
    const int64_t blocks = num_groups * grid.chunks_per_group;
    const int64_t finalize_blocks = ceil_div(num_groups * 32, kThreads);
    if (vec) {
      absmax_partial_kernel<T, true><<<blocks, kThreads, 0, stream>>>(src, grid, scratch);
      scales_finalize_kernel<<<finalize_blocks, kThreads, 0, stream>>>(scratch, num_groups, grid.chunks_per_group,
                                                                       scales, qmax);
      quantize_chunks_kernel<T, true, false><<<blocks, kThreads, 0, stream>>>(src, dst, grid, scales, qmax);
    } else {
      absmax_partial_kernel<T, false><<<blocks, kThreads, 0, stream>>>(src, grid, scratch);
      scales_finalize_kernel<<<finalize_blocks, kThreads, 0, stream>>>(scratch, num_groups, grid.chunks_per_group,
                                                                       scales, qmax);
      quantize_chunks_kernel<T, false, false><<<blocks, kThreads, 0, stream>>>(src, dst, grid, scales, qmax);
    }
  });
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

cudaError_t launch_fold_fake_quantize_weight(const void* w, void* out, void* bias_out, float* scales, DType dtype,
                                             int64_t rows, int64_t row_len, int64_t num_groups, FoldVectors v,
                                             int bits, int sm_count, cudaStream_t stream) {
  if (rows <= 0 || num_groups <= 0) return cudaSuccess;
  if (!grid_ok(num_groups)) return cudaErrorInvalidConfiguration;
  const float qmax = qmax_of(bits);
  const int64_t rows_per_group = rows / num_groups;
  const int64_t n = rows * row_len;
  const int64_t blocks = n > 0 ? std::min<int64_t>(ceil_div(n, kThreads), int64_t{sm_count > 0 ? sm_count : 1} * 8) : 0;
  const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(w);
    fold_scales_kernel<T><<<num_groups, kThreads, 0, stream>>>(src, static_cast<T*>(bias_out), scales,
                                                               rows_per_group, row_len, v, qmax);
    if (blocks > 0) {
      fold_quantize_kernel<T><<<blocks, kThreads, 0, stream>>>(src, static_cast<T*>(out), scales, n, row_len,
                                                               rows_per_group, v, qmax);
    }
  });
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

cudaError_t launch_fold_fake_quantize_weight_backward(const void* grad, const void* w, void* grad_w,
                                                      const float* grad_bias, float* vecs, DType dtype, int64_t rows,
                                                      int64_t row_len, FoldVectors v, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (!grid_ok(rows)) return cudaErrorInvalidConfiguration;
  const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    fold_backward_kernel<T><<<rows, kThreads, 0, stream>>>(static_cast<const T*>(grad), static_cast<const T*>(w),
                                                           static_cast<T*>(grad_w), grad_bias, vecs, rows, row_len, v);
  });
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ncnnqat
