// Shared helpers of the freedit kernels: element loads by dtype code, Philox4x32-10 with noise.py's
// counter layout and Box-Muller, block reductions in double, launch sizing. The noise and decision
// functions are __host__ __device__: the library's host reference entry points (freedit_*_host)
// run the same code on the CPU, so machines without a GPU check it against the numpy oracle.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

#include "freedit_kernels.h"

namespace freedit {

constexpr int kThreads = 256;

// Grid for a grid-stride loop over `total` elements (a few waves, never more than needed).
inline unsigned grid_for(size_t total, int threads = kThreads) {
  const size_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks ? blocks : 1) : 4096);
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Kernel launches go through FREEDIT_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...) so
// that the same sources also build for the host under the CUDA-runtime shim (runtime/csrc/emulation),
// where the macro runs every block and thread on host threads instead of `<<<...>>>`.
#ifndef FREEDIT_LAUNCH
#define FREEDIT_LAUNCH(kernel, grid, block, shared, stream) kernel<<<(grid), (block), (shared), (stream)>>>
#endif

// Launches made by this library so far (freedit_launch_count): benchmarks report launches per round.
inline std::atomic<long long>& launch_counter() {
  static std::atomic<long long> count{0};
  return count;
}

// Every entry point ends a launch with this: count it, return the launch's error code.
inline int finish_launch() {
  launch_counter().fetch_add(1, std::memory_order_relaxed);
  return static_cast<int>(cudaGetLastError());
}

#define FREEDIT_HD __host__ __device__ __forceinline__

// fp32 add/multiply rounded separately (never contracted into an FMA), as numpy computes them.
FREEDIT_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  volatile float r = a + b;
  return r;
#endif
}
FREEDIT_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;
  return r;
#endif
}
FREEDIT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// ---- element loads by dtype code ---------------------------------------------------------------
__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }

// ---- Philox4x32-10 (runtime/noise.py::philox4x32) ----------------------------------------------
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

FREEDIT_HD uint4 philox4x32_10(uint4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round) {  // key schedule: Weyl sequence mod 2^32
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint32_t hi0 = mulhi32(kPhiloxM0, c.x), lo0 = kPhiloxM0 * c.x;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c.z), lo1 = kPhiloxM1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
  }
  return c;
}

// Block `block` of the stream keyed (seed, sample, step, purpose): counter (block, sample, step, purpose).
FREEDIT_HD uint4 philox_block(unsigned long long seed, uint32_t block, uint32_t sample, uint32_t step,
                                      uint32_t purpose) {
  return philox4x32_10(make_uint4(block, sample, step, purpose), static_cast<uint32_t>(seed & 0xFFFFFFFFull),
                       static_cast<uint32_t>(seed >> 32));
}

// The counter's step word: the respaced step in the low half, a stream (0: the plain key) in the
// high half (noise.py STREAM_SHIFT; block verification keys a round's draws by its start step + 1).
FREEDIT_HD uint32_t keyed_step(int step, int stream) {
  return static_cast<uint32_t>(step) | (static_cast<uint32_t>(stream) << 16);
}

// (bits + 0.5) * 2^-32: exact in double, so bit-identical to numpy.
FREEDIT_HD double to_uniform(uint32_t bits) {
  return (static_cast<double>(bits) + 0.5) * 2.3283064365386963e-10;
}

// Box-Muller on (u1, u2) as noise.normal: r = sqrt(-2 log u1), angle = (2 pi) u2, in double.
FREEDIT_HD void box_muller(uint32_t b1, uint32_t b2, float* z0, float* z1) {
  const double radius = sqrt(-2.0 * log(to_uniform(b1)));
  double s, c;
  sincos(6.283185307179586 * to_uniform(b2), &s, &c);
  *z0 = static_cast<float>(radius * c);
  *z1 = static_cast<float>(radius * s);
}

// The four normals of Philox block `block` (elements 4*block .. 4*block + 3 of the row).
FREEDIT_HD void normals4(uint4 bits, float z[4]) {
  box_muller(bits.x, bits.y, &z[0], &z[1]);
  box_muller(bits.z, bits.w, &z[2], &z[3]);
}

// ---- reductions (fixed order for a given block size: deterministic) ----------------------------
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  return v;
}

// Sum over the block; the result is valid in every thread. `scratch` holds 32 doubles.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// Element of log q(x) - log p(x) in double, as coupling.log_density (the log 2 pi terms cancel).
FREEDIT_HD double log_ratio_term(float x, float mp, float lvp, float mq, float lvq) {
  const double dq = static_cast<double>(x) - mq, dp = static_cast<double>(x) - mp;
  return -0.5 * (dq * dq * exp(-static_cast<double>(lvq)) + lvq) +
         0.5 * (dp * dp * exp(-static_cast<double>(lvp)) + lvp);
}

}  // namespace freedit
