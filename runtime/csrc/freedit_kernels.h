// C ABI of the freedit CUDA kernels library, loaded from Python without torch (ctypes).
// Every entry point returns a cudaError_t as int (0 = success) and runs on the given stream.
#pragma once

#define FREEDIT_KERNELS_ABI_VERSION 1

#ifdef __cplusplus
extern "C" {
#endif

int freedit_kernels_abi_version(void);

// mean, log_var [batch, channels * pixels] from x [batch, channels * pixels] and the model output
// eps_v [batch, (learn_sigma ? 2 : 1) * channels * pixels] at per-row respaced steps [batch];
// table is Schedule.transition_table() as float32 [num_steps, 6].
int freedit_transition_f32(const float* x, const float* eps_v, const int* steps, const float* table, int batch,
                           int channels, int pixels, int learn_sigma, float* mean, float* log_var, void* stream);

#ifdef __cplusplus
}
#endif
