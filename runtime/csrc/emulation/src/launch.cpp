// The launch engine of the host emulation: every block and every thread of a grid runs.
//
// A persistent pool of host threads (the launching thread included) takes blocks in order. A
// host thread runs one block at a time; each CUDA thread of it is a fiber with its own stack, and
// the block's scheduler switches between them only where they wait for each other:
//   __syncthreads   waits until every live thread of the block has arrived (threads that returned
//                   count as arrived, as on Volta and later);
//   warp collectives (__syncwarp, shuffles, votes) wait until every live lane of the mask has
//                   arrived with the same mask; the last one computes every lane's result.
// When no thread of a block can run but some have not returned, a barrier can never complete:
// the launch fails with cudaErrorLaunchFailure (and a description), it never hangs.
// A thread that runs to its end without waiting hands its stack to the next one, so a kernel
// without barriers costs about a function call per CUDA thread.
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "fiber.h"
#include "freedit_emulation.h"
#include "internal.h"

namespace freedit_emu {

namespace {

constexpr unsigned kMaxThreads = 1024;        // per block, as CUDA
constexpr size_t kMaxSharedBytes = 48 * 1024;  // dynamic shared memory per block without opt-in
constexpr size_t kStackBytes = FREEDIT_EMU_STACK_BYTES;

std::atomic<int> g_null_launch{0};
std::atomic<int> g_policy{FREEDIT_EMU_SCHEDULE_MIXED};
std::atomic<unsigned long long> g_seed{0x5EED5EEDull};
std::atomic<unsigned long long> g_launch_serial{0};
std::atomic<long long> g_grids{0}, g_blocks{0}, g_threads{0};
thread_local std::string tls_detail;

unsigned long long splitmix(unsigned long long& state) {
  unsigned long long z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buffer[512];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buffer, sizeof buffer, fmt, args);
  va_end(args);
  return buffer;
}

// One launch being executed: the blocks still to take and the first failure.
struct GridRun {
  const KernelCall* call;
  dim3 grid, block;
  unsigned threads;
  unsigned long long blocks;
  int policy;
  unsigned long long seed;
  std::atomic<unsigned long long> next{0};
  std::atomic<bool> failed{false};
  std::mutex detail_mutex;
  std::string detail;

  void fail(std::string text) {
    std::lock_guard<std::mutex> lock(detail_mutex);
    if (!failed.exchange(true)) detail = std::move(text);
  }
};

enum class State : unsigned char { kNotStarted, kRunnable, kRunning, kAtBarrier, kAtWarp, kDone, kTrapped };

struct ThreadCtx {
  ThreadView view;  // what threadIdx/blockIdx/... read while this thread runs
  Context ctx;
  char* stack = nullptr;
  unsigned id = 0, lane = 0, warp = 0;
  State state = State::kNotStarted;
  // the pending warp collective
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  int arg = 0, width = 32;
  unsigned long long value = 0, result = 0;
};

struct WarpState {
  uint32_t alive = 0;    // lanes that exist and have not returned
  uint32_t waiting = 0;  // lanes waiting at a warp collective
};

// Fiber stacks from mmap (pages are backed only when touched), each kStackBytes long and aligned to
// its size, with a guard page at the bottom (an overflow faults instead of corrupting the
// neighbour) and the StackHeader at the top. A stack is named by its aligned base.
class StackPool {
 public:
  StackPool() : page_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {}
  ~StackPool() {
    for (auto& [base, size] : regions_) munmap(base, size);
  }
  StackPool(const StackPool&) = delete;
  StackPool& operator=(const StackPool&) = delete;

  char* pop() {
    if (free_.empty()) grow();
    char* stack = free_.back();
    free_.pop_back();
    return stack;
  }
  void push(char* stack) { free_.push_back(stack); }

  static StackHeader* header(char* stack) {
    return reinterpret_cast<StackHeader*>(stack + kStackBytes - sizeof(StackHeader));
  }
  // Where a context may use it: above the guard page, below the header and a per-stack offset
  // ("colour"): the stacks are aligned alike, and without it the frames of all the threads of a
  // block would compete for the same few cache sets.
  char* usable(char* stack) const { return stack + page_; }
  size_t usable_bytes(char* stack) const {
    const size_t colour = (reinterpret_cast<uintptr_t>(stack) / kStackBytes % 256) * 128;
    return kStackBytes - page_ - sizeof(StackHeader) - colour;
  }

 private:
  void grow() {
    constexpr size_t kChunk = 64;
    const size_t total = kStackBytes * (kChunk + 1);  // one extra to align within
    void* region = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED) {
      perror("freedit emulation: cannot map fiber stacks");
      abort();
    }
    regions_.emplace_back(region, total);
    const uintptr_t first = (reinterpret_cast<uintptr_t>(region) + kStackBytes - 1) & ~(kStackBytes - 1);
    for (size_t i = 0; i < kChunk; ++i) {
      char* base = reinterpret_cast<char*>(first + i * kStackBytes);
      mprotect(base, page_, PROT_NONE);
      free_.push_back(base);
    }
  }

  size_t page_;
  std::vector<char*> free_;
  std::vector<std::pair<void*, size_t>> regions_;
};

// Runnable CUDA threads of a block; each thread is in it at most once.
class RunQueue {
 public:
  void clear() { head_ = size_ = 0; }
  bool empty() const { return size_ == 0; }
  unsigned size() const { return size_; }
  void push_back(unsigned t) { ring_[(head_ + size_++) & kMask] = static_cast<uint16_t>(t); }
  void push_front(unsigned t) {
    head_ = (head_ - 1) & kMask;
    ring_[head_] = static_cast<uint16_t>(t);
    ++size_;
  }
  unsigned pop_front() {
    const unsigned t = ring_[head_];
    head_ = (head_ + 1) & kMask;
    --size_;
    return t;
  }
  unsigned pop_back() { return ring_[(head_ + --size_) & kMask]; }
  unsigned pop_at(unsigned i) {  // any position: swap it to the front
    const unsigned at = (head_ + i) & kMask;
    const uint16_t t = ring_[at];
    ring_[at] = ring_[head_];
    ring_[head_] = t;
    return pop_front();
  }

 private:
  static constexpr unsigned kMask = kMaxThreads - 1;
  uint16_t ring_[kMaxThreads];
  unsigned head_ = 0, size_ = 0;
};

// The per-host-thread block scheduler.
class Worker {
 public:
  void run_blocks(GridRun& run) {
    long long done = 0;
    while (!run.failed.load(std::memory_order_relaxed)) {
      const unsigned long long b = run.next.fetch_add(1, std::memory_order_relaxed);
      if (b >= run.blocks) break;
      run_block(run, b);
      ++done;
    }
    g_blocks.fetch_add(done, std::memory_order_relaxed);
    g_threads.fetch_add(done * run.threads, std::memory_order_relaxed);
  }

  // ---- blocking points, called from the running CUDA thread ------------------------------------
  int barrier(BarrierOp op, int predicate) {
    ThreadCtx* me = current_;
    if (at_barrier_ == 0) barrier_op_ = op;
    me->state = State::kAtBarrier;
    ++at_barrier_;
    barrier_true_ += predicate != 0;
    if (at_barrier_ == alive_) release_barrier();
    wait_here();
    return barrier_result_;
  }

  unsigned long long collective(WarpOp op, unsigned mask, unsigned long long value, int arg, int width) {
    ThreadCtx* me = current_;
    if (width < 1 || width > 32 || (width & (width - 1)))
      fail_thread(format("a warp shuffle's width %d is not a power of two in 1..32", width));
    const uint32_t bit = 1u << me->lane;
    me->op = op;
    me->mask = mask | bit;  // a lane always takes part in its own collective
    me->value = value;
    me->arg = arg;
    me->width = width;
    me->state = State::kAtWarp;
    warps_[me->warp].waiting |= bit;
    try_complete(me->warp, me->mask);
    wait_here();
    return me->result;
  }

  void yield() {
    ThreadCtx* me = current_;
    me->state = State::kRunnable;
    if (policy_ == FREEDIT_EMU_SCHEDULE_LIFO) {
      queue_.push_front(me->id);  // run last in either order
    } else {
      queue_.push_back(me->id);
    }
    wait_here();
  }

  unsigned lanes() const { return warps_[current_->warp].alive; }

  [[noreturn]] void fail_thread(const std::string& why) {
    ThreadCtx* me = current_;
    run_->fail(format("kernel %s (launched by %s): thread (%u,%u,%u) of block %s: %s", run_->call->kernel,
                      run_->call->launcher, me->view.thread_idx.x, me->view.thread_idx.y, me->view.thread_idx.z,
                      block_name().c_str(), why.c_str()));
    aborted_ = true;
    me->state = State::kTrapped;
    context_switch(&me->ctx, &sched_ctx_);
    __builtin_trap();  // never resumed
  }

 private:
  static void fiber_entry(void* self) { static_cast<Worker*>(self)->fiber_main(); }

  std::string block_name() const {
    const uint3& b = block_view_.block_idx;
    return format("(%u,%u,%u)", b.x, b.y, b.z);
  }

  void layout(dim3 block) {
    const unsigned n = block.x * block.y * block.z;
    for (unsigned t = 0; t < n; ++t) {
      ThreadCtx& c = threads_[t];
      c.view.thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      c.view.block = &block_view_;
      c.id = t;
      c.lane = t & 31;
      c.warp = t >> 5;
    }
    laid_out_ = block;
    laid_out_valid_ = true;
  }

  void run_block(GridRun& run, unsigned long long b) {
    run_ = &run;
    const dim3 g = run.grid;
    block_view_.block_idx = uint3{static_cast<unsigned>(b % g.x), static_cast<unsigned>((b / g.x) % g.y),
                                  static_cast<unsigned>(b / (static_cast<unsigned long long>(g.x) * g.y))};
    block_view_.block_dim = run.block;
    block_view_.grid_dim = g;
    if (!laid_out_valid_ || laid_out_.x != run.block.x || laid_out_.y != run.block.y || laid_out_.z != run.block.z)
      layout(run.block);
    const unsigned n = run.threads, warps = (n + 31) / 32;
    n_ = n;
    for (unsigned w = 0; w < warps; ++w) warps_[w] = WarpState{0xFFFFFFFFu, 0};
    if (n % 32) warps_[warps - 1].alive = (1u << (n % 32)) - 1;
    queue_.clear();
    for (unsigned t = 0; t < n; ++t) {
      threads_[t].state = State::kNotStarted;
      queue_.push_back(t);
    }
    alive_ = n;
    at_barrier_ = barrier_true_ = 0;
    aborted_ = false;
    rng_ = run.seed ^ (b * 0xD6E8FEB86659FD93ull);
    policy_ = run.policy;
    if (policy_ == FREEDIT_EMU_SCHEDULE_MIXED)
      policy_ = (splitmix(rng_) & 1) ? FREEDIT_EMU_SCHEDULE_LIFO : FREEDIT_EMU_SCHEDULE_FIFO;

    if (ThreadCtx* first = pick()) enter(first, &sched_ctx_);  // back here once nothing can run
    if (!aborted_ && alive_ > 0) run.fail(describe_stuck());
    for (unsigned t = 0; t < n; ++t) {  // stacks of threads that never finished
      if (threads_[t].stack) {
        stacks_.push(threads_[t].stack);
        threads_[t].stack = nullptr;
      }
    }
  }

  ThreadCtx* pick() {
    if (aborted_ || queue_.empty()) return nullptr;
    unsigned t;
    switch (policy_) {
      case FREEDIT_EMU_SCHEDULE_FIFO:
        t = queue_.pop_front();
        break;
      case FREEDIT_EMU_SCHEDULE_LIFO:
        t = queue_.pop_back();
        break;
      default:  // a uniform position without a division
        t = queue_.pop_at(static_cast<unsigned>(((splitmix(rng_) >> 32) * queue_.size()) >> 32));
    }
    return &threads_[t];
  }

  // Runs `next` (starting it on a fresh stack if new), saving the current context in `save`.
  void enter(ThreadCtx* next, Context* save) {
    current_ = next;
    if (next->state == State::kNotStarted) {
      next->stack = stacks_.pop();
      *StackPool::header(next->stack) = StackHeader{&next->view, this};
      context_init(&next->ctx, stacks_.usable(next->stack), stacks_.usable_bytes(next->stack), &fiber_entry, this);
    }
    next->state = State::kRunning;
    context_switch(save, &next->ctx);
  }

  // The current thread has registered where it waits (or is runnable again): run someone else
  // until it is resumed.
  void wait_here() {
    ThreadCtx* me = current_;
    ThreadCtx* next = pick();
    if (next == me) {
      me->state = State::kRunning;
      return;
    }
    if (!next) {  // nothing can run: the scheduler ends the block (stuck or aborted), never resumes us
      context_switch(&me->ctx, &sched_ctx_);
      __builtin_trap();
    }
    enter(next, &me->ctx);
  }

  [[noreturn]] void fiber_main() {
    ThreadCtx* t = current_;
    for (;;) {
      run_->call->invoke(run_->call->closure);
      thread_exited(t);
      ThreadCtx* next = pick();
      if (next && next->state == State::kNotStarted) {  // the next thread starts on this stack
        next->stack = t->stack;
        t->stack = nullptr;
        t = current_ = next;
        StackPool::header(t->stack)->view = &t->view;
        t->state = State::kRunning;
        continue;
      }
      stacks_.push(t->stack);  // safe: nothing runs on this host thread before the switch below
      t->stack = nullptr;
      if (next) {
        enter(next, &dead_ctx_);
      } else {
        context_switch(&dead_ctx_, &sched_ctx_);
      }
      __builtin_trap();  // an exited thread is never resumed
    }
  }

  void thread_exited(ThreadCtx* t) {
    t->state = State::kDone;
    --alive_;
    WarpState& w = warps_[t->warp];
    w.alive &= ~(1u << t->lane);
    if (w.waiting) retry_warp(t->warp);  // a collective may have waited only for this lane
    if (at_barrier_ && at_barrier_ == alive_) release_barrier();
  }

  void release_barrier() {
    switch (barrier_op_) {
      case BarrierOp::kCount:
        barrier_result_ = static_cast<int>(barrier_true_);
        break;
      case BarrierOp::kAnd:
        barrier_result_ = barrier_true_ == at_barrier_;
        break;
      case BarrierOp::kOr:
        barrier_result_ = barrier_true_ > 0;
        break;
      default:
        barrier_result_ = 0;
    }
    for (unsigned t = 0; t < n_; ++t) {
      if (threads_[t].state == State::kAtBarrier) {
        threads_[t].state = State::kRunnable;
        queue_.push_back(t);
      }
    }
    at_barrier_ = barrier_true_ = 0;
  }

  // Completes the collective of the lanes waiting with mask `mask` if every live lane of it is there.
  bool try_complete(unsigned warp, uint32_t mask) {
    WarpState& w = warps_[warp];
    const uint32_t group = mask & w.alive;
    if ((w.waiting & group) != group) return false;
    ThreadCtx* lanes = &threads_[warp * 32];
    for (uint32_t bits = group; bits; bits &= bits - 1)
      if (lanes[__builtin_ctz(bits)].mask != mask) return false;  // that lane waits in another group
    complete(warp, group);
    return true;
  }

  void retry_warp(unsigned warp) {
    ThreadCtx* lanes = &threads_[warp * 32];
    bool progress = true;
    while (progress && warps_[warp].waiting) {
      progress = false;
      for (uint32_t bits = warps_[warp].waiting; bits && !progress; bits &= bits - 1)
        progress = try_complete(warp, lanes[__builtin_ctz(bits)].mask);
    }
  }

  // Every lane's result, from the values of the lanes that took part. A shuffle that reads a lane
  // outside the group (not in the mask, returned, or absent) gets its own value: undefined on a GPU.
  void complete(unsigned warp, uint32_t group) {
    ThreadCtx* lanes = &threads_[warp * 32];
    uint32_t ballot = 0;
    for (uint32_t bits = group; bits; bits &= bits - 1) {
      const unsigned l = __builtin_ctz(bits);
      if (lanes[l].value) ballot |= 1u << l;
    }
    for (uint32_t bits = group; bits; bits &= bits - 1) {
      const unsigned l = __builtin_ctz(bits);
      ThreadCtx& t = lanes[l];
      const unsigned width = static_cast<unsigned>(t.width), segment = l & ~(width - 1), offset = l - segment;
      const unsigned long long delta = static_cast<unsigned>(t.arg);
      unsigned src = l;
      switch (t.op) {
        case WarpOp::kShflIdx:
          src = segment + (static_cast<unsigned>(t.arg) & (width - 1));
          break;
        case WarpOp::kShflUp:
          src = offset >= delta ? l - static_cast<unsigned>(delta) : l;
          break;
        case WarpOp::kShflDown:
          src = offset + delta < width ? l + static_cast<unsigned>(delta) : l;
          break;
        case WarpOp::kShflXor:
          src = l ^ static_cast<unsigned>(t.arg);
          if (src >= segment + width) src = l;  // a later segment: own value, as CUDA
          break;
        default:
          break;
      }
      switch (t.op) {
        case WarpOp::kSync:
          t.result = 0;
          break;
        case WarpOp::kBallot:
          t.result = ballot;
          break;
        case WarpOp::kAny:
          t.result = ballot != 0;
          break;
        case WarpOp::kAll:
          t.result = ballot == group;
          break;
        default:
          t.result = (src < 32 && ((group >> src) & 1u)) ? lanes[src].value : t.value;
      }
    }
    warps_[warp].waiting &= ~group;
    for (uint32_t bits = group; bits; bits &= bits - 1) {
      ThreadCtx& t = lanes[__builtin_ctz(bits)];
      t.state = State::kRunnable;
      queue_.push_back(t.id);
    }
  }

  std::string describe_stuck() const {
    unsigned at_barrier = 0, at_warp = 0, done = 0;
    std::string warps;
    for (unsigned t = 0; t < n_; ++t) {
      at_barrier += threads_[t].state == State::kAtBarrier;
      at_warp += threads_[t].state == State::kAtWarp;
      done += threads_[t].state == State::kDone;
    }
    for (unsigned w = 0, shown = 0; w < (n_ + 31) / 32 && shown < 4; ++w) {
      const uint32_t waiting = warps_[w].waiting;
      if (!waiting) continue;
      const ThreadCtx& first = threads_[w * 32 + __builtin_ctz(waiting)];
      const uint32_t missing = first.mask & warps_[w].alive & ~waiting;
      warps += format("%s warp %u: lanes 0x%08x wait (mask 0x%08x), lanes 0x%08x never arrive", shown++ ? ";" : "", w,
                      waiting, first.mask, missing);
    }
    return format("kernel %s (launched by %s): block %s can never finish: a barrier can never complete: "
                  "%u thread(s) wait at __syncthreads, %u at a warp collective, %u of %u returned%s%s",
                  run_->call->kernel, run_->call->launcher, block_name().c_str(), at_barrier, at_warp, done, n_,
                  warps.empty() ? "" : ";", warps.c_str());
  }

  ThreadCtx threads_[kMaxThreads];
  WarpState warps_[kMaxThreads / 32];
  BlockView block_view_{};
  dim3 laid_out_{};
  bool laid_out_valid_ = false;
  GridRun* run_ = nullptr;
  ThreadCtx* current_ = nullptr;
  unsigned n_ = 0, alive_ = 0, at_barrier_ = 0, barrier_true_ = 0;
  BarrierOp barrier_op_ = BarrierOp::kSync;
  int barrier_result_ = 0;
  bool aborted_ = false;
  int policy_ = FREEDIT_EMU_SCHEDULE_FIFO;
  unsigned long long rng_ = 0;
  RunQueue queue_;
  StackPool stacks_;
  Context sched_ctx_, dead_ctx_;
};

Worker& this_worker() {
  static thread_local std::unique_ptr<Worker> owner;
  if (!owner) owner = std::make_unique<Worker>();
  return *owner;
}

// The scheduler of the running CUDA thread (blocking points run on its fiber stack).
Worker& running_worker() { return *static_cast<Worker*>(stack_header()->worker); }

constexpr char kPoolThreadName[] = "freedit-emu";  // at most 15 characters (Linux)

// Host threads that take blocks besides the launching one. Woken only for grids of 2+ blocks.
class Pool {
 public:
  explicit Pool(int helpers) {
    for (int i = 0; i < helpers; ++i) {
      threads_.emplace_back([this] { loop(); });
#ifdef __linux__
      // Named before the pool is returned, so a test can count the pool's own threads among the
      // process's others (ONNX Runtime's, Python's), which come and go on their own.
      pthread_setname_np(threads_.back().native_handle(), kPoolThreadName);
#endif
    }
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void run(GridRun& run) {
    const bool helped = run.blocks > 1 && !threads_.empty();
    if (helped) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        current_ = &run;
        ++generation_;
      }
      work_cv_.notify_all();
    }
    this_worker().run_blocks(run);
    if (helped) {
      std::unique_lock<std::mutex> lock(mutex_);
      current_ = nullptr;  // no helper joins from now on
      done_cv_.wait(lock, [this] { return active_ == 0; });
    }
  }

 private:
  void loop() {
    Worker& worker = this_worker();
    std::unique_lock<std::mutex> lock(mutex_);
    // Generation 0 is the pool's birth, not "now": a helper that starts after the first grid was
    // posted must still join it (reading generation_ here made the first grid of a new pool run
    // on the launching thread alone whenever the helpers were slow to start).
    unsigned long long seen = 0;
    for (;;) {
      work_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      GridRun* run = current_;
      if (!run) continue;
      ++active_;
      lock.unlock();
      worker.run_blocks(*run);
      lock.lock();
      if (--active_ == 0) done_cv_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable work_cv_, done_cv_;
  GridRun* current_ = nullptr;
  unsigned long long generation_ = 0;
  int active_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// One launch at a time (host threads that launch concurrently take turns).
std::mutex g_launch_mutex;
Pool* g_pool = nullptr;  // under g_launch_mutex
int g_pool_threads = 0;  // 0: default

int configured_threads() {
  if (g_pool_threads > 0) return g_pool_threads;
  if (const char* env = getenv("FREEDIT_EMU_THREADS")) {
    const int n = atoi(env);
    if (n > 0) return n;
  }
  const unsigned cpus = std::thread::hardware_concurrency();
  return cpus ? static_cast<int>(cpus) : 1;
}

Pool& pool() {
  if (!g_pool) g_pool = new Pool(configured_threads() - 1);
  return *g_pool;
}

// After fork() the child has none of the pool's threads: start a new pool there (the old one is
// leaked on purpose, its threads do not exist). The launch lock is held across fork().
void before_fork() { g_launch_mutex.lock(); }
void after_fork_parent() { g_launch_mutex.unlock(); }
void after_fork_child() {
  g_pool = nullptr;
  g_launch_mutex.unlock();
}
[[maybe_unused]] const int g_atfork = pthread_atfork(&before_fork, &after_fork_parent, &after_fork_child);

}  // namespace

// ---- blocking points (freedit_emu_device.h) -------------------------------------------------------
unsigned long long warp_collective(WarpOp op, unsigned mask, unsigned long long value, int arg, int width) {
  return running_worker().collective(op, mask, value, arg, width);
}
int block_barrier(BarrierOp op, int predicate) { return running_worker().barrier(op, predicate); }
void yield_thread() { running_worker().yield(); }
void trap_thread() { running_worker().fail_thread("__trap() called"); }
unsigned active_lanes() { return running_worker().lanes(); }

cudaError_t validate_launch(dim3 grid, dim3 block, size_t shared_bytes) {
  const unsigned long long threads = static_cast<unsigned long long>(block.x) * block.y * block.z;
  if (!threads || threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64)
    return cudaErrorInvalidConfiguration;
  if (!grid.x || !grid.y || !grid.z || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (shared_bytes > kMaxSharedBytes) return cudaErrorInvalidValue;
  return cudaSuccess;
}

cudaError_t execute_grid(const KernelCall& call, dim3 grid, dim3 block) {
  if (g_null_launch.load(std::memory_order_relaxed)) return cudaSuccess;
  GridRun run;
  run.call = &call;
  run.grid = grid;
  run.block = block;
  run.threads = block.x * block.y * block.z;
  run.blocks = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
  run.policy = g_policy.load(std::memory_order_relaxed);
  run.seed = g_seed.load(std::memory_order_relaxed) ^
             (g_launch_serial.fetch_add(1, std::memory_order_relaxed) * 0x9E3779B97F4A7C15ull);
  {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    pool().run(run);
  }
  g_grids.fetch_add(1, std::memory_order_relaxed);
  if (run.failed.load()) {
    tls_detail = run.detail;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace freedit_emu

using namespace freedit_emu;

extern "C" int freedit_emulation_set_null_launch(int on) { return g_null_launch.exchange(on ? 1 : 0); }

extern "C" int freedit_emulation_set_schedule(int policy, unsigned long long seed) {
  if (policy < FREEDIT_EMU_SCHEDULE_FIFO || policy > FREEDIT_EMU_SCHEDULE_MIXED) return cudaErrorInvalidValue;
  g_policy.store(policy);
  g_seed.store(seed);
  return cudaSuccess;
}

extern "C" int freedit_emulation_set_threads(int threads) {
  if (threads < 0 || threads > 1024) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  delete g_pool;  // idle: no launch runs while the lock is held
  g_pool = nullptr;
  g_pool_threads = threads;
  return cudaSuccess;
}

extern "C" void freedit_emulation_counters(long long* grids, long long* blocks, long long* threads) {
  if (grids) *grids = g_grids.load();
  if (blocks) *blocks = g_blocks.load();
  if (threads) *threads = g_threads.load();
}

extern "C" const char* freedit_emulation_last_error_detail(void) { return tls_detail.c_str(); }
