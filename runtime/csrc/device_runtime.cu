// The device runtime the FREE round needs from Python: memory, pinned host memory, streams,
// events, CUDA graphs and counters, as thin C entry points over the CUDA runtime.
//
// Why here and not through cuda-python: the round then has one code path for a GPU and for the
// host emulation (runtime/csrc/emulation builds this file against the CUDA-runtime shim, where
// device memory is host memory), and the library counts what crosses the bus (bytes per round).
// Streams and events made here are ordinary CUDA handles: TensorRT, ONNX Runtime and torch take
// them as they are.
#include "common.cuh"

namespace freedit {
namespace {

std::atomic<long long> h2d_bytes{0}, d2h_bytes{0};

// cudaMemcpyDefault resolves the direction from the pointers; count it by asking the driver.
void count_copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (kind == cudaMemcpyDefault) {
    cudaPointerAttributes a{}, b{};
    const bool dst_dev = cudaPointerGetAttributes(&a, dst) == cudaSuccess && a.type == cudaMemoryTypeDevice;
    const bool src_dev = cudaPointerGetAttributes(&b, src) == cudaSuccess && b.type == cudaMemoryTypeDevice;
    cudaGetLastError();
    kind = dst_dev ? (src_dev ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                   : (src_dev ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  }
  if (kind == cudaMemcpyHostToDevice) h2d_bytes.fetch_add(static_cast<long long>(bytes));
  if (kind == cudaMemcpyDeviceToHost) d2h_bytes.fetch_add(static_cast<long long>(bytes));
}

}  // namespace
}  // namespace freedit

using namespace freedit;

extern "C" int freedit_rt_set_device(int device) { return static_cast<int>(cudaSetDevice(device)); }

extern "C" int freedit_rt_get_device(int* device) {
  if (!device) return cudaErrorInvalidValue;
  return static_cast<int>(cudaGetDevice(device));
}

extern "C" int freedit_rt_compute_capability(int device, int* major, int* minor) {
  if (!major || !minor) return cudaErrorInvalidValue;
  cudaError_t err = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, device);
  return static_cast<int>(err);
}

extern "C" int freedit_rt_mem_get_info(size_t* free_bytes, size_t* total_bytes) {
  if (!free_bytes || !total_bytes) return cudaErrorInvalidValue;
  return static_cast<int>(cudaMemGetInfo(free_bytes, total_bytes));
}

extern "C" int freedit_rt_malloc(void** ptr, size_t bytes) {
  if (!ptr) return cudaErrorInvalidValue;
  return static_cast<int>(cudaMalloc(ptr, bytes ? bytes : 1));
}

extern "C" int freedit_rt_free(void* ptr) { return static_cast<int>(cudaFree(ptr)); }

// Pinned host memory: the few bytes per round the host reads back come through it.
extern "C" int freedit_rt_host_alloc(void** ptr, size_t bytes) {
  if (!ptr) return cudaErrorInvalidValue;
  return static_cast<int>(cudaMallocHost(ptr, bytes ? bytes : 1));
}

extern "C" int freedit_rt_host_free(void* ptr) { return static_cast<int>(cudaFreeHost(ptr)); }

// kind: cudaMemcpyKind (0 host->host, 1 host->device, 2 device->host, 3 device->device, 4 default).
extern "C" int freedit_rt_memcpy_async(void* dst, const void* src, size_t bytes, int kind, void* stream) {
  if ((!dst || !src) && bytes) return cudaErrorInvalidValue;
  if (kind < 0 || kind > 4) return cudaErrorInvalidMemcpyDirection;
  if (!bytes) return cudaSuccess;
  count_copy(dst, src, bytes, static_cast<cudaMemcpyKind>(kind));
  return static_cast<int>(cudaMemcpyAsync(dst, src, bytes, static_cast<cudaMemcpyKind>(kind), as_stream(stream)));
}

extern "C" int freedit_rt_memset_async(void* dst, int value, size_t bytes, void* stream) {
  if (!dst && bytes) return cudaErrorInvalidValue;
  if (!bytes) return cudaSuccess;
  return static_cast<int>(cudaMemsetAsync(dst, value, bytes, as_stream(stream)));
}

// Non-blocking streams: they never synchronise with the legacy default stream.
extern "C" int freedit_rt_stream_create(void** stream) {
  if (!stream) return cudaErrorInvalidValue;
  return static_cast<int>(cudaStreamCreateWithFlags(reinterpret_cast<cudaStream_t*>(stream), cudaStreamNonBlocking));
}

extern "C" int freedit_rt_stream_destroy(void* stream) { return static_cast<int>(cudaStreamDestroy(as_stream(stream))); }

extern "C" int freedit_rt_stream_synchronize(void* stream) {
  return static_cast<int>(cudaStreamSynchronize(as_stream(stream)));
}

// timing = 0 makes a cheaper event for ordering only (cudaEventDisableTiming).
extern "C" int freedit_rt_event_create(void** event, int timing) {
  if (!event) return cudaErrorInvalidValue;
  return static_cast<int>(
      cudaEventCreateWithFlags(reinterpret_cast<cudaEvent_t*>(event), timing ? cudaEventDefault : cudaEventDisableTiming));
}

extern "C" int freedit_rt_event_destroy(void* event) {
  return static_cast<int>(cudaEventDestroy(static_cast<cudaEvent_t>(event)));
}

extern "C" int freedit_rt_event_record(void* event, void* stream) {
  return static_cast<int>(cudaEventRecord(static_cast<cudaEvent_t>(event), as_stream(stream)));
}

extern "C" int freedit_rt_stream_wait_event(void* stream, void* event) {
  return static_cast<int>(cudaStreamWaitEvent(as_stream(stream), static_cast<cudaEvent_t>(event), 0));
}

extern "C" int freedit_rt_event_synchronize(void* event) {
  return static_cast<int>(cudaEventSynchronize(static_cast<cudaEvent_t>(event)));
}

// 0 if the event has completed, cudaErrorNotReady (600) if not.
extern "C" int freedit_rt_event_query(void* event) {
  return static_cast<int>(cudaEventQuery(static_cast<cudaEvent_t>(event)));
}

extern "C" int freedit_rt_event_elapsed_ms(float* ms, void* start, void* end) {
  if (!ms) return cudaErrorInvalidValue;
  return static_cast<int>(cudaEventElapsedTime(ms, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(end)));
}

extern "C" int freedit_rt_launch_host_func(void* stream, freedit_host_fn fn, void* data) {
  if (!fn) return cudaErrorInvalidValue;
  return static_cast<int>(cudaLaunchHostFunc(as_stream(stream), fn, data));
}

// ---- CUDA graphs: capture a round once, replay it ----------------------------------------------
// Thread-local capture mode: other host threads may keep launching on their own streams.
extern "C" int freedit_rt_begin_capture(void* stream) {
  return static_cast<int>(cudaStreamBeginCapture(as_stream(stream), cudaStreamCaptureModeThreadLocal));
}

// Ends the capture and instantiates it; *graph_exec is NULL when the capture failed (the error is
// returned and the stream is out of capture mode either way).
extern "C" int freedit_rt_end_capture(void* stream, void** graph_exec) {
  if (!graph_exec) return cudaErrorInvalidValue;
  *graph_exec = nullptr;
  cudaGraph_t graph = nullptr;
  cudaError_t err = cudaStreamEndCapture(as_stream(stream), &graph);
  if (err != cudaSuccess) {
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
    return static_cast<int>(err);
  }
  cudaGraphExec_t exec = nullptr;
  err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return static_cast<int>(err);
  }
  *graph_exec = exec;
  return cudaSuccess;
}

// 1 while `stream` is capturing (a backend that cannot be captured checks this and says so).
extern "C" int freedit_rt_is_capturing(void* stream, int* capturing) {
  if (!capturing) return cudaErrorInvalidValue;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(as_stream(stream), &status);
  *capturing = status != cudaStreamCaptureStatusNone;
  return static_cast<int>(err);
}

extern "C" int freedit_rt_graph_launch(void* graph_exec, void* stream) {
  return static_cast<int>(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph_exec), as_stream(stream)));
}

extern "C" int freedit_rt_graph_destroy(void* graph_exec) {
  return static_cast<int>(cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(graph_exec)));
}

// ---- counters (benchmarks: launches and bytes per round) --------------------------------------
extern "C" long long freedit_launch_count(void) { return launch_counter().load(); }

extern "C" void freedit_copy_bytes(long long* host_to_device, long long* device_to_host) {
  if (host_to_device) *host_to_device = h2d_bytes.load();
  if (device_to_host) *device_to_host = d2h_bytes.load();
}
