// Weight-only quantized matmul for 2- and 4-bit codes with per-group scales and zero points.
//
// Small batch (M <= 16): one warp per output row streams that row's packed words once; each lane
// takes every 32nd word, dequantizes its 32/BITS codes with the word's group scale and zero, and
// accumulates against the M rows of x in float32; a warp shuffle reduces. The kernel reads each
// weight byte once, so at small M it is bound by memory bandwidth.
// Large batch: dequantize once into x's dtype, then a dense (cuBLAS) matmul, done by the caller.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "qgemv.h"
#include "unpack.cuh"

namespace compressor {
namespace {

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

constexpr int kWarpsPerBlock = 4;

template <typename T, int BITS>
__global__ void qgemv_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight,
                             const T* __restrict__ scales, const uint8_t* __restrict__ zeros, T* __restrict__ y,
                             int M, int N, int K, int group_size) {
  constexpr int kPerWord = 32 / BITS;
  const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const int words = (K * BITS + 31) / 32;
  const int groups = (K + group_size - 1) / group_size;
  const uint32_t* row = qweight + static_cast<size_t>(n) * words;
  float acc[kMaxSmallBatch];
#pragma unroll
  for (int m = 0; m < kMaxSmallBatch; ++m) acc[m] = 0.f;

  for (int w = lane; w < words; w += 32) {
    const uint32_t word = __ldg(row + w);
    const int k0 = w * kPerWord;
    const int g = k0 / group_size;  // group_size % kPerWord == 0: one word lies in one group
    const float scale = to_float(scales[static_cast<size_t>(n) * groups + g]);
    const float zero = static_cast<float>(zeros[static_cast<size_t>(n) * groups + g]);
#pragma unroll
    for (int i = 0; i < kPerWord; ++i) {
      const int k = k0 + i;
      if (k >= K) break;
      const float wv = (static_cast<float>(code_in_word<BITS>(word, i)) - zero) * scale;
#pragma unroll
      for (int m = 0; m < kMaxSmallBatch; ++m) {
        if (m < M) acc[m] += wv * to_float(x[static_cast<size_t>(m) * K + k]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxSmallBatch; ++m) {
    if (m >= M) break;
    float v = acc[m];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) y[static_cast<size_t>(m) * N + n] = from_float<T>(v);
  }
}

template <typename T, int BITS>
__global__ void dequant_kernel(const uint32_t* __restrict__ qweight, const T* __restrict__ scales,
                               const uint8_t* __restrict__ zeros, T* __restrict__ out, int N, int K, int group_size) {
  constexpr int kPerWord = 32 / BITS;
  const int words = (K * BITS + 31) / 32;
  const int groups = (K + group_size - 1) / group_size;
  const size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<size_t>(N) * words) return;
  const int n = idx / words, w = idx % words;
  const uint32_t word = qweight[idx];
  const int k0 = w * kPerWord, g = k0 / group_size;
  const float scale = to_float(scales[static_cast<size_t>(n) * groups + g]);
  const float zero = static_cast<float>(zeros[static_cast<size_t>(n) * groups + g]);
#pragma unroll
  for (int i = 0; i < kPerWord; ++i) {
    if (k0 + i < K) {
      out[static_cast<size_t>(n) * K + k0 + i] =
          from_float<T>((static_cast<float>(code_in_word<BITS>(word, i)) - zero) * scale);
    }
  }
}

template <typename T, int BITS>
void qgemv(const void* x, const int32_t* qweight, const void* scales, const uint8_t* zeros, void* y, int M, int N,
           int K, int group_size, cudaStream_t stream) {
  const dim3 block(32 * kWarpsPerBlock), grid((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
  qgemv_kernel<T, BITS><<<grid, block, 0, stream>>>(static_cast<const T*>(x),
                                                    reinterpret_cast<const uint32_t*>(qweight),
                                                    static_cast<const T*>(scales), zeros, static_cast<T*>(y), M, N,
                                                    K, group_size);
}

template <typename T, int BITS>
void dequant(const int32_t* qweight, const void* scales, const uint8_t* zeros, void* out, int N, int K,
             int group_size, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(N) * ((K * BITS + 31) / 32);
  const int threads = 256;
  dequant_kernel<T, BITS><<<(total + threads - 1) / threads, threads, 0, stream>>>(
      reinterpret_cast<const uint32_t*>(qweight), static_cast<const T*>(scales), zeros, static_cast<T*>(out), N, K,
      group_size);
}

bool supported(int bits, int M, int group_size) {
  return (bits == 2 || bits == 4) && group_size % (32 / bits) == 0 && M >= 0 && M <= kMaxSmallBatch;
}

}  // namespace

cudaError_t launch_qgemv(DType dtype, int bits, const void* x, const int32_t* qweight, const void* scales,
                         const uint8_t* zeros, void* y, int M, int N, int K, int group_size, cudaStream_t stream) {
  if (!supported(bits, M, group_size)) return cudaErrorInvalidValue;
  if (dtype == DType::kFloat16) {
    (bits == 4 ? qgemv<__half, 4> : qgemv<__half, 2>)(x, qweight, scales, zeros, y, M, N, K, group_size, stream);
  } else {
    (bits == 4 ? qgemv<__nv_bfloat16, 4> : qgemv<__nv_bfloat16, 2>)(x, qweight, scales, zeros, y, M, N, K,
                                                                     group_size, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_dequant(DType dtype, int bits, const int32_t* qweight, const void* scales, const uint8_t* zeros,
                           void* out, int N, int K, int group_size, cudaStream_t stream) {
  if (!supported(bits, 1, group_size)) return cudaErrorInvalidValue;
  if (dtype == DType::kFloat16) {
    (bits == 4 ? dequant<__half, 4> : dequant<__half, 2>)(qweight, scales, zeros, out, N, K, group_size, stream);
  } else {
    (bits == 4 ? dequant<__nv_bfloat16, 4> : dequant<__nv_bfloat16, 2>)(qweight, scales, zeros, out, N, K,
                                                                         group_size, stream);
  }
  return cudaGetLastError();
}

}  // namespace compressor
