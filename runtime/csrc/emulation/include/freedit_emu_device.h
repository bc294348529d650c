// The device side of the host emulation: CUDA's qualifiers, built-in variables, barriers, warp
// collectives, atomics and intrinsics, and the host form of FREEDIT_LAUNCH (common.cuh).
//
// Each CUDA thread runs on its own execution context with its own stack (a fiber); the threads of
// a block take turns on one host thread of a persistent pool, switching only where CUDA threads
// wait for each other (__syncthreads, warp collectives), so a barrier really waits for every live
// thread and a shuffle really reads the other lane's value. Blocks run in parallel on the pool.
// __CUDA_ARCH__ stays undefined: code with host and device branches takes its host branch.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <atomic>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime.h"
#include "vector_types.h"

// ---- qualifiers ----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// One copy per host thread of the pool, and a host thread runs one block at a time: per block, as
// CUDA's shared memory. Like shared memory, it keeps whatever the previous block left there.
#define __shared__ static thread_local
// __restrict__ is a g++ keyword already.

namespace freedit_emu {

struct BlockView {
  uint3 block_idx;
  dim3 block_dim, grid_dim;
};

struct ThreadView {
  uint3 thread_idx;
  const BlockView* block;
};

// Every CUDA thread runs on a fiber stack of FREEDIT_EMU_STACK_BYTES (a power of two), aligned to
// its size, whose top holds this header: the running thread is found from the stack pointer, with
// no thread-local lookup (slow in a dlopen()ed library).
#ifndef FREEDIT_EMU_STACK_BYTES
#define FREEDIT_EMU_STACK_BYTES (128 * 1024)
#endif
static_assert((FREEDIT_EMU_STACK_BYTES & (FREEDIT_EMU_STACK_BYTES - 1)) == 0, "stack size: a power of two");

struct StackHeader {
  const ThreadView* view;  // the CUDA thread running on this stack
  void* worker;            // the block scheduler it belongs to
};

__attribute__((always_inline)) inline StackHeader* stack_header() {
  uintptr_t sp;
#if defined(__x86_64__)
  asm("movq %%rsp, %0" : "=r"(sp));
#elif defined(__aarch64__)
  asm("mov %0, sp" : "=r"(sp));
#else
  sp = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
#endif
  return reinterpret_cast<StackHeader*>((sp | (FREEDIT_EMU_STACK_BYTES - 1)) + 1 - sizeof(StackHeader));
}

inline const ThreadView& view() { return *stack_header()->view; }

enum class WarpOp : int { kSync, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };
enum class BarrierOp : int { kSync, kCount, kAnd, kOr };

// Blocking points: the calling CUDA thread waits until its group has arrived. Defined in
// src/launch.cpp, out of line, so the compiler treats each as a full memory clobber.
unsigned long long warp_collective(WarpOp op, unsigned mask, unsigned long long value, int arg, int width);
int block_barrier(BarrierOp op, int predicate);
void yield_thread();           // let the block's other threads run (a spin-wait's __nanosleep)
[[noreturn]] void trap_thread();  // __trap(): the launch fails with cudaErrorLaunchFailure
unsigned active_lanes();       // live lanes of the caller's warp

template <class T>
unsigned long long to_bits(T value) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move at most 8 bytes");
  unsigned long long bits = 0;
  memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <class T>
T from_bits(unsigned long long bits) {
  T value;
  memcpy(&value, &bits, sizeof(T));
  return value;
}

// ---- launches ------------------------------------------------------------------------------------
// A launch, type-erased: `invoke` runs the kernel body for the current CUDA thread with the
// arguments held in `closure`; `clone`/`destroy` keep a copy alive in a captured graph.
struct KernelCall {
  void (*invoke)(const void* closure);
  void* (*clone)(const void* closure);
  void (*destroy)(void* closure);
  const void* closure;
  const char* kernel;    // the kernel expression as written at the launch
  const char* launcher;  // the function that launched it
};

cudaError_t launch_kernel(const KernelCall& call, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream);

template <class... Params>
class Launcher {
 public:
  using Kernel = void (*)(Params...);
  Launcher(Kernel kernel, dim3 grid, dim3 block, size_t shared, cudaStream_t stream, const char* name,
           const char* launcher)
      : kernel_(kernel), grid_(grid), block_(block), shared_(shared), stream_(stream), name_(name),
        launcher_(launcher) {}

  // The arguments are converted to the kernel's parameter types and copied, as a launch does.
  template <class... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "wrong number of kernel arguments");
    Closure closure{kernel_, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    const KernelCall call{&invoke, &clone, &destroy, &closure, name_, launcher_};
    launch_kernel(call, grid_, block_, shared_, stream_);  // errors go to cudaGetLastError, as in CUDA
  }

 private:
  struct Closure {
    Kernel kernel;
    std::tuple<std::decay_t<Params>...> args;
  };
  static void invoke(const void* p) {
    const Closure& c = *static_cast<const Closure*>(p);
    std::apply(c.kernel, c.args);
  }
  static void* clone(const void* p) { return new Closure(*static_cast<const Closure*>(p)); }
  static void destroy(void* p) { delete static_cast<Closure*>(p); }

  Kernel kernel_;
  dim3 grid_, block_;
  size_t shared_;
  cudaStream_t stream_;
  const char *name_, *launcher_;
};

template <class... Params>
Launcher<Params...> make_launcher(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared,
                                  cudaStream_t stream, const char* name, const char* launcher) {
  return Launcher<Params...>(kernel, grid, block, shared, stream, name, launcher);
}

// fp32/fp64 operations rounded on their own, never contracted into an FMA (as CUDA's __f*_rn):
// the empty asm hides the product from the optimiser whatever -ffp-contract says.
template <class T>
__attribute__((always_inline)) inline T opaque(T v) {
#if defined(__x86_64__)
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#else
  volatile T r = v;
  v = r;
#endif
  return v;
}

}  // namespace freedit_emu

#define FREEDIT_LAUNCH(kernel, grid, block, shared, stream) \
  ::freedit_emu::make_launcher((kernel), (grid), (block), (shared), (stream), #kernel, __func__)

// ---- built-in variables --------------------------------------------------------------------------
#define threadIdx (::freedit_emu::view().thread_idx)
#define blockIdx (::freedit_emu::view().block->block_idx)
#define blockDim (::freedit_emu::view().block->block_dim)
#define gridDim (::freedit_emu::view().block->grid_dim)
static constexpr int warpSize = 32;

// ---- barriers and warp collectives ---------------------------------------------------------------
inline void __syncthreads() { freedit_emu::block_barrier(freedit_emu::BarrierOp::kSync, 0); }
inline int __syncthreads_count(int p) { return freedit_emu::block_barrier(freedit_emu::BarrierOp::kCount, p); }
inline int __syncthreads_and(int p) { return freedit_emu::block_barrier(freedit_emu::BarrierOp::kAnd, p); }
inline int __syncthreads_or(int p) { return freedit_emu::block_barrier(freedit_emu::BarrierOp::kOr, p); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  freedit_emu::warp_collective(freedit_emu::WarpOp::kSync, mask, 0, 0, 32);
}
template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  using namespace freedit_emu;
  return from_bits<T>(warp_collective(WarpOp::kShflIdx, mask, to_bits(var), src_lane, width));
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  using namespace freedit_emu;
  return from_bits<T>(warp_collective(WarpOp::kShflUp, mask, to_bits(var), static_cast<int>(delta), width));
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  using namespace freedit_emu;
  return from_bits<T>(warp_collective(WarpOp::kShflDown, mask, to_bits(var), static_cast<int>(delta), width));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  using namespace freedit_emu;
  return from_bits<T>(warp_collective(WarpOp::kShflXor, mask, to_bits(var), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(freedit_emu::warp_collective(freedit_emu::WarpOp::kBallot, mask, predicate != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(freedit_emu::warp_collective(freedit_emu::WarpOp::kAny, mask, predicate != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(freedit_emu::warp_collective(freedit_emu::WarpOp::kAll, mask, predicate != 0, 0, 32));
}
inline unsigned __activemask() { return freedit_emu::active_lanes(); }
inline void __nanosleep(unsigned) { freedit_emu::yield_thread(); }
[[noreturn]] inline void __trap() { freedit_emu::trap_thread(); }

// Blocks of one launch may run at the same time on different host threads: fences are real.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }

// ---- atomics (relaxed, as CUDA's; real atomics: other blocks run concurrently) -------------------
#define FREEDIT_EMU_INT_ATOMICS(T)                                                                          \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }                     \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }                     \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }                   \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }                     \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }                       \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }                     \
  inline T atomicMin(T* a, T v) {                                                                          \
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                          \
    while (v < old && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
    }                                                                                                      \
    return old;                                                                                            \
  }                                                                                                        \
  inline T atomicMax(T* a, T v) {                                                                          \
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                          \
    while (v > old && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
    }                                                                                                      \
    return old;                                                                                            \
  }                                                                                                        \
  inline T atomicCAS(T* a, T compare, T v) {                                                               \
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);                \
    return compare;                                                                                        \
  }
FREEDIT_EMU_INT_ATOMICS(int)
FREEDIT_EMU_INT_ATOMICS(unsigned int)
FREEDIT_EMU_INT_ATOMICS(long long)
FREEDIT_EMU_INT_ATOMICS(unsigned long long)
#undef FREEDIT_EMU_INT_ATOMICS

inline float atomicAdd(float* a, float v) { return std::atomic_ref<float>(*a).fetch_add(v, std::memory_order_relaxed); }
inline double atomicAdd(double* a, double v) {
  return std::atomic_ref<double>(*a).fetch_add(v, std::memory_order_relaxed);
}
inline float atomicExch(float* a, float v) { return std::atomic_ref<float>(*a).exchange(v, std::memory_order_relaxed); }
// ((old >= v) ? 0 : old + 1) and (((old == 0) || (old > v)) ? v : old - 1), atomically.
inline unsigned atomicInc(unsigned* a, unsigned v) {
  unsigned old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(a, &old, old >= v ? 0u : old + 1u, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline unsigned atomicDec(unsigned* a, unsigned v) {
  unsigned old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(a, &old, (old == 0u || old > v) ? v : old - 1u, true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED)) {
  }
  return old;
}

// ---- arithmetic intrinsics -----------------------------------------------------------------------
inline float __fadd_rn(float a, float b) { return freedit_emu::opaque(a + b); }
inline float __fsub_rn(float a, float b) { return freedit_emu::opaque(a - b); }
inline float __fmul_rn(float a, float b) { return freedit_emu::opaque(a * b); }
inline float __fdiv_rn(float a, float b) { return freedit_emu::opaque(a / b); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return freedit_emu::opaque(a + b); }
inline double __dsub_rn(double a, double b) { return freedit_emu::opaque(a - b); }
inline double __dmul_rn(double a, double b) { return freedit_emu::opaque(a * b); }
inline double __ddiv_rn(double a, double b) { return freedit_emu::opaque(a / b); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __frcp_rn(float a) { return freedit_emu::opaque(1.0f / a); }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline double rsqrt(double a) { return 1.0 / sqrt(a); }
inline float __saturatef(float a) { return a > 0.0f ? (a < 1.0f ? a : 1.0f) : 0.0f; }  // NaN -> 0
// The fast approximate intrinsics are the precise functions here (the GPU's are less accurate).
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float __log2f(float a) { return log2f(a); }
inline float __log10f(float a) { return log10f(a); }
inline float __sinf(float a) { return sinf(a); }
inline float __cosf(float a) { return cosf(a); }
inline float __tanf(float a) { return tanf(a); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __exp10f(float a) { return exp10f(a); }
inline void __sincosf(float a, float* s, float* c) { sincosf(a, s, c); }
inline float __fdividef(float a, float b) { return a / b; }

inline int __float_as_int(float f) { return freedit_emu::from_bits<int>(freedit_emu::to_bits(f)); }
inline unsigned __float_as_uint(float f) { return freedit_emu::from_bits<unsigned>(freedit_emu::to_bits(f)); }
inline float __int_as_float(int i) { return freedit_emu::from_bits<float>(freedit_emu::to_bits(i)); }
inline float __uint_as_float(unsigned u) { return freedit_emu::from_bits<float>(freedit_emu::to_bits(u)); }
inline long long __double_as_longlong(double d) { return freedit_emu::from_bits<long long>(freedit_emu::to_bits(d)); }
inline double __longlong_as_double(long long i) { return freedit_emu::from_bits<double>(freedit_emu::to_bits(i)); }
inline int __float2int_rn(float f) { return static_cast<int>(nearbyintf(f)); }
inline int __float2int_rz(float f) { return static_cast<int>(f); }
inline int __float2int_rd(float f) { return static_cast<int>(floorf(f)); }
inline int __float2int_ru(float f) { return static_cast<int>(ceilf(f)); }
inline unsigned __float2uint_rn(float f) { return static_cast<unsigned>(nearbyintf(f)); }
inline float __int2float_rn(int i) { return static_cast<float>(i); }
inline float __uint2float_rn(unsigned u) { return static_cast<float>(u); }
inline float __double2float_rn(double d) { return static_cast<float>(d); }

inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) {
  return static_cast<long long>((static_cast<__int128>(a) * b) >> 64);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(static_cast<unsigned>(x)) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll(static_cast<unsigned long long>(x)) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}
template <class T>
T __ldg(const T* p) {
  return *p;
}

// CUDA's device min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
