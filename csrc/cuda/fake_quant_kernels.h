// Launchers of the ncnnqat CUDA kernels: raw device pointers and a stream, no torch types, so
// fake_quant_kernels.cu builds with plain nvcc. fake_quant_cuda.cpp binds them to the operators.
//
// Every launcher enqueues work on `stream` only (no host synchronisation, no allocation) and
// returns cudaGetLastError() after its launches. Outputs are contiguous buffers of `n` elements
// of the input's dtype; scalars that live on the device (running_absmax) are read on the device.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ncnnqat {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Number of floats of device scratch that launch_update_absmax needs.
int64_t update_absmax_scratch_size(int64_t n, int sm_count);

// running_absmax[0] = ema(running_absmax[0], max finite |x|, momentum): a partial-max kernel
// writes per-block maxima into `scratch`, a one-block kernel reduces them and updates the EMA.
cudaError_t launch_update_absmax(const void* x, DType dtype, int64_t n, float* running_absmax, float momentum,
                                 float* scratch, int sm_count, cudaStream_t stream);

// out = fake_quant(x) with the scale of running_absmax[0] (read on the device); out = x when it is < 0.
cudaError_t launch_fake_quantize_per_tensor(const void* x, void* out, DType dtype, int64_t n,
                                            const float* running_absmax, int bits, int sm_count,
                                            cudaStream_t stream);

// out = grad where |x * scale| < qmax + 0.5 (or running_absmax[0] < 0), else 0.
cudaError_t launch_fake_quantize_per_tensor_backward(const void* grad, DType grad_dtype, const void* x,
                                                     DType x_dtype, void* out, int64_t n,
                                                     const float* running_absmax, int bits, int sm_count,
                                                     cudaStream_t stream);

// Number of floats of device scratch that launch_fake_quantize_per_tensor_threshold_backward needs.
int64_t threshold_backward_scratch_size(int64_t n, int sm_count);

// Backward for a learned threshold t = running_absmax[0]: grad_x as the launcher above, and
// grad_threshold[0] = sum(grad * d out / d t) (see ../fake_quant_math.h, threshold_grad_term),
// 0 when running_absmax[0] < 0. Per-block partial sums go to `scratch`, then a one-block kernel
// adds them; every sum is in a fixed order, so the result is deterministic (for a given GPU's
// SM count, which sizes the grid), and float32 throughout.
cudaError_t launch_fake_quantize_per_tensor_threshold_backward(const void* grad, DType grad_dtype, const void* x,
                                                               DType x_dtype, void* grad_x, float* grad_threshold,
                                                               int64_t n, const float* running_absmax, int bits,
                                                               float* scratch, int sm_count, cudaStream_t stream);

// Number of floats of device scratch that launch_fake_quantize_per_channel needs (0 when every
// group fits in one block's registers, the single-pass path).
int64_t per_channel_scratch_size(int64_t num_groups, int64_t group_size, DType dtype, int sm_count);

// Per group g of `group_size` consecutive elements: scales[g] = scale of the group's finite
// absmax, out = fake_quant(w, scales[g]). Groups of up to a few thousand elements are read once
// (kept in registers); larger ones take a partial-max, a scale and a quantize kernel.
cudaError_t launch_fake_quantize_per_channel(const void* w, void* out, float* scales, DType dtype,
                                             int64_t num_groups, int64_t group_size, int bits, float* scratch,
                                             int sm_count, cudaStream_t stream);

// The per-output-channel float32 vectors of a BatchNorm fold (see ../fake_quant_math.h, fold_*):
// bias, gamma and beta may be null (no layer bias, a BN without affine parameters).
struct FoldVectors {
  const float* bias;
  const float* gamma;
  const float* beta;
  const float* mean;
  const float* inv_std;
};

// w is [rows, row_len]; row r is scaled by s[r] = fold_scale(r), then fake-quantized per group of
// rows / num_groups consecutive rows: scales[g], out (w's dtype), and bias_out[r] = fold_bias(r)
// (w's dtype). One block per group finds the scales and writes the biases, then a streaming
// kernel quantizes.
cudaError_t launch_fold_fake_quantize_weight(const void* w, void* out, void* bias_out, float* scales, DType dtype,
                                             int64_t rows, int64_t row_len, int64_t num_groups, FoldVectors v,
                                             int bits, int sm_count, cudaStream_t stream);

// Straight-through backward of the above, one block per row: grad_w = grad * s[r] (w's dtype),
// and vecs (float32 [3, rows]) = fold_vector_grads of dot = sum(grad * w) (a fixed-order, so
// deterministic, float32 block sum) and grad_bias[r]. grad has w's dtype.
cudaError_t launch_fold_fake_quantize_weight_backward(const void* grad, const void* w, void* grad_w,
                                                      const float* grad_bias, float* vecs, DType dtype, int64_t rows,
                                                      int64_t row_len, FoldVectors v, cudaStream_t stream);

// ncnn's dynamic int8 quantization (dynamic_quant_kernels.cu): per group g of `n` consecutive
// elements, absmax[g] = max finite |x| and scale[g] = 127 / absmax (1 when 0), both NaN for a group
// holding a NaN; out = int8 levels (`levels`) or float32 level / scale (0 / NaN in a NaN group).
cudaError_t launch_dynamic_quantize(const void* x, DType dtype, void* out, bool levels, float* absmax, float* scale,
                                    int64_t groups, int64_t n, int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace ncnnqat
