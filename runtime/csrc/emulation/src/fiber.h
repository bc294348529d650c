// Execution contexts for CUDA threads: a saved stack pointer and a switch between two contexts
// (x86-64: a few instructions, no system call; elsewhere: ucontext, slower but portable).
#pragma once

#include <stddef.h>

// FREEDIT_EMU_PORTABLE_FIBERS forces the ucontext version (tests of the fallback on x86-64).
#if defined(__x86_64__) && !defined(FREEDIT_EMU_PORTABLE_FIBERS)
#define FREEDIT_EMU_X86_64_FIBERS 1
#else
#include <ucontext.h>
#endif

namespace freedit_emu {

struct Context {
#if FREEDIT_EMU_X86_64_FIBERS
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Prepares `ctx` to run entry(arg) on the stack [stack, stack + bytes); entry must never return.
void context_init(Context* ctx, char* stack, size_t bytes, void (*entry)(void*), void* arg);
// Saves the running context into `from` and resumes `to`.
void context_switch(Context* from, Context* to);

}  // namespace freedit_emu
