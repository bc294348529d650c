#include "fiber.h"

#include <stdint.h>

#if FREEDIT_EMU_X86_64_FIBERS
// freedit_emu_switch(void** save_sp, void* load_sp): pushes the callee-saved registers (System V),
// stores the stack pointer, loads the other one and pops its registers. The FPU control words are
// not switched: no CUDA thread changes them.
// freedit_emu_start: the first "return" of a new context lands here; r12 = arg, r13 = entry.
extern "C" void freedit_emu_switch(void** save_sp, void* load_sp);
extern "C" void freedit_emu_start();
asm(R"(
  .pushsection .text
  .globl freedit_emu_switch
  .hidden freedit_emu_switch
  .type freedit_emu_switch, @function
freedit_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size freedit_emu_switch, .-freedit_emu_switch

  .globl freedit_emu_start
  .hidden freedit_emu_start
  .type freedit_emu_start, @function
freedit_emu_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size freedit_emu_start, .-freedit_emu_start
  .popsection
)");

namespace freedit_emu {

void context_init(Context* ctx, char* stack, size_t bytes, void (*entry)(void*), void* arg) {
  // Frame popped by the first switch: r15 r14 r13 r12 rbx rbp, then the return address. sp is
  // 8 mod 16 so that freedit_emu_start calls entry with the ABI's 16-byte alignment.
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~static_cast<uintptr_t>(15);
  auto* frame = reinterpret_cast<void**>(top - 72);
  frame[0] = nullptr;                                     // r15
  frame[1] = nullptr;                                     // r14
  frame[2] = reinterpret_cast<void*>(entry);              // r13
  frame[3] = arg;                                         // r12
  frame[4] = nullptr;                                     // rbx
  frame[5] = nullptr;                                     // rbp
  frame[6] = reinterpret_cast<void*>(&freedit_emu_start);  // return address
  frame[7] = frame[8] = nullptr;
  ctx->sp = frame;
}

void context_switch(Context* from, Context* to) { freedit_emu_switch(&from->sp, to->sp); }

}  // namespace freedit_emu

#else  // portable fallback

#include <stdio.h>
#include <stdlib.h>

namespace freedit_emu {
namespace {
void trampoline(unsigned entry_lo, unsigned entry_hi, unsigned arg_lo, unsigned arg_hi) {
  auto entry = reinterpret_cast<void (*)(void*)>((static_cast<uintptr_t>(entry_hi) << 32) | entry_lo);
  entry(reinterpret_cast<void*>((static_cast<uintptr_t>(arg_hi) << 32) | arg_lo));
  abort();
}
}  // namespace

void context_init(Context* ctx, char* stack, size_t bytes, void (*entry)(void*), void* arg) {
  if (getcontext(&ctx->uc)) {
    perror("freedit emulation: getcontext");
    abort();
  }
  ctx->uc.uc_stack.ss_sp = stack;
  ctx->uc.uc_stack.ss_size = bytes;
  ctx->uc.uc_link = nullptr;
  const auto e = reinterpret_cast<uintptr_t>(entry), a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&ctx->uc, reinterpret_cast<void (*)()>(&trampoline), 4, static_cast<unsigned>(e),
              static_cast<unsigned>(e >> 32), static_cast<unsigned>(a), static_cast<unsigned>(a >> 32));
}

void context_switch(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }

}  // namespace freedit_emu

#endif
