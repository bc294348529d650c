// The CUDA runtime API of the host emulation: errors, the device, memory, streams, events, host
// functions and graph capture.
//
// Work runs synchronously when it is enqueued, in order, so stream and event ordering holds
// trivially. On a capturing stream launches, copies, memsets, host functions and graph launches
// are recorded as graph nodes instead, and cudaGraphLaunch replays them in recording order (a
// topological order of the captured dependencies). CUDA's capture rules are enforced where they
// decide whether code that works here would work on a GPU:
//   - a stream that waits on an event recorded in a capturing stream joins that capture (fork);
//     ending the capture requires every joined stream to be joined back (cudaErrorStreamCaptureUnjoined);
//   - synchronising or querying a capturing stream, the device or an event recorded during capture,
//     waiting on an event from outside the capture, using the legacy stream while a blocking stream
//     captures, and allocating or freeing memory from a capturing thread (global mode: any thread)
//     are errors that invalidate the capture; its streams then fail with
//     cudaErrorStreamCaptureInvalidated until cudaStreamEndCapture, which returns no graph.
// Errors are not sticky (a GPU makes a kernel fault sticky for the context).
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "freedit_emulation.h"
#include "internal.h"

namespace freedit_emu {
namespace {

// The emulated device: an 80 GB compute capability 8.0 GPU (the oldest architecture the library
// is built for), 108 multiprocessors. Memory above kMapThreshold is mapped lazily.
constexpr int kComputeMajor = 8, kComputeMinor = 0, kMultiprocessors = 108;
constexpr size_t kDeviceBytes = size_t{80} << 30;
constexpr size_t kMapThreshold = size_t{1} << 20;
constexpr size_t kDeviceAlignment = 256;
constexpr unsigned char kPoison = 0xFF;  // fresh small device allocations: NaN as floats, -1 as ints

thread_local cudaError_t tls_last_error = cudaSuccess;

enum class OpKind { kKernel, kCopy, kSet, kHost, kGraph };

struct Op;
using OpList = std::vector<Op>;

struct Op {
  OpKind kind;
  std::vector<int> deps;  // captured dependencies (node indices), for the join check
  std::shared_ptr<void> closure;
  KernelCall call{};
  dim3 grid, block;
  void* dst = nullptr;
  const void* src = nullptr;
  size_t bytes = 0;
  int value = 0;
  cudaHostFn_t fn = nullptr;
  void* data = nullptr;
  std::shared_ptr<const OpList> graph;
};

struct Capture {
  unsigned long long id;
  CUstream_st* origin;
  std::thread::id thread;
  cudaStreamCaptureMode mode;
  bool invalidated = false;
  OpList ops;
  std::vector<CUstream_st*> streams;  // the origin and every stream that joined
};

struct Allocation {
  size_t bytes;
  cudaMemoryType type;
  bool mapped;
};

}  // namespace
}  // namespace freedit_emu

using namespace freedit_emu;

struct CUstream_st {
  unsigned flags;
  Capture* capture = nullptr;
  std::vector<int> frontier;  // the nodes the next captured operation depends on
};

struct CUevent_st {
  unsigned flags;
  bool recorded = false;
  std::chrono::steady_clock::time_point when{};
  unsigned long long capture = 0;  // id of the capture it was last recorded in (0: none)
  std::vector<int> nodes;
};

struct CUgraph_st {
  OpList ops;
};

struct CUgraphExec_st {
  std::shared_ptr<const OpList> ops;
};

namespace freedit_emu {
namespace {

std::mutex g_api;  // guards everything below
std::map<uintptr_t, Allocation> g_allocations;
size_t g_device_in_use = 0;
std::set<CUstream_st*> g_streams;
std::set<CUevent_st*> g_events;
std::set<CUgraph_st*> g_graphs;
std::set<CUgraphExec_st*> g_execs;
std::map<unsigned long long, Capture*> g_captures;  // active (not yet ended) captures
unsigned long long g_next_capture = 1;
CUstream_st g_legacy_stream{cudaStreamDefault};
thread_local CUstream_st tls_per_thread_stream{cudaStreamDefault};

using Lock = std::lock_guard<std::mutex>;

void before_fork() { g_api.lock(); }
void after_fork() { g_api.unlock(); }
[[maybe_unused]] const int g_atfork = pthread_atfork(&before_fork, &after_fork, &after_fork);

// ---- capture bookkeeping (callers hold g_api) ----------------------------------------------------
CUstream_st* resolve(cudaStream_t handle, cudaError_t* err) {
  if (!handle || handle == cudaStreamLegacy) return &g_legacy_stream;
  if (handle == cudaStreamPerThread) return &tls_per_thread_stream;
  if (!g_streams.count(handle)) {
    *err = cudaErrorInvalidResourceHandle;
    return nullptr;
  }
  return handle;
}

void invalidate(Capture* capture) {
  if (capture) capture->invalidated = true;
}

bool uses_blocking_stream(const Capture* capture) {
  for (const CUstream_st* s : capture->streams)
    if (!(s->flags & cudaStreamNonBlocking)) return true;
  return false;
}

// May work be enqueued on `s` now? The legacy stream may not be used while a blocking stream
// captures; a stream of an invalidated capture refuses everything until the capture ends.
cudaError_t enqueue_check(CUstream_st* s) {
  if (s == &g_legacy_stream) {
    bool implicit = false;
    for (auto& [id, capture] : g_captures) {
      if (uses_blocking_stream(capture)) {
        invalidate(capture);
        implicit = true;
      }
    }
    if (implicit) return cudaErrorStreamCaptureImplicit;
  }
  if (s->capture && s->capture->invalidated) return cudaErrorStreamCaptureInvalidated;
  return cudaSuccess;
}

// Allocation and freeing are "potentially unsafe" during capture: not from a thread that captures
// (thread-local mode) and from no thread while a global-mode capture is active.
cudaError_t unsafe_call_check() {
  bool refused = false;
  for (auto& [id, capture] : g_captures) {
    const bool applies = capture->mode == cudaStreamCaptureModeGlobal ||
                         (capture->mode == cudaStreamCaptureModeThreadLocal &&
                          capture->thread == std::this_thread::get_id());
    if (applies) {
      invalidate(capture);
      refused = true;
    }
  }
  return refused ? cudaErrorStreamCaptureUnsupported : cudaSuccess;
}

void add_node(CUstream_st* s, Op op) {
  Capture* capture = s->capture;
  op.deps = s->frontier;
  s->frontier.assign(1, static_cast<int>(capture->ops.size()));
  capture->ops.push_back(std::move(op));
}

// Records `op` if `handle` is capturing (*run_now = false), else says it must run now.
cudaError_t submit(cudaStream_t handle, Op&& op, bool* run_now) {
  *run_now = false;
  Lock lock(g_api);
  cudaError_t err = cudaSuccess;
  CUstream_st* s = resolve(handle, &err);
  if (!s) return err;
  err = enqueue_check(s);
  if (err) return err;
  if (s->capture) {
    add_node(s, std::move(op));
  } else {
    *run_now = true;
  }
  return cudaSuccess;
}

cudaError_t run_op(const Op& op) {
  switch (op.kind) {
    case OpKind::kKernel:
      return execute_grid(op.call, op.grid, op.block);
    case OpKind::kCopy:
      memmove(op.dst, op.src, op.bytes);
      return cudaSuccess;
    case OpKind::kSet:
      memset(op.dst, op.value, op.bytes);
      return cudaSuccess;
    case OpKind::kHost:
      op.fn(op.data);
      return cudaSuccess;
    case OpKind::kGraph:
      for (const Op& node : *op.graph) {
        const cudaError_t err = run_op(node);
        if (err) return err;
      }
      return cudaSuccess;
  }
  return cudaErrorUnknown;
}

cudaError_t submit_or_run(cudaStream_t stream, Op&& op) {
  bool run_now = false;
  Op local = op;  // kept for running after the lock is released
  const cudaError_t err = submit(stream, std::move(op), &run_now);
  if (err || !run_now) return err;
  return run_op(local);
}

// Events last recorded in a capturing stream stand for no work that runs: querying or
// synchronising one is refused (and invalidates its capture, if still active).
cudaError_t refuse_captured_event(CUevent_st* e) {
  auto it = g_captures.find(e->capture);
  if (it != g_captures.end()) invalidate(it->second);
  return cudaErrorCapturedEvent;
}

const Allocation* find_allocation(const void* ptr, uintptr_t* base) {
  const auto p = reinterpret_cast<uintptr_t>(ptr);
  auto it = g_allocations.upper_bound(p);
  if (it == g_allocations.begin()) return nullptr;
  --it;
  if (p >= it->first + it->second.bytes) return nullptr;
  *base = it->first;
  return &it->second;
}

struct ErrorText {
  cudaError_t code;
  const char *name, *text;
};

// cudaGetErrorName / cudaGetErrorString of the CUDA 13 runtime for the codes used here.
constexpr ErrorText kErrors[] = {
    {cudaSuccess, "cudaSuccess", "no error"},
    {cudaErrorInvalidValue, "cudaErrorInvalidValue", "invalid argument"},
    {cudaErrorMemoryAllocation, "cudaErrorMemoryAllocation", "out of memory"},
    {cudaErrorInitializationError, "cudaErrorInitializationError", "initialization error"},
    {cudaErrorInvalidConfiguration, "cudaErrorInvalidConfiguration", "invalid configuration argument"},
    {cudaErrorInvalidDevicePointer, "cudaErrorInvalidDevicePointer", "invalid device pointer"},
    {cudaErrorInvalidMemcpyDirection, "cudaErrorInvalidMemcpyDirection", "invalid copy direction for memcpy"},
    {cudaErrorInsufficientDriver, "cudaErrorInsufficientDriver",
     "CUDA driver version is insufficient for CUDA runtime version"},
    {cudaErrorNoDevice, "cudaErrorNoDevice", "no CUDA-capable device is detected"},
    {cudaErrorInvalidDevice, "cudaErrorInvalidDevice", "invalid device ordinal"},
    {cudaErrorInvalidResourceHandle, "cudaErrorInvalidResourceHandle", "invalid resource handle"},
    {cudaErrorIllegalState, "cudaErrorIllegalState", "the operation cannot be performed in the present state"},
    {cudaErrorNotReady, "cudaErrorNotReady", "device not ready"},
    {cudaErrorIllegalAddress, "cudaErrorIllegalAddress", "an illegal memory access was encountered"},
    {cudaErrorLaunchOutOfResources, "cudaErrorLaunchOutOfResources", "too many resources requested for launch"},
    {cudaErrorLaunchTimeout, "cudaErrorLaunchTimeout", "the launch timed out and was terminated"},
    {cudaErrorAssert, "cudaErrorAssert", "device-side assert triggered"},
    {cudaErrorIllegalInstruction, "cudaErrorIllegalInstruction", "an illegal instruction was encountered"},
    {cudaErrorLaunchFailure, "cudaErrorLaunchFailure", "unspecified launch failure"},
    {cudaErrorStreamCaptureUnsupported, "cudaErrorStreamCaptureUnsupported",
     "operation not permitted when stream is capturing"},
    {cudaErrorStreamCaptureInvalidated, "cudaErrorStreamCaptureInvalidated",
     "operation failed due to a previous error during capture"},
    {cudaErrorStreamCaptureMerge, "cudaErrorStreamCaptureMerge",
     "operation would result in a merge of separate capture sequences"},
    {cudaErrorStreamCaptureUnmatched, "cudaErrorStreamCaptureUnmatched",
     "capture was not ended in the same stream as it began"},
    {cudaErrorStreamCaptureUnjoined, "cudaErrorStreamCaptureUnjoined", "capturing stream has unjoined work"},
    {cudaErrorStreamCaptureIsolation, "cudaErrorStreamCaptureIsolation",
     "dependency created on uncaptured work in another stream"},
    {cudaErrorStreamCaptureImplicit, "cudaErrorStreamCaptureImplicit",
     "operation would make the legacy stream depend on a capturing blocking stream"},
    {cudaErrorCapturedEvent, "cudaErrorCapturedEvent",
     "operation not permitted on an event last recorded in a capturing stream"},
    {cudaErrorStreamCaptureWrongThread, "cudaErrorStreamCaptureWrongThread",
     "attempt to terminate a thread-local capture sequence from another thread"},
    {cudaErrorUnknown, "cudaErrorUnknown", "unknown error"},
};

const ErrorText* error_text(cudaError_t code) {
  for (const ErrorText& e : kErrors)
    if (e.code == code) return &e;
  return nullptr;
}

}  // namespace

cudaError_t set_last_error(cudaError_t err) {
  if (err != cudaSuccess) tls_last_error = err;
  return err;
}

cudaError_t launch_kernel(const KernelCall& call, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream) {
  const cudaError_t config = validate_launch(grid, block, shared_bytes);
  {
    Lock lock(g_api);
    cudaError_t err = cudaSuccess;
    CUstream_st* s = resolve(stream, &err);
    if (!s) return set_last_error(err);
    if (config) {  // a failed launch invalidates the capture it was meant for
      invalidate(s->capture);
      return set_last_error(config);
    }
    err = enqueue_check(s);
    if (err) return set_last_error(err);
    if (s->capture) {
      Op op{OpKind::kKernel};
      op.closure = std::shared_ptr<void>(call.clone(call.closure), call.destroy);
      op.call = call;
      op.call.closure = op.closure.get();
      op.grid = grid;
      op.block = block;
      add_node(s, std::move(op));
      return cudaSuccess;
    }
  }
  return set_last_error(execute_grid(call, grid, block));
}

}  // namespace freedit_emu

// ---- errors ------------------------------------------------------------------------------------
cudaError_t cudaGetLastError(void) {
  const cudaError_t err = tls_last_error;
  tls_last_error = cudaSuccess;
  return err;
}

cudaError_t cudaPeekAtLastError(void) { return tls_last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  const ErrorText* e = error_text(error);
  return e ? e->text : "unrecognized error code";
}

const char* cudaGetErrorName(cudaError_t error) {
  const ErrorText* e = error_text(error);
  return e ? e->name : "unrecognized error code";
}

// ---- device ------------------------------------------------------------------------------------
cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return set_last_error(cudaErrorInvalidValue);
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return set_last_error(device == 0 ? cudaSuccess : cudaErrorInvalidDevice); }

cudaError_t cudaGetDevice(int* device) {
  if (!device) return set_last_error(cudaErrorInvalidValue);
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (!value) return set_last_error(cudaErrorInvalidValue);
  if (device != 0) return set_last_error(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
    case cudaDevAttrMaxBlockDimX:
    case cudaDevAttrMaxBlockDimY:
      *value = 1024;
      break;
    case cudaDevAttrMaxBlockDimZ:
      *value = 64;
      break;
    case cudaDevAttrMaxGridDimX:
      *value = 0x7FFFFFFF;
      break;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ:
      *value = 65535;
      break;
    case cudaDevAttrMaxSharedMemoryPerBlock:
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = 48 * 1024;
      break;
    case cudaDevAttrWarpSize:
      *value = 32;
      break;
    case cudaDevAttrMultiProcessorCount:
      *value = kMultiprocessors;
      break;
    case cudaDevAttrMaxThreadsPerMultiProcessor:
      *value = 2048;
      break;
    case cudaDevAttrConcurrentKernels:
    case cudaDevAttrUnifiedAddressing:
      *value = 1;
      break;
    case cudaDevAttrComputeCapabilityMajor:
      *value = kComputeMajor;
      break;
    case cudaDevAttrComputeCapabilityMinor:
      *value = kComputeMinor;
      break;
    default:
      return set_last_error(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  if (!free_bytes || !total_bytes) return set_last_error(cudaErrorInvalidValue);
  Lock lock(g_api);
  *total_bytes = kDeviceBytes;
  *free_bytes = kDeviceBytes - g_device_in_use;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  Lock lock(g_api);
  for (auto& [id, capture] : g_captures) invalidate(capture);
  return set_last_error(g_captures.empty() ? cudaSuccess : cudaErrorStreamCaptureUnsupported);
}

// ---- memory ------------------------------------------------------------------------------------
cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  if (!ptr) return set_last_error(cudaErrorInvalidValue);
  Lock lock(g_api);
  if (const cudaError_t err = unsafe_call_check()) return set_last_error(err);
  *ptr = nullptr;
  if (!bytes) return cudaSuccess;
  if (bytes > kDeviceBytes - g_device_in_use) return set_last_error(cudaErrorMemoryAllocation);
  const size_t rounded = (bytes + kDeviceAlignment - 1) / kDeviceAlignment * kDeviceAlignment;
  const bool mapped = rounded >= kMapThreshold;
  void* p;
  if (mapped) {  // zero pages, backed only when touched
    p = mmap(nullptr, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return set_last_error(cudaErrorMemoryAllocation);
  } else {
    p = aligned_alloc(kDeviceAlignment, rounded);
    if (!p) return set_last_error(cudaErrorMemoryAllocation);
    memset(p, kPoison, rounded);
  }
  g_allocations[reinterpret_cast<uintptr_t>(p)] = Allocation{rounded, cudaMemoryTypeDevice, mapped};
  g_device_in_use += rounded;
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (!ptr) return cudaSuccess;
  Lock lock(g_api);
  if (const cudaError_t err = unsafe_call_check()) return set_last_error(err);
  auto it = g_allocations.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == g_allocations.end() || it->second.type != cudaMemoryTypeDevice)
    return set_last_error(cudaErrorInvalidValue);
  if (it->second.mapped) {
    munmap(ptr, it->second.bytes);
  } else {
    free(ptr);
  }
  g_device_in_use -= it->second.bytes;
  g_allocations.erase(it);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
  if (!ptr) return set_last_error(cudaErrorInvalidValue);
  Lock lock(g_api);
  if (const cudaError_t err = unsafe_call_check()) return set_last_error(err);
  *ptr = nullptr;
  if (!bytes) return cudaSuccess;
  const size_t rounded = (bytes + 4095) / 4096 * 4096;
  void* p = aligned_alloc(4096, rounded);
  if (!p) return set_last_error(cudaErrorMemoryAllocation);
  g_allocations[reinterpret_cast<uintptr_t>(p)] = Allocation{rounded, cudaMemoryTypeHost, false};
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* ptr) {
  if (!ptr) return cudaSuccess;
  Lock lock(g_api);
  if (const cudaError_t err = unsafe_call_check()) return set_last_error(err);
  auto it = g_allocations.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == g_allocations.end() || it->second.type != cudaMemoryTypeHost) return set_last_error(cudaErrorInvalidValue);
  free(ptr);
  g_allocations.erase(it);
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* ptr) {
  if (!attributes) return set_last_error(cudaErrorInvalidValue);
  Lock lock(g_api);
  *attributes = cudaPointerAttributes{};
  uintptr_t base = 0;
  const Allocation* a = find_allocation(ptr, &base);
  if (!a) {
    attributes->type = cudaMemoryTypeUnregistered;
    attributes->device = -2;
    return cudaSuccess;
  }
  attributes->type = a->type;
  attributes->device = 0;
  attributes->devicePointer = const_cast<void*>(ptr);
  attributes->hostPointer = a->type == cudaMemoryTypeHost ? const_cast<void*>(ptr) : nullptr;
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault) return set_last_error(cudaErrorInvalidMemcpyDirection);
  if ((!dst || !src) && bytes) return set_last_error(cudaErrorInvalidValue);
  Op op{OpKind::kCopy};
  op.dst = dst;
  op.src = src;
  op.bytes = bytes;
  return set_last_error(submit_or_run(stream, std::move(op)));
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream) {
  if (!dst && bytes) return set_last_error(cudaErrorInvalidValue);
  Op op{OpKind::kSet};
  op.dst = dst;
  op.value = value;
  op.bytes = bytes;
  return set_last_error(submit_or_run(stream, std::move(op)));
}

cudaError_t cudaMemset(void* dst, int value, size_t bytes) { return cudaMemsetAsync(dst, value, bytes, nullptr); }

// ---- streams -----------------------------------------------------------------------------------
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  if (!stream || (flags & ~static_cast<unsigned>(cudaStreamNonBlocking))) return set_last_error(cudaErrorInvalidValue);
  Lock lock(g_api);
  auto* s = new CUstream_st{flags};
  g_streams.insert(s);
  *stream = s;
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }

// Destroying a capturing stream is refused here (and invalidates the capture).
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  Lock lock(g_api);
  if (!stream || !g_streams.count(stream)) return set_last_error(cudaErrorInvalidResourceHandle);
  if (stream->capture) {
    invalidate(stream->capture);
    return set_last_error(cudaErrorStreamCaptureUnsupported);
  }
  g_streams.erase(stream);
  delete stream;
  return cudaSuccess;
}

// Work is done when it is enqueued: waiting is only a matter of the capture rules.
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  Lock lock(g_api);
  cudaError_t err = cudaSuccess;
  CUstream_st* s = resolve(stream, &err);
  if (!s) return set_last_error(err);
  if (s->capture) {
    invalidate(s->capture);
    return set_last_error(cudaErrorStreamCaptureUnsupported);
  }
  return set_last_error(enqueue_check(s));
}

cudaError_t cudaStreamQuery(cudaStream_t stream) { return cudaStreamSynchronize(stream); }

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
  Lock lock(g_api);
  cudaError_t err = cudaSuccess;
  CUstream_st* s = resolve(stream, &err);
  if (!s) return set_last_error(err);
  if (!event || !g_events.count(event)) return set_last_error(cudaErrorInvalidResourceHandle);
  if (flags) return set_last_error(cudaErrorInvalidValue);
  if ((err = enqueue_check(s))) return set_last_error(err);
  if (event->capture) {
    auto it = g_captures.find(event->capture);
    if (it == g_captures.end()) return set_last_error(cudaErrorCapturedEvent);  // its capture has ended
    Capture* capture = it->second;
    if (capture->invalidated) return set_last_error(cudaErrorStreamCaptureInvalidated);
    if (!s->capture) {  // fork: the stream joins the capture
      s->capture = capture;
      capture->streams.push_back(s);
      s->frontier = event->nodes;
    } else if (s->capture == capture) {
      for (int node : event->nodes)
        if (std::find(s->frontier.begin(), s->frontier.end(), node) == s->frontier.end()) s->frontier.push_back(node);
    } else {
      invalidate(s->capture);
      invalidate(capture);
      return set_last_error(cudaErrorStreamCaptureMerge);
    }
    return cudaSuccess;
  }
  if (s->capture && event->recorded) {  // a dependency on work outside the capture
    invalidate(s->capture);
    return set_last_error(cudaErrorStreamCaptureIsolation);
  }
  return cudaSuccess;  // the event's work is done already
}

cudaError_t cudaLaunchHostFunc(cudaStream_t stream, cudaHostFn_t fn, void* user_data) {
  if (!fn) return set_last_error(cudaErrorInvalidValue);
  Op op{OpKind::kHost};
  op.fn = fn;
  op.data = user_data;
  return set_last_error(submit_or_run(stream, std::move(op)));
}

// ---- events ------------------------------------------------------------------------------------
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  if (!event || (flags & ~7u)) return set_last_error(cudaErrorInvalidValue);
  if ((flags & cudaEventInterprocess) && !(flags & cudaEventDisableTiming)) return set_last_error(cudaErrorInvalidValue);
  Lock lock(g_api);
  auto* e = new CUevent_st{flags};
  g_events.insert(e);
  *event = e;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  Lock lock(g_api);
  if (!event || !g_events.erase(event)) return set_last_error(cudaErrorInvalidResourceHandle);
  delete event;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  Lock lock(g_api);
  cudaError_t err = cudaSuccess;
  CUstream_st* s = resolve(stream, &err);
  if (!s) return set_last_error(err);
  if (!event || !g_events.count(event)) return set_last_error(cudaErrorInvalidResourceHandle);
  if ((err = enqueue_check(s))) return set_last_error(err);
  if (s->capture) {  // stands for the stream's captured work so far; no timestamp
    event->capture = s->capture->id;
    event->nodes = s->frontier;
    event->recorded = false;
  } else {
    event->capture = 0;
    event->nodes.clear();
    event->recorded = true;
    event->when = std::chrono::steady_clock::now();
  }
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  Lock lock(g_api);
  if (!event || !g_events.count(event)) return set_last_error(cudaErrorInvalidResourceHandle);
  if (event->capture) return set_last_error(refuse_captured_event(event));
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) { return cudaEventQuery(event); }

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (!ms) return set_last_error(cudaErrorInvalidValue);
  Lock lock(g_api);
  if (!start || !end || !g_events.count(start) || !g_events.count(end))
    return set_last_error(cudaErrorInvalidResourceHandle);
  if (start->capture || end->capture) return set_last_error(cudaErrorCapturedEvent);
  if ((start->flags | end->flags) & cudaEventDisableTiming) return set_last_error(cudaErrorInvalidResourceHandle);
  if (!start->recorded || !end->recorded) return set_last_error(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
  return cudaSuccess;
}

// ---- graphs ------------------------------------------------------------------------------------
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  if (mode < cudaStreamCaptureModeGlobal || mode > cudaStreamCaptureModeRelaxed)
    return set_last_error(cudaErrorInvalidValue);
  Lock lock(g_api);
  cudaError_t err = cudaSuccess;
  CUstream_st* s = resolve(stream, &err);
  if (!s) return set_last_error(err);
  if (s == &g_legacy_stream) return set_last_error(cudaErrorStreamCaptureUnsupported);
  if (s->capture) return set_last_error(cudaErrorIllegalState);
  auto* capture = new Capture{g_next_capture++, s, std::this_thread::get_id(), mode};
  capture->streams.push_back(s);
  g_captures[capture->id] = capture;
  s->capture = capture;
  s->frontier.clear();
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  if (!graph) return set_last_error(cudaErrorInvalidValue);
  *graph = nullptr;
  Lock lock(g_api);
  cudaError_t err = cudaSuccess;
  CUstream_st* s = resolve(stream, &err);
  if (!s) return set_last_error(err);
  Capture* capture = s->capture;
  if (!capture) return set_last_error(cudaErrorIllegalState);
  if (capture->origin != s) {
    invalidate(capture);
    return set_last_error(cudaErrorStreamCaptureUnmatched);
  }
  if (capture->mode != cudaStreamCaptureModeRelaxed && capture->thread != std::this_thread::get_id())
    return set_last_error(cudaErrorStreamCaptureWrongThread);
  // Every joined stream's last work must be an ancestor of the origin's (joined back).
  std::vector<char> reached(capture->ops.size(), 0);
  std::vector<int> todo = s->frontier;
  while (!todo.empty()) {
    const int node = todo.back();
    todo.pop_back();
    if (reached[node]) continue;
    reached[node] = 1;
    todo.insert(todo.end(), capture->ops[node].deps.begin(), capture->ops[node].deps.end());
  }
  bool unjoined = false;
  for (CUstream_st* joined : capture->streams) {
    for (int node : joined->frontier) unjoined |= !reached[node];
    joined->capture = nullptr;
    joined->frontier.clear();
  }
  g_captures.erase(capture->id);
  std::unique_ptr<Capture> ended(capture);
  if (ended->invalidated) return set_last_error(cudaErrorStreamCaptureInvalidated);
  if (unjoined) return set_last_error(cudaErrorStreamCaptureUnjoined);
  auto* g = new CUgraph_st{std::move(ended->ops)};
  g_graphs.insert(g);
  *graph = g;
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  if (!status) return set_last_error(cudaErrorInvalidValue);
  Lock lock(g_api);
  cudaError_t err = cudaSuccess;
  CUstream_st* s = resolve(stream, &err);
  if (!s) return set_last_error(err);
  *status = !s->capture                ? cudaStreamCaptureStatusNone
            : s->capture->invalidated ? cudaStreamCaptureStatusInvalidated
                                      : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  if (!exec) return set_last_error(cudaErrorInvalidValue);
  Lock lock(g_api);
  if (!graph || !g_graphs.count(graph)) return set_last_error(cudaErrorInvalidResourceHandle);
  auto* e = new CUgraphExec_st{std::make_shared<const OpList>(graph->ops)};
  g_execs.insert(e);
  *exec = e;
  return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  std::shared_ptr<const OpList> ops;
  {
    Lock lock(g_api);
    if (!exec || !g_execs.count(exec)) return set_last_error(cudaErrorInvalidResourceHandle);
    ops = exec->ops;
  }
  Op op{OpKind::kGraph};
  op.graph = std::move(ops);
  return set_last_error(submit_or_run(stream, std::move(op)));
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  Lock lock(g_api);
  if (!graph || !g_graphs.erase(graph)) return set_last_error(cudaErrorInvalidResourceHandle);
  delete graph;
  return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  Lock lock(g_api);
  if (!exec || !g_execs.erase(exec)) return set_last_error(cudaErrorInvalidResourceHandle);
  delete exec;
  return cudaSuccess;
}

extern "C" int freedit_emulation_last_error(int reset) {
  return static_cast<int>(reset ? cudaGetLastError() : cudaPeekAtLastError());
}
