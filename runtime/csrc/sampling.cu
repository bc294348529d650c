// Model outputs -> transitions, CFG combination, the DDPM step, and the library's helpers.
//
// Same semantics as runtime/ops.py (the numpy oracle): transition, cfg_combine, ddpm_step. Per row
// a respaced step index picks a row of Schedule.transition_table() (float64 there, fp32 here);
// fp32 maths throughout, model outputs read as fp32, fp16 or bf16.
#include "round_maths.cuh"

namespace freedit {
namespace {

template <typename T>
__global__ void transition_kernel(const float* __restrict__ x, const T* __restrict__ eps_v,
                                  const int* __restrict__ steps, const float* __restrict__ table, int num_steps,
                                  int rows, int per_row, int variance, float* __restrict__ mean,
                                  float* __restrict__ log_var) {
  const size_t total = static_cast<size_t>(rows) * per_row;
  const size_t out_stride = static_cast<size_t>(variance == FREEDIT_VARIANCE_LEARNED ? 2 : 1) * per_row;
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = idx / per_row, i = idx - row * per_row;
    const int step = steps[row];
    if (step < 0 || step >= num_steps) {
      mean[idx] = log_var[idx] = __int_as_float(0x7fc00000);  // NaN: a bad step never reads out of range
      continue;
    }
    const float v = variance == FREEDIT_VARIANCE_LEARNED ? load(eps_v, row * out_stride + per_row + i) : 0.0f;
    transition_element(table, step, variance, x[idx], load(eps_v, row * out_stride + i), v, &mean[idx], &log_var[idx]);
  }
}

template <typename T>
__global__ void cfg_kernel(const T* __restrict__ eps_v, int rows, int row_elems, int guided_elems, float scale,
                           float* __restrict__ out) {
  const size_t total = static_cast<size_t>(rows) * row_elems;
  const size_t null_offset = total;  // null rows follow all conditional rows
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t i = idx % row_elems;
    const float c = load(eps_v, idx);
    if (i < static_cast<size_t>(guided_elems)) {
      const float u = load(eps_v, null_offset + idx);
      out[idx] = cfg_element(c, u, scale);  // numpy's roundings: bit-identical for fp32 inputs
    } else {
      out[idx] = c;
    }
  }
}

// out may alias mean (or noise): each element is read, then written, by one thread.
__global__ void ddpm_step_kernel(const float* mean, const float* __restrict__ log_var, const int* __restrict__ steps,
                                 const float* noise, int rows, int per_row, float* out) {
  const size_t total = static_cast<size_t>(rows) * per_row;
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = idx / per_row;
    const float m = mean[idx];
    out[idx] = steps[row] == 0 ? m : __fadd_rn(m, __fmul_rn(expf(0.5f * log_var[idx]), noise[idx]));
  }
}

template <typename T>
int launch_transition(const float* x, const void* eps_v, const int* steps, const float* table, int num_steps,
                      int rows, int per_row, int variance, float* mean, float* log_var, cudaStream_t stream) {
  FREEDIT_LAUNCH(transition_kernel<T>, grid_for(static_cast<size_t>(rows) * per_row), kThreads, 0, stream)(
      x, static_cast<const T*>(eps_v), steps, table, num_steps, rows, per_row, variance, mean, log_var);
  return finish_launch();
}

template <typename T>
int launch_cfg(const void* eps_v, int rows, int row_elems, int guided_elems, float scale, float* out,
               cudaStream_t stream) {
  FREEDIT_LAUNCH(cfg_kernel<T>, grid_for(static_cast<size_t>(rows) * row_elems), kThreads, 0, stream)(
      static_cast<const T*>(eps_v), rows, row_elems, guided_elems, scale, out);
  return finish_launch();
}

}  // namespace
}  // namespace freedit

using namespace freedit;

extern "C" int freedit_kernels_abi_version(void) { return FREEDIT_KERNELS_ABI_VERSION; }

extern "C" const char* freedit_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

extern "C" const char* freedit_error_name(int code) { return cudaGetErrorName(static_cast<cudaError_t>(code)); }

extern "C" int freedit_device_count(int* count) {
  if (!count) return cudaErrorInvalidValue;
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) *count = 0;
  return static_cast<int>(err);
}

extern "C" int freedit_pointer_memory_type(const void* ptr, int* memory_type) {
  if (!memory_type) return cudaErrorInvalidValue;
  cudaPointerAttributes attributes{};
  const cudaError_t err = cudaPointerGetAttributes(&attributes, ptr);
  *memory_type = err == cudaSuccess ? static_cast<int>(attributes.type) : -1;
  if (err != cudaSuccess) cudaGetLastError();  // so a later launch check does not report this query's error
  return static_cast<int>(err);
}

extern "C" int freedit_pointer_device(const void* ptr, int* device) {
  if (!device) return cudaErrorInvalidValue;
  cudaPointerAttributes attributes{};
  const cudaError_t err = cudaPointerGetAttributes(&attributes, ptr);
  *device = err == cudaSuccess ? attributes.device : -1;
  if (err != cudaSuccess) cudaGetLastError();
  return static_cast<int>(err);
}

extern "C" int freedit_transition(const float* x, const void* eps_v, int eps_dtype, const int* steps,
                                  const float* table, int num_steps, int rows, int channels, int pixels, int variance,
                                  float* mean, float* log_var, void* stream) {
  if (!x || !eps_v || !steps || !table || !mean || !log_var) return cudaErrorInvalidValue;
  if (rows <= 0 || channels <= 0 || pixels <= 0 || num_steps <= 0) return cudaErrorInvalidValue;
  if (variance < FREEDIT_VARIANCE_FIXED_SMALL || variance > FREEDIT_VARIANCE_FIXED_LARGE) return cudaErrorInvalidValue;
  const int per_row = channels * pixels;
  switch (eps_dtype) {
    case FREEDIT_DTYPE_F32:
      return launch_transition<float>(x, eps_v, steps, table, num_steps, rows, per_row, variance, mean, log_var,
                                      as_stream(stream));
    case FREEDIT_DTYPE_F16:
      return launch_transition<__half>(x, eps_v, steps, table, num_steps, rows, per_row, variance, mean, log_var,
                                       as_stream(stream));
    case FREEDIT_DTYPE_BF16:
      return launch_transition<__nv_bfloat16>(x, eps_v, steps, table, num_steps, rows, per_row, variance, mean,
                                              log_var, as_stream(stream));
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" int freedit_cfg_combine(const void* eps_v, int eps_dtype, int rows, int channels, int out_channels,
                                   int pixels, float scale, int mode, float* out, void* stream) {
  if (!eps_v || !out || rows <= 0 || channels <= 0 || pixels <= 0 || out_channels < channels)
    return cudaErrorInvalidValue;
  int guided;
  if (mode == FREEDIT_CFG_ALL) {
    guided = channels;
  } else if (mode == FREEDIT_CFG_REFERENCE) {
    guided = channels < 3 ? channels : 3;
  } else {
    return cudaErrorInvalidValue;
  }
  const int row_elems = out_channels * pixels, guided_elems = guided * pixels;
  switch (eps_dtype) {
    case FREEDIT_DTYPE_F32:
      return launch_cfg<float>(eps_v, rows, row_elems, guided_elems, scale, out, as_stream(stream));
    case FREEDIT_DTYPE_F16:
      return launch_cfg<__half>(eps_v, rows, row_elems, guided_elems, scale, out, as_stream(stream));
    case FREEDIT_DTYPE_BF16:
      return launch_cfg<__nv_bfloat16>(eps_v, rows, row_elems, guided_elems, scale, out, as_stream(stream));
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" int freedit_ddpm_step(const float* mean, const float* log_var, const int* steps, const float* noise,
                                 int rows, int per_row, float* out, void* stream) {
  if (!mean || !log_var || !steps || !noise || !out || rows <= 0 || per_row <= 0) return cudaErrorInvalidValue;
  FREEDIT_LAUNCH(ddpm_step_kernel, grid_for(static_cast<size_t>(rows) * per_row), kThreads, 0, as_stream(stream))(
      mean, log_var, steps, noise, rows, per_row, out);
  return finish_launch();
}
