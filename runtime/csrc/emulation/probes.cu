// Test kernels for the host emulation's own semantics (tests/test_kernels_emulated.py, and the
// launch-cost benchmark): barriers, warp collectives, shared memory per block, atomics, built-in
// indices, fp16/bf16 conversions, launch configuration errors, barriers that can never complete.
// Built only into libfreedit_emulation_probes.so, never into the kernels library. Each entry point
// launches once and returns cudaGetLastError().
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "freedit_emulation.h"

#define PROBE extern "C" FREEDIT_EMU_API int

namespace {

__device__ unsigned linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
__device__ unsigned threads_per_block() { return blockDim.x * blockDim.y * blockDim.z; }
__device__ unsigned long long linear_block() {
  return blockIdx.x + static_cast<unsigned long long>(gridDim.x) * (blockIdx.y + gridDim.y * blockIdx.z);
}

__global__ void empty_kernel() {}

// out[b, t] = sum over rounds of the value the next thread wrote this round: right only if the
// barriers order the writes before the reads and the reads before the next round's writes.
template <bool kBarriers>
__global__ void neighbour_kernel(int rounds, int* out) {
  __shared__ int slot[1024];
  const unsigned t = linear_thread(), n = threads_per_block();
  int acc = 0;
  for (int r = 0; r < rounds; ++r) {
    slot[t] = static_cast<int>(t) + r * 1000;
    if (kBarriers) __syncthreads();
    acc += slot[(t + 1) % n];
    if (kBarriers) __syncthreads();
  }
  out[linear_block() * n + t] = acc;
}

// Per thread: 8 results of warp collectives on value = 1000 * block + 10 * lane + 1 (as double,
// int and long long), for the caller's width and an arbitrary source lane.
__global__ void shuffle_kernel(int width, int idx_mul, int idx_add, unsigned up, unsigned down, int xor_mask,
                               long long* out) {
  const unsigned t = linear_thread(), lane = t & 31;
  const unsigned mask = __activemask();
  const long long value = 1000LL * static_cast<long long>(linear_block()) + 10 * lane + 1;
  long long* o = out + (linear_block() * threads_per_block() + t) * 8;
  o[0] = static_cast<long long>(__shfl_sync(mask, static_cast<double>(value), static_cast<int>(lane) * idx_mul + idx_add, width));
  o[1] = __shfl_up_sync(mask, static_cast<int>(value), up, width);
  o[2] = __shfl_down_sync(mask, value, down, width);
  o[3] = __shfl_xor_sync(mask, static_cast<int>(value), xor_mask, width);
  o[4] = __ballot_sync(mask, lane % 3 == 0);
  o[5] = __any_sync(mask, lane == 5);
  o[6] = __all_sync(mask, lane != 7);
  o[7] = mask;
}

// The reduction pattern of common.cuh (warp sum by shuffles, then across warps) on 64-bit ints.
__global__ void warp_sum_kernel(const long long* in, long long* out) {
  __shared__ long long partial[32];
  const unsigned t = linear_thread();
  long long v = in[linear_block() * threads_per_block() + t];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  if ((t & 31) == 0) partial[t >> 5] = v;
  __syncthreads();
  if (t == 0) {
    long long total = 0;
    for (unsigned w = 0; w < (threads_per_block() + 31) / 32; ++w) total += partial[w];
    out[linear_block()] = total;
  }
}

// Each block counts its own threads in shared memory and keeps its index there while yielding
// often: a shared variable visible to other blocks running at the same time would be overwritten.
__global__ void shared_per_block_kernel(int yields, int* out) {
  __shared__ int count;
  __shared__ unsigned long long owner;
  const unsigned t = linear_thread();
  if (t == 0) {
    count = 0;
    owner = linear_block();
  }
  __syncthreads();
  atomicAdd(&count, 1);
  for (int i = 0; i < yields; ++i) __nanosleep(100);
  __syncthreads();
  out[2 * linear_block()] = count;
  if (owner != linear_block()) out[2 * linear_block() + 1] = 1;  // seen another block's value
}

struct Counters {
  int add_i;
  unsigned add_u;
  long long add_ll;
  unsigned long long add_ull;
  float add_f;
  double add_d;
  int max_i, min_i;
  unsigned or_u, and_u, xor_u;
  long long max_ll, min_ll;
  unsigned long long max_ull;
  int cas_i;
  unsigned inc_u;
  int exch_i, sub_i;
};

__global__ void atomics_kernel(Counters* c) {
  const long long g = static_cast<long long>(linear_block() * threads_per_block() + linear_thread());
  atomicAdd(&c->add_i, 1);
  atomicAdd(&c->add_u, 2u);
  atomicAdd(&c->add_ll, g);
  atomicAdd(&c->add_ull, 3ull);
  atomicAdd(&c->add_f, 1.0f);
  atomicAdd(&c->add_d, 0.5);
  atomicMax(&c->max_i, static_cast<int>(g));
  atomicMin(&c->min_i, -static_cast<int>(g));
  atomicOr(&c->or_u, 1u << (g % 32));
  atomicAnd(&c->and_u, ~(1u << (g % 16)));
  atomicXor(&c->xor_u, 1u << (g % 4));
  atomicMax(&c->max_ll, g << 33);
  atomicMin(&c->min_ll, -(g << 33));
  atomicMax(&c->max_ull, static_cast<unsigned long long>(g) << 40);
  int old = c->cas_i, seen;
  while ((seen = atomicCAS(&c->cas_i, old, old + 1)) != old) old = seen;  // increment by CAS
  atomicInc(&c->inc_u, 9u);                                               // counts modulo 10
  atomicExch(&c->exch_i, 7);
  atomicSub(&c->sub_i, 1);
}

__global__ void indices_kernel(unsigned* out) {
  unsigned* o = out + (linear_block() * threads_per_block() + linear_thread()) * 12;
  const unsigned values[12] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                               blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
  for (int i = 0; i < 12; ++i) o[i] = values[i];
}

__global__ void convert_kernel(const float* in, int n, unsigned short* half_bits, unsigned short* bf16_bits,
                               float* from_half, float* from_bf16) {
  for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < n; i += gridDim.x * blockDim.x) {
    const __half h = __float2half(in[i]);
    const __nv_bfloat16 b = __float2bfloat16(in[i]);
    half_bits[i] = __half_as_ushort(h);
    bf16_bits[i] = __bfloat16_as_ushort(b);
    from_half[i] = __half2float(__ushort_as_half(static_cast<unsigned short>(i & 0xFFFF)));
    from_bf16[i] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(i & 0xFFFF)));
  }
}

// __syncthreads_count/and/or on pred[t]; threads t >= live return first (count as arrived).
__global__ void barrier_vote_kernel(const int* pred, int live, int* out) {
  const unsigned t = linear_thread();
  if (static_cast<int>(t) >= live) return;
  const int count = __syncthreads_count(pred[t]);
  const int all = __syncthreads_and(pred[t]);
  const int any = __syncthreads_or(pred[t]);
  __syncthreads();
  out[3 * t] = count;
  out[3 * t + 1] = all;
  out[3 * t + 2] = any;
}

// Barriers that can never complete (kind 0, 1), a trap (2), a bad shuffle width (3).
__global__ void stuck_kernel(int kind, int* out) {
  const unsigned t = linear_thread();
  if (kind == 0) {  // lane 0 waits for its warp while the others wait for the block
    if (t == 0) {
      __syncwarp();
    } else {
      __syncthreads();
    }
  } else if (kind == 1) {  // lane 1 waits for lane 2, which waits for the block, which waits for 0 and 1
    if (t == 0) {
      __syncwarp(0x3u);
    } else if (t == 1) {
      __syncwarp(0x6u);
    } else {
      __syncthreads();
    }
  } else if (kind == 2) {
    if (t == 5) __trap();
    __syncthreads();
  } else {
    out[t] = __shfl_sync(0xFFFFFFFFu, static_cast<int>(t), 0, 12);
  }
  out[t] = 1;
}

}  // namespace

PROBE probe_empty(unsigned grid, unsigned block, void* stream) {
  FREEDIT_LAUNCH(empty_kernel, grid, block, 0, static_cast<cudaStream_t>(stream))();
  return cudaGetLastError();
}

// Any configuration, for the launch checks (dims as x, y, z triples).
PROBE probe_configured(const unsigned* grid, const unsigned* block, size_t shared_bytes, void* stream) {
  FREEDIT_LAUNCH(empty_kernel, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), shared_bytes,
                 static_cast<cudaStream_t>(stream))();
  return cudaGetLastError();
}

PROBE probe_neighbours(unsigned grid, unsigned block, int rounds, int barriers, int* out) {
  if (barriers) {
    FREEDIT_LAUNCH(neighbour_kernel<true>, grid, block, 0, 0)(rounds, out);
  } else {
    FREEDIT_LAUNCH(neighbour_kernel<false>, grid, block, 0, 0)(rounds, out);
  }
  return cudaGetLastError();
}

PROBE probe_shuffles(unsigned grid, unsigned block, int width, int idx_mul, int idx_add, unsigned up, unsigned down,
                     int xor_mask, long long* out) {
  FREEDIT_LAUNCH(shuffle_kernel, grid, block, 0, 0)(width, idx_mul, idx_add, up, down, xor_mask, out);
  return cudaGetLastError();
}

PROBE probe_warp_sum(unsigned grid, unsigned block, const long long* in, long long* out) {
  FREEDIT_LAUNCH(warp_sum_kernel, grid, block, 0, 0)(in, out);
  return cudaGetLastError();
}

PROBE probe_shared_per_block(unsigned grid, unsigned block, int yields, int* out) {
  FREEDIT_LAUNCH(shared_per_block_kernel, grid, block, 0, 0)(yields, out);
  return cudaGetLastError();
}

PROBE probe_atomics(unsigned grid, unsigned block, void* counters) {
  FREEDIT_LAUNCH(atomics_kernel, grid, block, 0, 0)(static_cast<Counters*>(counters));
  return cudaGetLastError();
}

PROBE probe_counters_size(void) { return static_cast<int>(sizeof(Counters)); }

PROBE probe_indices(const unsigned* grid, const unsigned* block, unsigned* out) {
  FREEDIT_LAUNCH(indices_kernel, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), 0, 0)(out);
  return cudaGetLastError();
}

PROBE probe_convert(const float* in, int n, unsigned short* half_bits, unsigned short* bf16_bits, float* from_half,
                    float* from_bf16) {
  FREEDIT_LAUNCH(convert_kernel, 64, 256, 0, 0)(in, n, half_bits, bf16_bits, from_half, from_bf16);
  return cudaGetLastError();
}

PROBE probe_barrier_votes(unsigned block, const int* pred, int live, int* out) {
  FREEDIT_LAUNCH(barrier_vote_kernel, 1, block, 0, 0)(pred, live, out);
  return cudaGetLastError();
}

PROBE probe_stuck(int kind, unsigned block, int* out) {
  FREEDIT_LAUNCH(stuck_kernel, 1, block, 0, 0)(kind, out);
  return cudaGetLastError();
}
