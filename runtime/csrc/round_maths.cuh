// The per-element and per-row maths shared by the standalone kernels (sampling.cu, coupling.cu)
// and the fused FREE round (round.cu): one definition of each formula, so the fused kernels cannot
// drift from the ones checked one by one against the numpy oracle.
//   transition  - ops.transition: (x, eps, v) at a respaced step -> mean, log-variance
//   CFG         - ops.cfg_combine on one element
//   accepted_at - coupling.accept
//   reflect_block / residual_block - coupling.reflect / coupling.sample_residual for one row,
//                 run by a whole block (scratch comes from the calling kernel's shared memory)
#pragma once

#include "common.cuh"

namespace freedit {

constexpr float kNaN = __builtin_nanf("");

// Columns of Schedule.transition_table().
enum TableColumn { kSqrtRecipAbar = 0, kSqrtRecipm1Abar, kCoef1, kCoef2, kMinLog, kMaxLog, kTableColumns };

FREEDIT_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  volatile float r = a - b;
  return r;
#endif
}

// eps_g = u + s (c - u) with numpy's fp32 roundings (no FMA contraction).
FREEDIT_HD float cfg_element(float cond, float uncond, float scale) {
  return add_rn(uncond, mul_rn(scale, sub_rn(cond, uncond)));
}

// One element of p(x_{i-1} | x_i) at respaced step `step` (0 <= step < num_steps): the mean in the
// folded form (coef1 a + coef2) x - (coef1 b) eps (no large x0 intermediate at high noise), the
// log-variance by `variance` (learned: v interpolates log beta_tilde .. log beta).
FREEDIT_HD void transition_element(const float* table, int step, int variance, float x, float eps, float v,
                                   float* mean, float* log_var) {
  const float* coef = table + static_cast<size_t>(step) * kTableColumns;
  const float cx = coef[kCoef1] * coef[kSqrtRecipAbar] + coef[kCoef2];
  const float ce = coef[kCoef1] * coef[kSqrtRecipm1Abar];
  *mean = cx * x - ce * eps;
  if (variance == FREEDIT_VARIANCE_LEARNED) {
    const float frac = 0.5f * (v + 1.0f);
    *log_var = frac * coef[kMaxLog] + (1.0f - frac) * coef[kMinLog];
  } else if (variance == FREEDIT_VARIANCE_FIXED_LARGE) {  // DiT: posterior variance at step 0, beta after
    *log_var = step == 0 ? coef[kMinLog] : coef[kMaxLog];
  } else {
    *log_var = coef[kMinLog];
  }
}

// Accept iff log U < min(0, gamma log r); np.minimum propagates NaN, and a NaN threshold rejects.
FREEDIT_HD bool accepted_at(double log_r, double uniform, double gamma) {
  const double t = gamma * log_r;
  const double threshold = isnan(t) ? t : (t < 0.0 ? t : 0.0);
  return log(uniform) < threshold;
}

// ---- reflection coupling (equal covariances) for one row, by the whole block ----------------------
// x' = mu_q + sigma (z - 2 (d.z / d.d) d), z = (x - mu_p)/sigma, d = (mu_p - mu_q)/sigma, in double.
__device__ inline void reflect_block(const float* x, const float* mean_p, const float* mean_q, const float* log_var,
                                     int per_row, float* dst, double* scratch) {
  double dd = 0.0, dz = 0.0;
  for (int i = threadIdx.x; i < per_row; i += blockDim.x) {
    const double sigma = exp(0.5 * static_cast<double>(log_var[i]));
    const double z = (static_cast<double>(x[i]) - mean_p[i]) / sigma;
    const double d = (static_cast<double>(mean_p[i]) - mean_q[i]) / sigma;
    dd += d * d;
    dz += d * z;
  }
  dd = block_sum(dd, scratch);
  dz = block_sum(dz, scratch);
  const double c = dd > 0.0 ? 2.0 * dz / dd : 0.0;
  for (int i = threadIdx.x; i < per_row; i += blockDim.x) {
    const double sigma = exp(0.5 * static_cast<double>(log_var[i]));
    const double z = (static_cast<double>(x[i]) - mean_p[i]) / sigma;
    const double d = (static_cast<double>(mean_p[i]) - mean_q[i]) / sigma;
    dst[i] = static_cast<float>(mean_q[i] + sigma * (z - c * d));
  }
}

// ---- the residual (q - p)^+ by rejection, for one row -------------------------------------------
struct ResidualRow {
  const float *mean_p, *log_var_p, *mean_q, *log_var_q;
  int per_row;
  unsigned long long seed;
  uint32_t sample, step;
};

// Proposal y of Philox block `block` (elements 4 block .. 4 block + 3) of attempt `purpose_z`:
// y = mu_q + sigma_q z with numpy's fp32 roundings (sigma_q = exp(lv_q / 2), no FMA).
FREEDIT_HD int proposal4(const ResidualRow& r, uint32_t block, uint32_t purpose_z, float y[4]) {
  float z[4];
  normals4(philox_block(r.seed, block, r.sample, r.step, purpose_z), z);
  const int first = 4 * block, n = r.per_row - first < 4 ? r.per_row - first : 4;
  for (int j = 0; j < n; ++j) {
    const float sigma = static_cast<float>(exp(static_cast<double>(0.5f * r.log_var_q[first + j])));
    y[j] = add_rn(r.mean_q[first + j], mul_rn(sigma, z[j]));
  }
  return n;
}

// u of attempt `shifted` and what the proposal does at a level of weight w = exp(log_w) <= 1
// (coupling.sample_residual with log_weight): 1 = kept, with probability max(0, w - p(y)/q(y))
// = -w expm1(-(log r + log w)); 2 = passed on to the level below, the next 1 - w of [0, 1);
// 0 = propose again. log_w = 0 is the plain residual (q - p)^+, which never passes on.
FREEDIT_HD int residual_outcome(const ResidualRow& r, double log_r, double log_w, uint32_t purpose_u,
                                uint32_t shifted) {
  const double u = to_uniform(philox_block(r.seed, 0, r.sample, r.step, purpose_u + shifted).x);
  const double lr = log_r + log_w;
  const double stop = lr > 0.0 ? -exp(log_w) * expm1(-lr) : 0.0;
  if (lr > 0.0 && u < stop) return 1;
  return u >= stop && u < stop - expm1(log_w) ? 2 : 0;
}

FREEDIT_HD bool residual_keep(const ResidualRow& r, double log_r, uint32_t purpose_u, uint32_t shifted) {
  return residual_outcome(r, log_r, 0.0, purpose_u, shifted) == 1;
}

// Each warp evaluates one attempt (proposal, its log ratio reduced over the warp, its uniform); the
// block tries `warps` consecutive attempts per round and keeps the smallest successful one, so the
// accepted attempt is the first success in attempt order, as coupling.sample_residual. Writes the
// kept proposal to dst; returns the deciding attempt, or -1 at the cap (dst = the last proposal).
// With log_w < 0 (a level of block verification) the deciding attempt may pass on instead:
// `*outcome` says which (residual_outcome's 1 or 2; 0 at the cap), and dst is left alone on 2.
// `keep` holds 32 ints and `winner` two ints of the caller's shared memory.
__device__ inline int residual_block(const ResidualRow& r, uint32_t purpose_z, uint32_t purpose_u, int attempt_shift,
                                     int max_attempts, float* dst, int* keep, int* winner, double log_w = 0.0,
                                     int* outcome = nullptr) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const uint32_t blocks = static_cast<uint32_t>((r.per_row + 3) / 4);
  int found = -1;
  for (long long round = 0; round < max_attempts && found < 0; round += warps) {
    const long long attempt = round + warp;
    int ok = 0;
    if (attempt < max_attempts) {
      const uint32_t shifted = static_cast<uint32_t>(attempt) << attempt_shift;  // mod 2^32, as numpy's cast
      double acc = 0.0;
      for (uint32_t b = lane; b < blocks; b += 32) {
        float y[4];
        const int n = proposal4(r, b, purpose_z + shifted, y);
        for (int j = 0; j < n; ++j) {
          const int e = 4 * b + j;
          acc += log_ratio_term(y[j], r.mean_p[e], r.log_var_p[e], r.mean_q[e], r.log_var_q[e]);
        }
      }
      acc = warp_sum(acc);
      if (lane == 0) ok = residual_outcome(r, acc, log_w, purpose_u, shifted);
    }
    if (lane == 0) keep[warp] = ok;
    __syncthreads();
    if (threadIdx.x == 0) {
      winner[0] = -1;
      winner[1] = 0;
      for (int w = 0; w < warps; ++w)
        if (keep[w]) {
          winner[0] = static_cast<int>(round) + w;
          winner[1] = keep[w];
          break;
        }
    }
    __syncthreads();
    found = winner[0];
    if (outcome) *outcome = winner[1];
    __syncthreads();  // everyone has read `winner` before the next round rewrites it
  }
  if (found >= 0 && outcome && *outcome == 2) return found;  // passed on: nothing to keep
  const int chosen = found >= 0 ? found : max_attempts - 1;  // at the cap: the last proposal, flagged
  const uint32_t shifted = static_cast<uint32_t>(chosen) << attempt_shift;
  for (uint32_t b = threadIdx.x; b < blocks; b += blockDim.x) {
    float y[4];
    const int n = proposal4(r, b, purpose_z + shifted, y);
    for (int j = 0; j < n; ++j) dst[4 * b + j] = y[j];
  }
  return found;
}

}  // namespace freedit
