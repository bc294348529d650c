// C ABI of the freedit CUDA kernels library, loaded from Python without torch (ctypes).
//
// Every kernel entry point returns a cudaError_t as int (0 = success; a launch or argument error
// otherwise, text from freedit_error_string) and is enqueued on the given stream (a cudaStream_t
// passed as void*; NULL = the legacy default stream). Nothing is synchronised or allocated.
//
// Layout: every tensor is a dense row-major array whose first axis is the row (one sample at one
// window position); "per_row" is the number of elements after it (C*H*W). Decisions that need
// float64 in the numpy oracle (runtime/coupling.py) take and produce double.
// The semantics of each entry point, and its numpy oracle, are in docs/KERNELS.md.
#pragma once

// 1: freedit_transition_f32 only. 2: dtype codes, all sampling kernels, helpers.
// 3: the device runtime (memory, streams, events, graphs, counters) and the fused FREE round.
// 6: the round descriptor's parent_gap (guided drafts from the parent's guidance gap).
#define FREEDIT_KERNELS_ABI_VERSION 6

#include <stddef.h>

// Element types of model outputs (eps_v).
#define FREEDIT_DTYPE_F32 0
#define FREEDIT_DTYPE_F16 1
#define FREEDIT_DTYPE_BF16 2

// Variance of a transition: fixed "small" (clipped posterior), learned (v interpolates log beta_tilde
// .. log beta, eps_v has 2C channels), fixed "large" (DiT's: posterior variance at step 0, beta after).
#define FREEDIT_VARIANCE_FIXED_SMALL 0
#define FREEDIT_VARIANCE_LEARNED 1
#define FREEDIT_VARIANCE_FIXED_LARGE 2

// CFG modes (runtime/ops.py::guided_channels): guide min(3, C) channels (DiT's reference) or all C.
#define FREEDIT_CFG_REFERENCE 0
#define FREEDIT_CFG_ALL 1

#if defined(__GNUC__)
#define FREEDIT_API __attribute__((visibility("default")))
#else
#define FREEDIT_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

// ---- helpers (no device needed) --------------------------------------------------------------
FREEDIT_API int freedit_kernels_abi_version(void);
// cudaGetErrorString / cudaGetErrorName of a code returned by any entry point.
FREEDIT_API const char* freedit_error_string(int code);
FREEDIT_API const char* freedit_error_name(int code);
// cudaGetDeviceCount: returns its error code (35 = no driver on a machine without a GPU).
FREEDIT_API int freedit_device_count(int* count);
// cudaPointerGetAttributes(ptr).type (0 unregistered host, 1 host, 2 device, 3 managed): lets the
// binding refuse host pointers before a kernel reads them. Returns the cudaError_t of the query.
FREEDIT_API int freedit_pointer_memory_type(const void* ptr, int* memory_type);
// cudaPointerGetAttributes(ptr).device: the binding refuses device memory of another GPU than the
// current one (kernels run on the current device).
FREEDIT_API int freedit_pointer_device(const void* ptr, int* device);

// ---- model outputs -> transition ---------------------------------------------------------------
// Why: every verify and draft step turns (eps, v) into the Gaussian p(x_{i-1} | x_i); fused here so
// the model output (fp32/fp16/bf16) is read once. Oracle: ops.transition.
// x [rows, channels*pixels] fp32; eps_v [rows, (variance == LEARNED ? 2 : 1) * channels*pixels] of
// eps_dtype; steps [rows] respaced step indices; table = Schedule.transition_table() as fp32
// [num_steps, 6]. A row whose step is outside [0, num_steps) gets NaN (never an out-of-range read).
FREEDIT_API int freedit_transition(const float* x, const void* eps_v, int eps_dtype, const int* steps,
                                   const float* table, int num_steps, int rows, int channels, int pixels, int variance,
                                   float* mean, float* log_var, void* stream);

// Why: with CFG the engine returns [cond rows; null rows]; combining on device avoids a host trip.
// eps_v [2*rows, out_channels*pixels] (cond rows first, as runtime/target.py lays them out) of
// eps_dtype -> out [rows, out_channels*pixels] fp32: out = u + scale*(c - u) on the first guided
// channels (min(3, channels) or channels), the conditional row elsewhere. Oracle: ops.cfg_combine.
FREEDIT_API int freedit_cfg_combine(const void* eps_v, int eps_dtype, int rows, int channels, int out_channels,
                                    int pixels, float scale, int mode, float* out, void* stream);

// ---- keyed noise -------------------------------------------------------------------------------
// Why: noise keyed by (seed, sample, step, purpose) makes device and CPU samplers draw the same
// numbers whatever the batch. Philox4x32-10, counter (block, sample[r], step[r], purpose[r]),
// key (seed & 0xffffffff, seed >> 32). out [rows, count]. Oracle: runtime/noise.py.
// Raw 32-bit words (noise._blocks), bit-identical.
FREEDIT_API int freedit_philox_bits(unsigned long long seed, const unsigned* sample, const unsigned* step,
                                    const unsigned* purpose, int rows, int count, unsigned* out, void* stream);
// Uniforms (bits + 0.5) * 2^-32 in double, bit-identical to noise.uniform.
FREEDIT_API int freedit_philox_uniform(unsigned long long seed, const unsigned* sample, const unsigned* step,
                                       const unsigned* purpose, int rows, int count, double* out, void* stream);
// Standard normals, Box-Muller on pairs in double, rounded to fp32 (noise.normal).
FREEDIT_API int freedit_philox_normal(unsigned long long seed, const unsigned* sample, const unsigned* step,
                                      const unsigned* purpose, int rows, int count, float* out, void* stream);

// ---- sampling ----------------------------------------------------------------------------------
// Why: the draft samples and the bonus step commit x = mean + exp(lv/2) z; no noise at step 0.
// All arrays [rows, per_row] fp32, steps [rows]; out may alias mean. Oracle: ops.ddpm_step.
FREEDIT_API int freedit_ddpm_step(const float* mean, const float* log_var, const int* steps, const float* noise,
                                  int rows, int per_row, float* out, void* stream);

// Why: the accept statistic of every window position, one block per row, summed in double in a
// fixed order. out[r] = log q(x_r) - log p(x_r) (diagonal Gaussians). Oracle: coupling.log_ratio.
FREEDIT_API int freedit_log_ratio(const float* x, const float* mean_p, const float* log_var_p, const float* mean_q,
                                  const float* log_var_q, int rows, int per_row, double* out, void* stream);

// Why: the per-sample first rejection of a ragged window in one launch. Rows are sample-major:
// sample s owns rows [offset_s, offset_s + windows[s]), offset_s = sum of earlier windows, and the
// windows must add up to rows. Position k is accepted iff log(uniform) < min(0, gamma * log_r)
// (gamma NULL = 1; NaN rejects). accepted[s] = positions accepted before the first rejection;
// reject_row[s] (may be NULL) = the row of that rejection, -1 when the whole window passed.
// A negative window, or windows that do not add up to rows, give -1 in accepted for every sample.
// Oracle: coupling.accept applied position by position as speculative.py does.
FREEDIT_API int freedit_accept_window(const double* log_r, const double* uniform, const double* gamma, int rows,
                                      const int* windows, int samples, int* accepted, int* reject_row, void* stream);

// Why: the one-shot exact residual for equal covariances (fixed-variance models).
// Output row i reads input row index[i] (index NULL: i; index[i] < 0: row i untouched; index[i] >=
// in_rows: NaN): x' = mu_q + sigma (z - 2 (e.z) e), z = (x - mu_p)/sigma, e = unit (mu_p - mu_q)/sigma;
// the two row reductions in double (e = 0 when mu_p = mu_q). Inputs [in_rows, per_row], out [out_rows, per_row].
// Oracle: coupling.reflect.
FREEDIT_API int freedit_reflect(const float* x, const float* mean_p, const float* mean_q, const float* log_var,
                                int in_rows, int per_row, const int* index, int out_rows, float* out, void* stream);

// Why: the exact residual (q - p)^+ for unequal covariances (learned sigma), by rejection, without
// a host round trip per attempt. Output row i (input row index[i], as for reflect; index[i] < 0:
// out row untouched, proposals 0, cap_hit 0) proposes, for attempt a = 0, 1, ...:
//   y = mu_q + exp(lv_q/2) z, z = philox_normal(seed, sample[i], step[i], purpose_z + (a << attempt_shift))
//   keep iff log r(y) > 0 and u < -expm1(-log r(y)), u = philox_uniform(..., purpose_u + (a << shift))[0]
// and keeps the first success in attempt order (attempts are evaluated in parallel, the result is
// the same as one at a time). After max_attempts failures it keeps attempt max_attempts - 1 and sets
// cap_hit. out [out_rows, per_row]; proposals [out_rows] = accepted attempt + 1 (max_attempts at the
// cap). Oracle: coupling.sample_residual with speculative.py's residual_draw.
FREEDIT_API int freedit_residual(const float* mean_p, const float* log_var_p, const float* mean_q,
                                 const float* log_var_q, int in_rows, int per_row, const int* index, int out_rows,
                                 unsigned long long seed, const unsigned* sample, const unsigned* step,
                                 unsigned purpose_z, unsigned purpose_u, int attempt_shift, int max_attempts,
                                 float* out, int* proposals, int* cap_hit, void* stream);

// ---- the fused FREE round (runtime/round.py drives it; runtime/round_numpy.py is its oracle) ---
// Why: a round's maths between model calls in a handful of launches, on buffers allocated once,
// with the top-block features never leaving the device. All pointers are device memory of one
// workspace; the descriptor itself is read on the host at launch. Layouts (S slots, G = 2 rows per
// state with CFG (conditional rows first, then all null rows), E = C*H*W, O = out_channels*H*W):
//   slot state   x [S,E] f32, step [S] (-1 = empty), has_parent [S], sample [S] (noise key),
//                label [S] i64, parent_feat [S,G,feat_row_bytes], parent_eps [S,O] (guided)
//   plan         window_of [S] (-1 inactive), first_row [S], row_slot/row_pos/row_step [R],
//                draft_src/draft_prev [max_window,S], slot_rank [S] (scratch)
//   verify I/O   v_x [G*R,E], v_t [G*R], v_y [G*R] i64, v_eps [G*R,O], v_feat [G*R,feat_row_bytes]
//   drafter I/O  d_feat [G*n,...], d_x, d_t, d_tfeat (NULL if the drafter has no t_feat), d_y,
//                d_feat_out, d_eps; with parent_gap (guided) only the conditional rows [n,...]
//   maths        mean_p/log_var_p/mean_q/log_var_q [R,E], eps_q [R,O], log_r/uniform/gamma [R] f64
//   report       [S+1, 5] i32: per slot (new step, accepted, residual proposals, flags, 2^30 - the
//                first window position whose target output was not finite, or 0), then the round's
//                status row (rows planned, 0, ...). Flags: 1 residual cap hit, 2 non-finite output.
//   results      [results_rows, E]: a sample's final state lands in row sample[s] when it finishes.
// Verify rows are sample-major: slot s owns rows first_row[s] .. first_row[s] + window_of[s], row
// first_row[s] + k holding x~_k (x~_0 = the committed state). Row r's q is the target transition
// from x~ at row r; row r's p (k >= 1) is the draft transition that produced x~ at row r.
#define FREEDIT_RELAX_GAP 0       // u = |mu_p - mu_q| / sigma_q (round_numpy.draft_gap)
#define FREEDIT_RELAX_VARIANCE 1  // u = the learned variance's place in [beta_tilde, beta] (round_numpy.uncertainty)
#define FREEDIT_VERIFY_STEP 0   // position by position up to the first rejection (DESIGN §3.2)
#define FREEDIT_VERIFY_BLOCK 1  // the window jointly (DESIGN §3.3.1); its DRAFT, ACCEPT and RESIDUAL draws
                                // carry the round's start step + 1 in the high half of the counter's step word
#define FREEDIT_ROUND_MAX_WINDOW 64  // limits.MAX_WINDOW
#define FREEDIT_ROUND_FLAG_CAP_HIT 1
#define FREEDIT_ROUND_FLAG_NONFINITE 2

typedef struct freedit_round {
  int slots, max_window, max_rows, channels, pixels, out_channels, variance, guided, guided_channels;
  int num_steps, feat_row_bytes, ddim, window, results_rows;
  int relax_score;  // FREEDIT_RELAX_GAP or FREEDIT_RELAX_VARIANCE (used when relax > 0)
  int verifier;     // FREEDIT_VERIFY_STEP or FREEDIT_VERIFY_BLOCK (block: relax must be 0)
  float cfg_scale, relax;
  long long null_label;
  unsigned long long seed;
  const int* window_table;  // [num_steps] L per respaced step, or NULL: `window` everywhere
  const float* table;       // [num_steps, 6] Schedule.transition_table()
  const float* timesteps;   // [num_steps + 1] original timestep (float) per respaced step
  const float* ddim_table;  // [num_steps, 2] sqrt(abar_prev), sqrt(1 - abar_prev) (DDIM only)
  const double* relax_table;  // [num_steps, 2] log beta_tilde, log beta in double (relax's score)
  float* x;
  int* step;
  int* has_parent;
  unsigned* sample;
  long long* label;
  void* parent_feat;
  float* parent_eps;
  int* window_of;
  int* first_row;
  int* row_slot;
  int* row_pos;
  int* row_step;
  int* draft_src;
  int* draft_prev;
  int* slot_rank;
  float* v_x;
  float* v_t;
  long long* v_y;
  const float* v_eps;
  const void* v_feat;
  void* d_feat;
  float* d_x;
  float* d_t;
  float* d_tfeat;
  long long* d_y;
  const void* d_feat_out;
  const float* d_eps;
  float* mean_p;
  float* log_var_p;
  float* mean_q;
  float* log_var_q;
  float* eps_q;
  double* log_r;
  double* uniform;
  double* gamma;
  int* report;
  float* results;
  float* parent_gap;  // [S,O] cond - null output of each slot's parent, or NULL: guided drafts draft both rows
} freedit_round;

// New samples enter free slots: joins [n, 2] (slot, sample) and labels [n] (device arrays). The
// state is the starting noise, keyed (seed, sample, num_steps, INIT) as the numpy path draws it.
FREEDIT_API int freedit_round_join(const freedit_round* r, const int* joins, const long long* labels, int n,
                                   void* stream);
// One block: windows (min(L, step), 0 without a parent), rows, the draft lists; resets flags.
FREEDIT_API int freedit_round_plan(const freedit_round* r, void* stream);
// Verify rows of the round (`rows` = R, the host's own count): timesteps, labels, x~_0.
FREEDIT_API int freedit_round_stage(const freedit_round* r, int rows, void* stream);
// Drafter inputs of position k (n samples, n_prev at k - 1): parent or drafted features by index.
FREEDIT_API int freedit_round_draft_inputs(const freedit_round* r, int k, int n, int n_prev, void* stream);
// Draft transition p_k from the drafter's output (frozen = 1: the parent's real eps), its noise,
// and x~_k written into the verify input (both CFG halves).
FREEDIT_API int freedit_round_draft_step(const freedit_round* r, int k, int n, int rows, int frozen, void* stream);
// The target's transitions q from every verify row (CFG combined), and the non-finite check.
FREEDIT_API int freedit_round_verify(const freedit_round* r, int rows, void* stream);
// Per draft row: log q(x~) - log p(x~), the accept uniform, relax's gamma.
FREEDIT_API int freedit_round_decide(const freedit_round* r, int rows, void* stream);
// Per slot: the accept scan, the residual (reflection or rejection) or the bonus step, the commit
// (new state, step, parent features), the report row, the finished sample's result.
FREEDIT_API int freedit_round_commit(const freedit_round* r, int rows, void* stream);

// ---- device runtime ----------------------------------------------------------------------------
// Why: the FREE round (runtime/round_device.py) allocates its buffers once, orders drafting and
// verification with streams and events, and replays fixed-shape rounds as CUDA graphs through
// these, so that the same Python code drives a GPU and the host emulation of this library.
// Each returns a cudaError_t; handles (streams, events, graph execs) are opaque void*.
FREEDIT_API int freedit_rt_set_device(int device);
FREEDIT_API int freedit_rt_get_device(int* device);
FREEDIT_API int freedit_rt_compute_capability(int device, int* major, int* minor);
FREEDIT_API int freedit_rt_mem_get_info(size_t* free_bytes, size_t* total_bytes);
FREEDIT_API int freedit_rt_malloc(void** ptr, size_t bytes);
FREEDIT_API int freedit_rt_free(void* ptr);
FREEDIT_API int freedit_rt_host_alloc(void** ptr, size_t bytes);  // pinned host memory
FREEDIT_API int freedit_rt_host_free(void* ptr);
// kind: cudaMemcpyKind (0 host->host, 1 host->device, 2 device->host, 3 device->device, 4 default).
FREEDIT_API int freedit_rt_memcpy_async(void* dst, const void* src, size_t bytes, int kind, void* stream);
FREEDIT_API int freedit_rt_memset_async(void* dst, int value, size_t bytes, void* stream);
FREEDIT_API int freedit_rt_stream_create(void** stream);  // cudaStreamNonBlocking
FREEDIT_API int freedit_rt_stream_destroy(void* stream);
FREEDIT_API int freedit_rt_stream_synchronize(void* stream);
FREEDIT_API int freedit_rt_event_create(void** event, int timing);  // timing 0: cudaEventDisableTiming
FREEDIT_API int freedit_rt_event_destroy(void* event);
FREEDIT_API int freedit_rt_event_record(void* event, void* stream);
FREEDIT_API int freedit_rt_stream_wait_event(void* stream, void* event);
FREEDIT_API int freedit_rt_event_synchronize(void* event);
FREEDIT_API int freedit_rt_event_query(void* event);  // 0 done, 600 (cudaErrorNotReady) pending
FREEDIT_API int freedit_rt_event_elapsed_ms(float* ms, void* start, void* end);
// A host function in stream order (cudaLaunchHostFunc): capturable into a graph as a host node.
typedef void (*freedit_host_fn)(void* data);
FREEDIT_API int freedit_rt_launch_host_func(void* stream, freedit_host_fn fn, void* data);
// Graph capture of one stream (thread-local mode); end_capture instantiates (NULL on failure).
FREEDIT_API int freedit_rt_begin_capture(void* stream);
FREEDIT_API int freedit_rt_end_capture(void* stream, void** graph_exec);
FREEDIT_API int freedit_rt_is_capturing(void* stream, int* capturing);
FREEDIT_API int freedit_rt_graph_launch(void* graph_exec, void* stream);
FREEDIT_API int freedit_rt_graph_destroy(void* graph_exec);
// Counters since load: kernel launches made by this library, bytes copied host<->device by
// freedit_rt_memcpy_async. Benchmarks report them per round.
FREEDIT_API long long freedit_launch_count(void);
FREEDIT_API void freedit_copy_bytes(long long* host_to_device, long long* device_to_host);

// ---- host references (CPU, host pointers, synchronous) ----------------------------------------
// Why: the Philox/Box-Muller and residual code above, compiled for the CPU from the same source,
// so a machine without a GPU checks the counter layout, the keys and the attempt order against
// the numpy oracle. kind: 0 raw bits (unsigned), 1 uniforms (double), 2 normals (float).
FREEDIT_API int freedit_philox_host(unsigned long long seed, const unsigned* sample, const unsigned* step,
                                    const unsigned* purpose, int rows, int count, int kind, void* out);
// freedit_residual's contract, one attempt at a time.
FREEDIT_API int freedit_residual_host(const float* mean_p, const float* log_var_p, const float* mean_q,
                                      const float* log_var_q, int in_rows, int per_row, const int* index, int out_rows,
                                      unsigned long long seed, const unsigned* sample, const unsigned* step,
                                      unsigned purpose_z, unsigned purpose_u, int attempt_shift, int max_attempts,
                                      float* out, int* proposals, int* cap_hit);

#ifdef __cplusplus
}
#endif
