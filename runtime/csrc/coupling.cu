// The exact coupling of speculative sampling on device, as runtime/coupling.py (the numpy oracle):
// the accept statistic, the ragged accept test with per-sample first rejection, the reflection
// coupling (equal covariances) and rejection sampling of the residual (q - p)^+ with in-kernel
// keyed Philox noise (unequal covariances). Row reductions accumulate in double, in a fixed order.
#include "round_maths.cuh"

namespace freedit {
namespace {

constexpr int kAcceptThreads = 1024;

// ---- log q(x) - log p(x) per row ----------------------------------------------------------------
__global__ void log_ratio_kernel(const float* __restrict__ x, const float* __restrict__ mean_p,
                                 const float* __restrict__ log_var_p, const float* __restrict__ mean_q,
                                 const float* __restrict__ log_var_q, int per_row, double* __restrict__ out) {
  __shared__ double scratch[32];
  const size_t base = static_cast<size_t>(blockIdx.x) * per_row;
  double acc = 0.0;
  for (int i = threadIdx.x; i < per_row; i += blockDim.x)
    acc += log_ratio_term(x[base + i], mean_p[base + i], log_var_p[base + i], mean_q[base + i], log_var_q[base + i]);
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}

// ---- ragged accept test -------------------------------------------------------------------------
// One block: an exclusive scan of the windows gives each sample its first row; each thread then
// walks its sample's positions in order until the first rejection.
__global__ void accept_window_kernel(const double* __restrict__ log_r, const double* __restrict__ uniform,
                                     const double* __restrict__ gamma, int rows, const int* __restrict__ windows,
                                     int samples, int* __restrict__ accepted, int* __restrict__ reject_row) {
  __shared__ long long scan[kAcceptThreads];
  __shared__ long long carry;
  __shared__ int bad;
  if (threadIdx.x == 0) {
    carry = 0;
    bad = 0;
  }
  __syncthreads();
  for (int base = 0; base < samples; base += blockDim.x) {
    const int s = base + threadIdx.x;
    const int w = s < samples ? windows[s] : 0;
    if (w < 0) bad = 1;
    scan[threadIdx.x] = w > 0 ? w : 0;
    __syncthreads();
    for (int offset = 1; offset < blockDim.x; offset <<= 1) {  // Hillis-Steele inclusive scan
      const long long add = threadIdx.x >= offset ? scan[threadIdx.x - offset] : 0;
      __syncthreads();
      scan[threadIdx.x] += add;
      __syncthreads();
    }
    if (s < samples) {
      const long long first = carry + scan[threadIdx.x] - (w > 0 ? w : 0);
      int k = 0;
      if (w >= 0 && first + w <= rows) {
        for (; k < w; ++k) {
          const long long row = first + k;
          if (!accepted_at(log_r[row], uniform[row], gamma ? gamma[row] : 1.0)) break;
        }
        accepted[s] = k;
        if (reject_row) reject_row[s] = k < w ? static_cast<int>(first + k) : -1;
      } else {
        bad = 1;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) carry += scan[blockDim.x - 1];
    __syncthreads();
  }
  if (bad || carry != rows) {  // windows inconsistent with the rows: flag every sample
    for (int s = threadIdx.x; s < samples; s += blockDim.x) {
      accepted[s] = -1;
      if (reject_row) reject_row[s] = -1;
    }
  }
}

// ---- reflection coupling ------------------------------------------------------------------------
__global__ void reflect_kernel(const float* __restrict__ x, const float* __restrict__ mean_p,
                               const float* __restrict__ mean_q, const float* __restrict__ log_var, int in_rows,
                               int per_row, const int* __restrict__ index, float* __restrict__ out) {
  __shared__ double scratch[32];
  const int row = index ? index[blockIdx.x] : static_cast<int>(blockIdx.x);
  float* dst = out + static_cast<size_t>(blockIdx.x) * per_row;
  if (row < 0) return;
  if (row >= in_rows) {
    for (int i = threadIdx.x; i < per_row; i += blockDim.x) dst[i] = kNaN;
    return;
  }
  const size_t base = static_cast<size_t>(row) * per_row;
  reflect_block(x + base, mean_p + base, mean_q + base, log_var + base, per_row, dst, scratch);
}

// ---- residual (q - p)^+ by rejection: one block per output row (residual_block) -------------------
__global__ void residual_kernel(const float* __restrict__ mean_p, const float* __restrict__ log_var_p,
                                const float* __restrict__ mean_q, const float* __restrict__ log_var_q, int in_rows,
                                int per_row, const int* __restrict__ index, unsigned long long seed,
                                const unsigned* __restrict__ sample, const unsigned* __restrict__ step,
                                unsigned purpose_z, unsigned purpose_u, int attempt_shift, int max_attempts,
                                float* __restrict__ out, int* __restrict__ proposals, int* __restrict__ cap_hit) {
  __shared__ int keep[32];
  __shared__ int winner[2];
  const int i = blockIdx.x;
  const int row = index ? index[i] : i;
  float* dst = out + static_cast<size_t>(i) * per_row;
  if (row < 0 || row >= in_rows) {
    if (row >= in_rows)
      for (int e = threadIdx.x; e < per_row; e += blockDim.x) dst[e] = kNaN;
    if (threadIdx.x == 0) {
      proposals[i] = 0;
      cap_hit[i] = row >= in_rows;
    }
    return;
  }
  const size_t base = static_cast<size_t>(row) * per_row;
  const ResidualRow r{mean_p + base, log_var_p + base, mean_q + base, log_var_q + base, per_row, seed, sample[i],
                      step[i]};
  const int found = residual_block(r, purpose_z, purpose_u, attempt_shift, max_attempts, dst, keep, winner);
  if (threadIdx.x == 0) {
    proposals[i] = found >= 0 ? found + 1 : max_attempts;
    cap_hit[i] = found < 0;
  }
}

}  // namespace
}  // namespace freedit

using namespace freedit;

extern "C" int freedit_log_ratio(const float* x, const float* mean_p, const float* log_var_p, const float* mean_q,
                                 const float* log_var_q, int rows, int per_row, double* out, void* stream) {
  if (!x || !mean_p || !log_var_p || !mean_q || !log_var_q || !out || rows <= 0 || per_row <= 0)
    return cudaErrorInvalidValue;
  FREEDIT_LAUNCH(log_ratio_kernel, rows, kThreads, 0, as_stream(stream))(x, mean_p, log_var_p, mean_q, log_var_q, per_row, out);
  return finish_launch();
}

extern "C" int freedit_accept_window(const double* log_r, const double* uniform, const double* gamma, int rows,
                                     const int* windows, int samples, int* accepted, int* reject_row, void* stream) {
  if (!windows || !accepted || samples <= 0 || rows < 0) return cudaErrorInvalidValue;
  if (rows > 0 && (!log_r || !uniform)) return cudaErrorInvalidValue;
  FREEDIT_LAUNCH(accept_window_kernel, 1, kAcceptThreads, 0, as_stream(stream))(log_r, uniform, gamma, rows, windows, samples,
                                                                    accepted, reject_row);
  return finish_launch();
}

extern "C" int freedit_reflect(const float* x, const float* mean_p, const float* mean_q, const float* log_var,
                               int in_rows, int per_row, const int* index, int out_rows, float* out, void* stream) {
  if (!x || !mean_p || !mean_q || !log_var || !out || in_rows <= 0 || per_row <= 0 || out_rows <= 0)
    return cudaErrorInvalidValue;
  if (!index && out_rows != in_rows) return cudaErrorInvalidValue;
  FREEDIT_LAUNCH(reflect_kernel, out_rows, kThreads, 0, as_stream(stream))(x, mean_p, mean_q, log_var, in_rows, per_row, index,
                                                               out);
  return finish_launch();
}

extern "C" int freedit_residual(const float* mean_p, const float* log_var_p, const float* mean_q,
                                const float* log_var_q, int in_rows, int per_row, const int* index, int out_rows,
                                unsigned long long seed, const unsigned* sample, const unsigned* step,
                                unsigned purpose_z, unsigned purpose_u, int attempt_shift, int max_attempts, float* out,
                                int* proposals, int* cap_hit, void* stream) {
  if (!mean_p || !log_var_p || !mean_q || !log_var_q || !sample || !step || !out || !proposals || !cap_hit)
    return cudaErrorInvalidValue;
  if (in_rows <= 0 || per_row <= 0 || out_rows <= 0 || max_attempts <= 0 || attempt_shift < 0 || attempt_shift > 31)
    return cudaErrorInvalidValue;
  if (!index && out_rows != in_rows) return cudaErrorInvalidValue;
  FREEDIT_LAUNCH(residual_kernel, out_rows, kThreads, 0, as_stream(stream))(mean_p, log_var_p, mean_q, log_var_q, in_rows,
                                                                per_row, index, seed, sample, step, purpose_z,
                                                                purpose_u, attempt_shift, max_attempts, out, proposals,
                                                                cap_hit);
  return finish_launch();
}

// ---- host references: the same Philox and residual code on the CPU ------------------------------
extern "C" int freedit_residual_host(const float* mean_p, const float* log_var_p, const float* mean_q,
                                     const float* log_var_q, int in_rows, int per_row, const int* index, int out_rows,
                                     unsigned long long seed, const unsigned* sample, const unsigned* step,
                                     unsigned purpose_z, unsigned purpose_u, int attempt_shift, int max_attempts,
                                     float* out, int* proposals, int* cap_hit) {
  if (!mean_p || !log_var_p || !mean_q || !log_var_q || !sample || !step || !out || !proposals || !cap_hit)
    return cudaErrorInvalidValue;
  if (in_rows <= 0 || per_row <= 0 || out_rows <= 0 || max_attempts <= 0 || attempt_shift < 0 || attempt_shift > 31)
    return cudaErrorInvalidValue;
  if (!index && out_rows != in_rows) return cudaErrorInvalidValue;
  const uint32_t blocks = static_cast<uint32_t>((per_row + 3) / 4);
  for (int i = 0; i < out_rows; ++i) {
    const int row = index ? index[i] : i;
    float* dst = out + static_cast<size_t>(i) * per_row;
    if (row < 0 || row >= in_rows) {
      if (row >= in_rows)
        for (int e = 0; e < per_row; ++e) dst[e] = kNaN;
      proposals[i] = 0;
      cap_hit[i] = row >= in_rows;
      continue;
    }
    const size_t base = static_cast<size_t>(row) * per_row;
    const ResidualRow r{mean_p + base, log_var_p + base, mean_q + base, log_var_q + base, per_row, seed, sample[i],
                        step[i]};
    int found = -1;
    for (int attempt = 0; attempt < max_attempts && found < 0; ++attempt) {
      const uint32_t shifted = static_cast<uint32_t>(attempt) << attempt_shift;
      double acc = 0.0;
      for (uint32_t b = 0; b < blocks; ++b) {
        float y[4];
        const int n = proposal4(r, b, purpose_z + shifted, y);
        for (int j = 0; j < n; ++j) {
          const int e = 4 * b + j;
          dst[e] = y[j];
          acc += log_ratio_term(y[j], r.mean_p[e], r.log_var_p[e], r.mean_q[e], r.log_var_q[e]);
        }
      }
      if (residual_keep(r, acc, purpose_u, shifted)) found = attempt;
    }
    proposals[i] = found >= 0 ? found + 1 : max_attempts;
    cap_hit[i] = found < 0;
  }
  return cudaSuccess;
}
