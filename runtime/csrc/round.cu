// The fused FREE round (DESIGN §3.2, §5): everything a round does between its model calls, on the
// buffers of one workspace (freedit_kernels.h describes the layout). runtime/round_numpy.py is the
// oracle, op for op; the shared formulas live in round_maths.cuh.
//
//   join -> plan -> stage -> [draft_inputs -> drafter engine -> draft_step] x L -> target engine
//        -> verify -> decide -> commit -> (report copied to pinned memory)
#include "round_maths.cuh"

namespace freedit {
namespace {

// Purposes of the keyed noise (runtime/noise.py Purpose) and the residual's attempt shift
// (round.py ATTEMPT_SHIFT): part of the keys, so CPU and GPU draw the same numbers.
constexpr uint32_t kInit = 1, kStep = 2, kDraft = 3, kAccept = 4, kResidual = 5, kResidualAccept = 6;
constexpr int kAttemptShift = 8;
constexpr int kMaxResidualAttempts = 1 << 20;  // coupling.MAX_RESIDUAL_ATTEMPTS
constexpr int kPlanThreads = 1024;
constexpr int kReport = 5;  // ints per report row
constexpr int kNonfiniteBase = 1 << 30;  // report column 4: kNonfiniteBase - the first bad position

__device__ inline size_t row_offset(int row, int elems) { return static_cast<size_t>(row) * elems; }

// Copy `bytes` (a feature row) in 4-byte words when both ends allow it, else bytewise.
__device__ inline void copy_row(void* dst, const void* src, int bytes) {
  if (bytes % 4 == 0) {
    const uint32_t* s = static_cast<const uint32_t*>(src);
    uint32_t* d = static_cast<uint32_t*>(dst);
    for (int i = threadIdx.x; i < bytes / 4; i += blockDim.x) d[i] = s[i];
  } else {
    const unsigned char* s = static_cast<const unsigned char*>(src);
    unsigned char* d = static_cast<unsigned char*>(dst);
    for (int i = threadIdx.x; i < bytes; i += blockDim.x) d[i] = s[i];
  }
}

// Exclusive prefix sum of one int per thread over the block; `*total` gets the block's sum.
// `scan` holds blockDim.x ints of shared memory.
__device__ inline int block_exclusive_scan(int value, int* scan, int* total) {
  scan[threadIdx.x] = value;
  __syncthreads();
  for (int offset = 1; offset < blockDim.x; offset <<= 1) {  // Hillis-Steele inclusive scan
    const int add = threadIdx.x >= offset ? scan[threadIdx.x - offset] : 0;
    __syncthreads();
    scan[threadIdx.x] += add;
    __syncthreads();
  }
  const int inclusive = scan[threadIdx.x];
  *total = scan[blockDim.x - 1];
  __syncthreads();  // scan is reused by the next call
  return inclusive - value;
}

// Block verification keys a round's draws by its start step + 1 too (0: the plain keys), so a later
// round never reuses the draws of drafts a failed block depended on (DESIGN §3.3.1).
__device__ inline int round_stream(const freedit_round& r, int s) {
  return r.verifier == FREEDIT_VERIFY_BLOCK ? r.step[s] + 1 : 0;
}

__device__ inline int window_at(const freedit_round& r, int s) {
  const int step = r.step[s];
  if (step < 0) return -1;
  if (!r.has_parent[s]) return 0;  // the first round of a chain is one plain DiT step
  int L = r.window_table ? r.window_table[step] : r.window;
  if (L > r.max_window) L = r.max_window;  // the host refuses such schedules; never overrun the lists
  return L < step ? L : step;  // never draft past the last (noiseless) step
}

// ---- join ---------------------------------------------------------------------------------------
__global__ void join_kernel(freedit_round r, const int* __restrict__ joins, const long long* __restrict__ labels,
                            int n) {
  const int E = r.channels * r.pixels;
  const uint32_t blocks = static_cast<uint32_t>((E + 3) / 4);
  for (int j = blockIdx.x; j < n; j += gridDim.x) {
    const int s = joins[2 * j], sample = joins[2 * j + 1];
    float* x = r.x + row_offset(s, E);
    for (uint32_t b = threadIdx.x; b < blocks; b += blockDim.x) {
      float z[4];
      normals4(philox_block(r.seed, b, static_cast<uint32_t>(sample), static_cast<uint32_t>(r.num_steps), kInit), z);
      for (int i = 0; i < 4 && 4 * static_cast<int>(b) + i < E; ++i) x[4 * b + i] = z[i];
    }
    if (threadIdx.x == 0) {
      r.step[s] = r.num_steps - 1;
      r.has_parent[s] = 0;
      r.sample[s] = static_cast<unsigned>(sample);
      r.label[s] = labels[j];
    }
  }
}

// ---- plan -----------------------------------------------------------------------------------------
__global__ void plan_kernel(freedit_round r) {
  __shared__ int scan[kPlanThreads];
  __shared__ int carry;
  const int S = r.slots;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  // windows, first rows and the row arrays (each thread owns the slots base + threadIdx.x)
  for (int base = 0; base < S; base += blockDim.x) {
    const int s = base + threadIdx.x;
    const int w = s < S ? window_at(r, s) : -1;
    int total;
    const int before = block_exclusive_scan(w >= 0 ? w + 1 : 0, scan, &total);
    if (s < S) {
      const int first = carry + before;
      r.window_of[s] = w;
      r.first_row[s] = w >= 0 ? first : -1;
      r.report[s * kReport + 3] = r.report[s * kReport + 4] = 0;
      for (int pos = 0; pos <= w; ++pos) {
        r.row_slot[first + pos] = s;
        r.row_pos[first + pos] = pos;
        r.row_step[first + pos] = r.step[s] - pos;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) r.report[S * kReport] = carry;
  // draft lists: position k drafts the slots with window >= k, in slot order
  for (int k = 1; k <= r.max_window; ++k) {
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    for (int base = 0; base < S; base += blockDim.x) {
      const int s = base + threadIdx.x;
      const bool in = s < S && r.window_of[s] >= k;
      int total;
      const int rank = carry + block_exclusive_scan(in ? 1 : 0, scan, &total);
      if (in) {
        r.draft_src[(k - 1) * S + rank] = r.first_row[s] + k - 1;  // x~_{k-1}, drafted from
        r.draft_prev[(k - 1) * S + rank] = k >= 2 ? r.slot_rank[s] : -1;
        r.slot_rank[s] = rank;  // read back by this same thread at k + 1
      }
      __syncthreads();
      if (threadIdx.x == 0) carry += total;
      __syncthreads();
    }
  }
}

// ---- stage: the verify rows' scalars and x~_0 ----------------------------------------------------
__global__ void stage_kernel(freedit_round r, int R) {
  const int E = r.channels * r.pixels;
  const size_t total = row_offset(R, E);
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(idx / E), e = static_cast<int>(idx - row_offset(row, E));
    const int s = r.row_slot[row];
    if (e == 0) {
      const float t = r.timesteps[r.row_step[row]];
      r.v_t[row] = t;
      r.v_y[row] = r.label[s];
      if (r.guided) {
        r.v_t[R + row] = t;
        r.v_y[R + row] = r.null_label;
      }
    }
    if (r.row_pos[row] == 0) {
      const float x = r.x[row_offset(s, E) + e];
      r.v_x[idx] = x;
      if (r.guided) r.v_x[row_offset(R + row, E) + e] = x;
    }
  }
}

// ---- drafter inputs of position k: one block per (CFG half, list entry) ---------------------------
__global__ void draft_inputs_kernel(freedit_round r, int k, int n, int n_prev) {
  const int E = r.channels * r.pixels, S = r.slots;
  const int g = blockIdx.x / n, j = blockIdx.x - g * n;
  const int src = r.draft_src[(k - 1) * S + j], s = r.row_slot[src], st = r.row_step[src];
  const int dst = g * n + j;
  const char* feat = k == 1
      ? static_cast<const char*>(r.parent_feat) + row_offset(s * (r.guided ? 2 : 1) + g, r.feat_row_bytes)
      : static_cast<const char*>(r.d_feat_out) + row_offset(g * n_prev + r.draft_prev[(k - 1) * S + j],
                                                             r.feat_row_bytes);
  copy_row(static_cast<char*>(r.d_feat) + row_offset(dst, r.feat_row_bytes), feat, r.feat_row_bytes);
  for (int e = threadIdx.x; e < E; e += blockDim.x) r.d_x[row_offset(dst, E) + e] = r.v_x[row_offset(src, E) + e];
  if (threadIdx.x == 0) {
    r.d_t[dst] = r.timesteps[st];
    if (r.d_tfeat) r.d_tfeat[dst] = r.timesteps[st + 1];  // the features given are those of step st + 1
    r.d_y[dst] = g == 0 ? r.label[s] : r.null_label;
  }
}

// ---- draft step: p_k, its noise, x~_k --------------------------------------------------------------
// One work item per Philox block (4 elements) of each list entry.
__global__ void draft_step_kernel(freedit_round r, int k, int n, int R, int frozen) {
  const int E = r.channels * r.pixels, O = r.out_channels * r.pixels, S = r.slots;
  const int blocks = (E + 3) / 4;
  const int guided_elems = r.guided_channels * r.pixels;
  const bool learned = r.variance == FREEDIT_VARIANCE_LEARNED;
  const size_t total = static_cast<size_t>(n) * blocks;
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(idx / blocks), b = static_cast<int>(idx - static_cast<size_t>(j) * blocks);
    const int src = r.draft_src[(k - 1) * S + j], s = r.row_slot[src], st = r.row_step[src], dst = src + 1;
    const float* eps_row = frozen ? r.parent_eps + row_offset(s, O) : r.d_eps + row_offset(j, O);
    const float* null_row = r.d_eps + row_offset(n + j, O);
    const float* gap_row = r.parent_gap ? r.parent_gap + row_offset(s, O) : nullptr;
    float z[4];
    normals4(philox_block(r.seed, static_cast<uint32_t>(b), r.sample[s], keyed_step(st, round_stream(r, s)), kDraft),
             z);
    for (int i = 0; i < 4; ++i) {
      const int e = 4 * b + i;
      if (e >= E) break;
      float eps = eps_row[e];
      if (!frozen && r.guided && e < guided_elems)  // the null row drafted, or implied by the parent's gap
        eps = cfg_element(eps, gap_row ? sub_rn(eps, gap_row[e]) : null_row[e], r.cfg_scale);
      const float v = learned ? eps_row[E + e] : 0.0f;  // v from the conditional row
      float mean, lv;
      transition_element(r.table, st, r.variance, r.v_x[row_offset(src, E) + e], eps, v, &mean, &lv);
      r.mean_p[row_offset(dst, E) + e] = mean;
      r.log_var_p[row_offset(dst, E) + e] = lv;
      const float x = add_rn(mean, mul_rn(expf(0.5f * lv), z[i]));
      r.v_x[row_offset(dst, E) + e] = x;
      if (r.guided) r.v_x[row_offset(R + dst, E) + e] = x;
    }
  }
}

// ---- verify: q from every verify row ---------------------------------------------------------------
__global__ void verify_kernel(freedit_round r, int R) {
  const int E = r.channels * r.pixels, O = r.out_channels * r.pixels;
  const int guided_elems = r.guided_channels * r.pixels;
  const bool learned = r.variance == FREEDIT_VARIANCE_LEARNED;
  const size_t total = row_offset(R, E);
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(idx / E), e = static_cast<int>(idx - row_offset(row, E));
    const float* cond = r.v_eps + row_offset(row, O);
    const float* null_row = r.v_eps + row_offset(R + row, O);
    float eps = cond[e];
    const float v = learned ? cond[E + e] : 0.0f;
    bool finite = isfinite(eps) && isfinite(v);
    if (r.guided) {
      finite = finite && isfinite(null_row[e]) && (!learned || isfinite(null_row[E + e]));
      if (e < guided_elems) eps = cfg_element(eps, null_row[e], r.cfg_scale);
    }
    if (!finite) {
      int* rep = r.report + r.row_slot[row] * kReport;
      atomicOr(rep + 3, FREEDIT_ROUND_FLAG_NONFINITE);
      atomicMax(rep + 4, kNonfiniteBase - r.row_pos[row]);  // the first (noisiest) position that broke
    }
    r.eps_q[row_offset(row, O) + e] = eps;
    if (learned) r.eps_q[row_offset(row, O) + E + e] = v;
    transition_element(r.table, r.row_step[row], r.variance, r.v_x[idx], eps, v, &r.mean_q[idx], &r.log_var_q[idx]);
  }
}

// ---- decide: one block per verify row; rows holding a draft (position >= 1) are decided ------------
__global__ void decide_kernel(freedit_round r, int R) {
  __shared__ double scratch[32];
  const int row = blockIdx.x;
  if (r.row_pos[row] == 0) return;  // x~_0 is the committed state, nothing to decide
  const int E = r.channels * r.pixels, q = row - 1, s = r.row_slot[row], st = r.row_step[q];
  const float *x = r.v_x + row_offset(row, E), *mp = r.mean_p + row_offset(row, E);
  const float *lvp = r.log_var_p + row_offset(row, E), *mq = r.mean_q + row_offset(q, E);
  const float* lvq = r.log_var_q + row_offset(q, E);
  double acc = 0.0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) acc += log_ratio_term(x[e], mp[e], lvp[e], mq[e], lvq[e]);
  acc = block_sum(acc, scratch);
  double gamma = 1.0;  // round_numpy.relax_gamma
  if (r.relax > 0.0f && r.relax_score == FREEDIT_RELAX_VARIANCE) {  // where the DiT's variance sits in the range
    const double lo = r.relax_table[2 * st], hi = r.relax_table[2 * st + 1];
    const double span = hi - lo > 1e-12 ? hi - lo : 1.0;
    double frac = 0.0;
    for (int e = threadIdx.x; e < E; e += blockDim.x) frac += (static_cast<double>(lvq[e]) - lo) / span;
    frac = block_sum(frac, scratch) / E;
    gamma = 1.0 / (1.0 + static_cast<double>(r.relax) * (frac > 0.0 ? frac : 0.0));
  } else if (r.relax > 0.0f) {  // the draft's gap: |mu_p - mu_q| in the target's standard deviations
    double gap = 0.0;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      const double d = static_cast<double>(mp[e]) - static_cast<double>(mq[e]);
      gap += d * d * exp(-static_cast<double>(lvq[e]));
    }
    gamma = 1.0 / (1.0 + static_cast<double>(r.relax) * sqrt(block_sum(gap, scratch)));
  }
  if (threadIdx.x == 0) {
    r.log_r[row] = acc;
    if (r.verifier != FREEDIT_VERIFY_BLOCK) {  // block verification draws its own uniforms, per level (commit)
      r.uniform[row] = to_uniform(philox_block(r.seed, 0, r.sample[s], static_cast<uint32_t>(st), kAccept).x);
      r.gamma[row] = gamma;
    }
  }
  (void)R;
}

// ---- commit: one block per slot ----------------------------------------------------------------------
__global__ void commit_kernel(freedit_round r, int R) {
  __shared__ double scratch[32];
  __shared__ int keep[32];
  __shared__ int winner[2];
  __shared__ int accepted;
  __shared__ double log_w[FREEDIT_ROUND_MAX_WINDOW + 1];
  const int s = blockIdx.x;
  const int w = r.window_of[s];
  if (w < 0) return;
  const int E = r.channels * r.pixels, O = r.out_channels * r.pixels, G = r.guided ? 2 : 1;
  const int first = r.first_row[s], start = r.step[s];
  const unsigned sample = r.sample[s];
  const bool block = r.verifier == FREEDIT_VERIFY_BLOCK;
  if (threadIdx.x == 0 && block) {  // coupling.block_weights, then the top level: all w drafts stand w.p. w_w
    log_w[0] = 0.0;
    for (int k = 1; k <= w; ++k) {
      const double t = log_w[k - 1] + r.log_r[first + k];
      log_w[k] = isnan(t) ? t : (t < 0.0 ? t : 0.0);  // np.minimum(0, t) propagates NaN
    }
    const uint32_t top = keyed_step(r.row_step[first + w], start + 1);
    accepted = log(to_uniform(philox_block(r.seed, 0, sample, top, kAccept).x)) < log_w[w] ? w : -1;
  } else if (threadIdx.x == 0) {  // positions in order until the first rejection
    int a = 0;
    while (a < w && accepted_at(r.log_r[first + a + 1], r.uniform[first + a + 1], r.gamma[first + a + 1])) ++a;
    accepted = a;
  }
  __syncthreads();
  int a = accepted;
  float* x = r.x + row_offset(s, E);
  int proposals = 0, flags = 0;
  for (int i = w - 1; block && a < 0; --i) {  // levels w-1 .. 0: end with the residual of w_i q - p, or pass on
    const int d = first + i + 1, q = d - 1;
    const ResidualRow row{r.mean_p + row_offset(d, E), r.log_var_p + row_offset(d, E), r.mean_q + row_offset(q, E),
                          r.log_var_q + row_offset(q, E), E, r.seed, sample, keyed_step(r.row_step[q], start + 1)};
    int outcome = 0;
    const int found = residual_block(row, kResidual, kResidualAccept, kAttemptShift, kMaxResidualAttempts, x, keep,
                                     winner, log_w[i], &outcome);
    proposals += found >= 0 ? found + 1 : kMaxResidualAttempts;
    if (found < 0) flags = FREEDIT_ROUND_FLAG_CAP_HIT;  // keeps the last proposal: reported
    if (found < 0 || outcome == 1) a = i;  // level 0 (w_0 = 1) never passes on
  }
  if (a < w && !block) {  // rejected at position a + 1: the residual (q - p)^+ of that transition
    const int d = first + a + 1, q = d - 1, st = r.row_step[q];
    const float *mp = r.mean_p + row_offset(d, E), *lvp = r.log_var_p + row_offset(d, E);
    const float *mq = r.mean_q + row_offset(q, E), *lvq = r.log_var_q + row_offset(q, E);
    double differ = 0.0;
    for (int e = threadIdx.x; e < E; e += blockDim.x) differ += lvp[e] != lvq[e] ? 1.0 : 0.0;
    if (block_sum(differ, scratch) == 0.0) {  // equal covariances: the one-shot reflection
      reflect_block(r.v_x + row_offset(d, E), mp, mq, lvq, E, x, scratch);
    } else {
      const ResidualRow row{mp, lvp, mq, lvq, E, r.seed, sample, static_cast<uint32_t>(st)};
      const int found = residual_block(row, kResidual, kResidualAccept, kAttemptShift, kMaxResidualAttempts, x, keep,
                                       winner);
      proposals = found >= 0 ? found + 1 : kMaxResidualAttempts;
      flags = found >= 0 ? 0 : FREEDIT_ROUND_FLAG_CAP_HIT;
    }
  } else if (a == w) {  // the whole window passed: the bonus step from q at x~_w, exactly
    const int b = first + w, st = r.row_step[b];
    const float *mq = r.mean_q + row_offset(b, E), *lvq = r.log_var_q + row_offset(b, E);
    if (r.ddim) {  // ops.ddim_step, eta = 0
      const float* coef = r.table + static_cast<size_t>(st) * kTableColumns;
      const double ca = coef[kSqrtRecipAbar], cb = coef[kSqrtRecipm1Abar];
      const double prev = r.ddim_table[2 * st], prev_c = r.ddim_table[2 * st + 1];
      const float *xb = r.v_x + row_offset(b, E), *eps = r.eps_q + row_offset(b, O);
      for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const double x0 = ca * xb[e] - cb * eps[e];
        const double eps2 = (ca * xb[e] - x0) / cb;
        x[e] = static_cast<float>(x0 * prev + prev_c * eps2);
      }
    } else {
      const int blocks = (E + 3) / 4;
      for (int blk = threadIdx.x; blk < blocks; blk += blockDim.x) {
        float z[4];
        normals4(philox_block(r.seed, static_cast<uint32_t>(blk), sample, static_cast<uint32_t>(st), kStep), z);
        for (int i = 0; i < 4 && 4 * blk + i < E; ++i) {
          const int e = 4 * blk + i;
          x[e] = st == 0 ? mq[e] : add_rn(mq[e], mul_rn(expf(0.5f * lvq[e]), z[i]));
        }
      }
    }
  }
  // The new state's parent is x~ at the start of the last committed transition: its real outputs.
  const int parent = first + a, new_step = start - (a + 1);
  for (int g = 0; g < G; ++g)
    copy_row(static_cast<char*>(r.parent_feat) + row_offset(s * G + g, r.feat_row_bytes),
             static_cast<const char*>(r.v_feat) + row_offset(g * R + parent, r.feat_row_bytes), r.feat_row_bytes);
  for (int o = threadIdx.x; o < O; o += blockDim.x) r.parent_eps[row_offset(s, O) + o] = r.eps_q[row_offset(parent, O) + o];
  if (r.parent_gap)
    for (int o = threadIdx.x; o < O; o += blockDim.x)
      r.parent_gap[row_offset(s, O) + o] = sub_rn(r.v_eps[row_offset(parent, O) + o], r.v_eps[row_offset(R + parent, O) + o]);
  __syncthreads();  // x is complete
  if (new_step < 0 && r.results && static_cast<int>(sample) < r.results_rows)
    for (int e = threadIdx.x; e < E; e += blockDim.x) r.results[row_offset(static_cast<int>(sample), E) + e] = x[e];
  if (threadIdx.x == 0) {
    r.step[s] = new_step;
    r.has_parent[s] = 1;
    int* rep = r.report + s * kReport;
    rep[0] = new_step;
    rep[1] = a;
    rep[2] = proposals;
    rep[3] |= flags;
  }
}

}  // namespace
}  // namespace freedit

using namespace freedit;

namespace {
// Host-side checks of a descriptor: sizes positive, the buffers every kernel dereferences present.
bool valid(const freedit_round* r) {
  return r && r->slots > 0 && r->max_window >= 0 && r->max_window <= FREEDIT_ROUND_MAX_WINDOW && r->max_rows > 0 &&
         r->channels > 0 && r->pixels > 0 &&
         r->out_channels >= r->channels && r->num_steps > 0 && r->feat_row_bytes > 0 && r->x && r->step &&
         r->has_parent && r->sample && r->label && r->parent_feat && r->parent_eps && r->window_of && r->first_row &&
         r->row_slot && r->row_pos && r->row_step && r->table && r->timesteps && r->v_x && r->v_t && r->v_y &&
         r->v_eps && r->v_feat && r->mean_q && r->log_var_q && r->eps_q && r->report &&
         r->guided_channels >= 0 && r->guided_channels <= r->channels && (!r->ddim || r->ddim_table) &&
         (r->relax <= 0.0f || r->relax_table) && (!r->parent_gap || r->guided) &&
         (r->relax_score == FREEDIT_RELAX_GAP || r->relax_score == FREEDIT_RELAX_VARIANCE) &&
         (r->verifier == FREEDIT_VERIFY_STEP || (r->verifier == FREEDIT_VERIFY_BLOCK && r->relax <= 0.0f));
}
bool has_drafts(const freedit_round* r) {
  return r->draft_src && r->draft_prev && r->slot_rank && r->mean_p && r->log_var_p && r->log_r && r->uniform &&
         r->gamma;
}
}  // namespace

extern "C" int freedit_round_join(const freedit_round* r, const int* joins, const long long* labels, int n,
                                  void* stream) {
  if (!valid(r) || !joins || !labels || n <= 0 || n > r->slots) return cudaErrorInvalidValue;
  FREEDIT_LAUNCH(join_kernel, n < 1024 ? n : 1024, kThreads, 0, as_stream(stream))(*r, joins, labels, n);
  return finish_launch();
}

extern "C" int freedit_round_plan(const freedit_round* r, void* stream) {
  if (!valid(r) || (r->max_window > 0 && !has_drafts(r))) return cudaErrorInvalidValue;
  FREEDIT_LAUNCH(plan_kernel, 1, kPlanThreads, 0, as_stream(stream))(*r);
  return finish_launch();
}

extern "C" int freedit_round_stage(const freedit_round* r, int rows, void* stream) {
  if (!valid(r) || rows <= 0 || rows > r->max_rows) return cudaErrorInvalidValue;
  FREEDIT_LAUNCH(stage_kernel, grid_for(static_cast<size_t>(rows) * r->channels * r->pixels), kThreads, 0,
                 as_stream(stream))(*r, rows);
  return finish_launch();
}

extern "C" int freedit_round_draft_inputs(const freedit_round* r, int k, int n, int n_prev, void* stream) {
  if (!valid(r) || !has_drafts(r) || !r->d_feat || !r->d_x || !r->d_t || !r->d_y) return cudaErrorInvalidValue;
  if (k < 1 || k > r->max_window || n <= 0 || n > r->slots || (k > 1 && (!r->d_feat_out || n_prev < n)))
    return cudaErrorInvalidValue;
  FREEDIT_LAUNCH(draft_inputs_kernel, (r->guided && !r->parent_gap ? 2 : 1) * n, kThreads, 0, as_stream(stream))(*r, k, n, n_prev);
  return finish_launch();
}

extern "C" int freedit_round_draft_step(const freedit_round* r, int k, int n, int rows, int frozen, void* stream) {
  if (!valid(r) || !has_drafts(r) || (!frozen && !r->d_eps)) return cudaErrorInvalidValue;
  if (k < 1 || k > r->max_window || n <= 0 || n > r->slots || rows <= 0 || rows > r->max_rows)
    return cudaErrorInvalidValue;
  const size_t work = static_cast<size_t>(n) * ((r->channels * r->pixels + 3) / 4);
  FREEDIT_LAUNCH(draft_step_kernel, grid_for(work), kThreads, 0, as_stream(stream))(*r, k, n, rows, frozen);
  return finish_launch();
}

extern "C" int freedit_round_verify(const freedit_round* r, int rows, void* stream) {
  if (!valid(r) || rows <= 0 || rows > r->max_rows) return cudaErrorInvalidValue;
  FREEDIT_LAUNCH(verify_kernel, grid_for(static_cast<size_t>(rows) * r->channels * r->pixels), kThreads, 0,
                 as_stream(stream))(*r, rows);
  return finish_launch();
}

extern "C" int freedit_round_decide(const freedit_round* r, int rows, void* stream) {
  if (!valid(r) || !has_drafts(r) || rows <= 0 || rows > r->max_rows) return cudaErrorInvalidValue;
  FREEDIT_LAUNCH(decide_kernel, rows, kThreads, 0, as_stream(stream))(*r, rows);
  return finish_launch();
}

extern "C" int freedit_round_commit(const freedit_round* r, int rows, void* stream) {
  if (!valid(r) || rows <= 0 || rows > r->max_rows) return cudaErrorInvalidValue;
  if (r->max_window > 0 && !has_drafts(r)) return cudaErrorInvalidValue;
  FREEDIT_LAUNCH(commit_kernel, r->slots, kThreads, 0, as_stream(stream))(*r, rows);
  return finish_launch();
}
