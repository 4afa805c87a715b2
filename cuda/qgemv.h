// Launchers for the dequant-matmul kernels (plain CUDA C++, no framework headers).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace compressor {

enum class DType { kFloat16, kBFloat16 };

constexpr int kMaxSmallBatch = 16;  // rows of x the streaming kernel handles
constexpr int kKMultiple = 64;      // K must be a multiple: whole 16-byte vectors of x, aligned rows

// y [M, N] = x [M, K] * dequant(qweight)^T, M <= kMaxSmallBatch. qweight int32 [N, K*bits/32],
// scales [N, groups] (x's dtype), zeros uint8 [N, groups]; bits 2 or 4; group_size a multiple of 32/bits;
// K a multiple of kKMultiple; x 16-byte aligned.
cudaError_t launch_qgemv(DType dtype, int bits, const void* x, const int32_t* qweight, const void* scales,
                         const uint8_t* zeros, void* y, int M, int N, int K, int group_size, cudaStream_t stream);

// out [N, K] = dequant(qweight), for the large-batch path (then a dense matmul).
cudaError_t launch_dequant(DType dtype, int bits, const int32_t* qweight, const void* scales, const uint8_t* zeros,
                           void* out, int N, int K, int group_size, cudaStream_t stream);

}  // namespace compressor
