// Shared between the launch engine (launch.cpp) and the runtime API (runtime_api.cpp).
#pragma once

#include <string>

#include "cuda_runtime.h"

namespace freedit_emu {

// Records `err` as the calling host thread's last error (cudaGetLastError) unless it is success.
cudaError_t set_last_error(cudaError_t err);

// A launch configuration CUDA would refuse: cudaErrorInvalidConfiguration (empty or too large grid
// or block) or cudaErrorInvalidValue (more shared memory than a block has); else cudaSuccess.
cudaError_t validate_launch(dim3 grid, dim3 block, size_t shared_bytes);

// Runs every block and thread of the grid now, on the pool (nothing with null launches on).
// cudaErrorLaunchFailure if a barrier can never complete or a thread traps; the reason is then
// this host thread's freedit_emulation_last_error_detail().
cudaError_t execute_grid(const KernelCall& call, dim3 grid, dim3 block);

}  // namespace freedit_emu
