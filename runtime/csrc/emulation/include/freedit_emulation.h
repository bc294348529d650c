// Extra C entry points of the emulated kernels library (libfreedit_kernels_emu.so) only: knobs
// for benchmarks and tests. runtime/kernels.py wraps them as Kernels.emulation.
#pragma once

#if defined(__GNUC__)
#define FREEDIT_EMU_API __attribute__((visibility("default")))
#else
#define FREEDIT_EMU_API
#endif

// Order in which the scheduler resumes the runnable CUDA threads of a block: FIFO (in thread
// order: threads run behind each other), LIFO (the most recently released first: a thread runs
// ahead of the others), a seeded random pick at every switch (thorough, about twice as slow:
// no cache locality), or MIXED (the default): each block FIFO or LIFO at random, so one launch
// exercises both. A race between threads of a block shows up only in some orders.
#define FREEDIT_EMU_SCHEDULE_FIFO 0
#define FREEDIT_EMU_SCHEDULE_LIFO 1
#define FREEDIT_EMU_SCHEDULE_RANDOM 2
#define FREEDIT_EMU_SCHEDULE_MIXED 3

#ifdef __cplusplus
extern "C" {
#endif

// Null launches (on != 0): launches are validated and counted, captured and replayed as usual,
// but no kernel body runs (host-overhead benchmarks). Returns the previous setting.
FREEDIT_EMU_API int freedit_emulation_set_null_launch(int on);
// Scheduling order (FREEDIT_EMU_SCHEDULE_*) and the seed of the random order. Returns a cudaError_t.
FREEDIT_EMU_API int freedit_emulation_set_schedule(int policy, unsigned long long seed);
// Host threads that run blocks (the launching thread included); 0: the number of CPUs, or
// $FREEDIT_EMU_THREADS. Returns a cudaError_t.
FREEDIT_EMU_API int freedit_emulation_set_threads(int threads);
// Work executed since load (not null launches; graph replays included): grids, blocks, CUDA threads.
FREEDIT_EMU_API void freedit_emulation_counters(long long* grids, long long* blocks, long long* threads);
// cudaGetLastError (reset != 0) or cudaPeekAtLastError of the calling host thread: the library's
// entry points return their error but leave it recorded, as CUDA's runtime calls do.
FREEDIT_EMU_API int freedit_emulation_last_error(int reset);
// What made this host thread's last failed launch fail ("" if none): the kernel, the block and the
// threads of a barrier that could never complete, or the thread that called __trap().
FREEDIT_EMU_API const char* freedit_emulation_last_error_detail(void);

#ifdef __cplusplus
}
#endif
