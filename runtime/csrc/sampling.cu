// DDPM transition on the GPU: posterior mean and learned-range log-variance from (eps, v).
//
// Same semantics as runtime/ops.py::transition (the numpy oracle): per row a respaced step index
// picks a row of the schedule's transition table (runtime/schedule.py::Schedule.transition_table,
// computed once in float64 and passed here as float32). fp32 maths throughout.
#include <cuda_runtime.h>

#include "freedit_kernels.h"

namespace {

enum Column { kSqrtRecipAbar = 0, kSqrtRecipm1Abar, kCoef1, kCoef2, kMinLog, kMaxLog, kColumns };

__global__ void transition_kernel(const float* __restrict__ x, const float* __restrict__ eps_v,
                                  const int* __restrict__ steps, const float* __restrict__ table, int channels,
                                  int pixels, int learn_sigma, float* __restrict__ mean, float* __restrict__ log_var) {
  const int row = blockIdx.y;
  const int per_row = channels * pixels;
  const float* coef = table + steps[row] * kColumns;
  const int out_stride = (learn_sigma ? 2 : 1) * per_row;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < per_row; i += gridDim.x * blockDim.x) {
    const float xi = x[row * per_row + i];
    const float eps = eps_v[row * out_stride + i];
    const float x0 = coef[kSqrtRecipAbar] * xi - coef[kSqrtRecipm1Abar] * eps;
    mean[row * per_row + i] = coef[kCoef1] * x0 + coef[kCoef2] * xi;
    float lv = coef[kMinLog];
    if (learn_sigma) {
      const float frac = 0.5f * (eps_v[row * out_stride + per_row + i] + 1.0f);
      lv = frac * coef[kMaxLog] + (1.0f - frac) * coef[kMinLog];
    }
    log_var[row * per_row + i] = lv;
  }
}

}  // namespace

extern "C" int freedit_transition_f32(const float* x, const float* eps_v, const int* steps, const float* table,
                                      int batch, int channels, int pixels, int learn_sigma, float* mean,
                                      float* log_var, void* stream) {
  if (batch <= 0 || channels <= 0 || pixels <= 0) return cudaErrorInvalidValue;
  const int threads = 256;
  const int blocks_x = (channels * pixels + threads - 1) / threads;
  transition_kernel<<<dim3(blocks_x < 1024 ? blocks_x : 1024, batch), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, eps_v, steps, table, channels, pixels, learn_sigma, mean, log_var);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int freedit_kernels_abi_version(void) { return FREEDIT_KERNELS_ABI_VERSION; }
