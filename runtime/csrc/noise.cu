// Keyed counter-based noise: Philox4x32-10 raw bits, uniforms and normals, as runtime/noise.py.
//
// Row r of the output is the stream keyed (seed, sample[r], step[r], purpose[r]); Philox block b
// (counter (b, sample, step, purpose)) gives elements 4b .. 4b+3. One thread per block, so a draw
// depends only on its key, never on the batch around it. Raw bits and uniforms are bit-identical
// to numpy; normals are Box-Muller in double rounded to fp32 (numpy does the same, so they differ
// at most by the last-ulp differences of the double log/sin/cos).
#include "common.cuh"

namespace freedit {
namespace {

enum class Output { kBits, kUniform, kNormal };

template <Output kind, typename T>
__global__ void philox_kernel(unsigned long long seed, const unsigned* __restrict__ sample,
                              const unsigned* __restrict__ step, const unsigned* __restrict__ purpose, int rows,
                              int count, T* __restrict__ out) {
  const size_t blocks_per_row = (static_cast<size_t>(count) + 3) / 4;
  const size_t total = static_cast<size_t>(rows) * blocks_per_row;
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = idx / blocks_per_row, block = idx - row * blocks_per_row;
    const uint4 bits = philox_block(seed, static_cast<uint32_t>(block), sample[row], step[row], purpose[row]);
    const size_t first = block * 4;
    const int n = static_cast<int>(count - first < 4 ? count - first : 4);
    T* dst = out + row * static_cast<size_t>(count) + first;
    if constexpr (kind == Output::kNormal) {
      float z[4];
      normals4(bits, z);  // pairs (0, 1) and (2, 3): a pair never straddles two blocks
      for (int j = 0; j < n; ++j) dst[j] = z[j];
    } else {
      const uint32_t word[4] = {bits.x, bits.y, bits.z, bits.w};
      for (int j = 0; j < n; ++j) {
        if constexpr (kind == Output::kBits) {
          dst[j] = word[j];
        } else {
          dst[j] = to_uniform(word[j]);
        }
      }
    }
  }
}

template <Output kind, typename T>
int launch_philox(unsigned long long seed, const unsigned* sample, const unsigned* step, const unsigned* purpose,
                  int rows, int count, T* out, void* stream) {
  if (!sample || !step || !purpose || !out || rows <= 0 || count <= 0) return cudaErrorInvalidValue;
  const size_t total = static_cast<size_t>(rows) * ((static_cast<size_t>(count) + 3) / 4);
  const auto kernel = philox_kernel<kind, T>;  // a template name with a comma cannot be a macro argument
  FREEDIT_LAUNCH(kernel, grid_for(total), kThreads, 0, as_stream(stream))(seed, sample, step, purpose, rows,
                                                                               count, out);
  return finish_launch();
}

}  // namespace
}  // namespace freedit

using namespace freedit;

extern "C" int freedit_philox_bits(unsigned long long seed, const unsigned* sample, const unsigned* step,
                                   const unsigned* purpose, int rows, int count, unsigned* out, void* stream) {
  return launch_philox<Output::kBits>(seed, sample, step, purpose, rows, count, out, stream);
}

extern "C" int freedit_philox_uniform(unsigned long long seed, const unsigned* sample, const unsigned* step,
                                      const unsigned* purpose, int rows, int count, double* out, void* stream) {
  return launch_philox<Output::kUniform>(seed, sample, step, purpose, rows, count, out, stream);
}

extern "C" int freedit_philox_normal(unsigned long long seed, const unsigned* sample, const unsigned* step,
                                     const unsigned* purpose, int rows, int count, float* out, void* stream) {
  return launch_philox<Output::kNormal>(seed, sample, step, purpose, rows, count, out, stream);
}

// Host reference: the same Philox and Box-Muller code on the CPU (kind 0 bits, 1 uniforms, 2 normals).
extern "C" int freedit_philox_host(unsigned long long seed, const unsigned* sample, const unsigned* step,
                                   const unsigned* purpose, int rows, int count, int kind, void* out) {
  if (!sample || !step || !purpose || !out || rows <= 0 || count <= 0 || kind < 0 || kind > 2)
    return cudaErrorInvalidValue;
  for (int row = 0; row < rows; ++row) {
    for (int block = 0; 4 * block < count; ++block) {
      const uint4 bits = philox_block(seed, static_cast<uint32_t>(block), sample[row], step[row], purpose[row]);
      const uint32_t word[4] = {bits.x, bits.y, bits.z, bits.w};
      float z[4];
      if (kind == 2) normals4(bits, z);
      for (int j = 0; j < 4 && 4 * block + j < count; ++j) {
        const size_t at = static_cast<size_t>(row) * count + 4 * block + j;
        if (kind == 0) static_cast<unsigned*>(out)[at] = word[j];
        if (kind == 1) static_cast<double*>(out)[at] = to_uniform(word[j]);
        if (kind == 2) static_cast<float*>(out)[at] = z[j];
      }
    }
  }
  return cudaSuccess;
}
