// Weight-only quantized matmul for 2- and 4-bit codes with per-group scales and zero points.
//
// Small batch (M <= 16): one warp per output row. Lane l reads words l, l+32, l+64, ... of the row, so
// each load instruction of the warp reads 128 contiguous bytes, with kUnroll loads in flight. A word's
// 32/BITS codes become floats once and meet the matching 32/BITS entries of each row of x, read as
// 16-byte vectors (again contiguous across the warp); a warp shuffle reduces. MT, the row count fixed
// at compile time (1, 2, 4, 8 or 16, at least M), keeps the accumulators in registers. The kernel
// reads each weight byte once, but its per-code arithmetic, not memory, bounds it: on an H200 it
// reaches 22-35% of the copy bandwidth at M = 1 (eval/results/kernels-history.md).
// Large batch: dequantize once into x's dtype (16-byte stores), then a dense (cuBLAS) matmul, done by
// the caller. Both need K % kKMultiple == 0: whole x vectors and 16-byte aligned rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "qgemv.h"
#include "unpack.cuh"

namespace compressor {
namespace {

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> using Pair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;

// A code (< 2^23) as a float without an integer-to-float conversion: 2^23 + c has c as its mantissa.
__device__ __forceinline__ float code_plus_2_23(uint32_t code) { return __uint_as_float(0x4B000000u | code); }

// out[0..COUNT) = p[0..COUNT) as floats, p 16-byte aligned, COUNT a multiple of 8.
template <typename T, int COUNT>
__device__ __forceinline__ void load_floats(const T* p, float* out) {
#pragma unroll
  for (int v = 0; v < COUNT / 8; ++v) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + v);
    const Pair<T>* pairs = reinterpret_cast<const Pair<T>*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = to_float2(pairs[j]);
      out[8 * v + 2 * j] = f.x;
      out[8 * v + 2 * j + 1] = f.y;
    }
  }
}

constexpr int kWarpsPerBlock = 4;
constexpr int kUnroll = 4;

template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    qgemv_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight, const T* __restrict__ scales,
                 const uint8_t* __restrict__ zeros, T* __restrict__ y, int M, int N, int K, int group_size) {
  constexpr int kPerWord = 32 / BITS;
  const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const int words = K / kPerWord;
  const int groups = (K + group_size - 1) / group_size;
  // The group of word w is w / (words per group), computed as (w + 1/2) * reciprocal: exact while
  // w < 2^22 (supported() checks), and a few instructions where an integer division takes dozens.
  const float groups_per_word = 1.f / static_cast<float>(group_size / kPerWord);
  const uint32_t* row = qweight + static_cast<size_t>(n) * words;
  const T* row_scales = scales + static_cast<size_t>(n) * groups;
  const uint8_t* row_zeros = zeros + static_cast<size_t>(n) * groups;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  for (int w0 = lane; w0 < words; w0 += 32 * kUnroll) {
    uint32_t packed[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) packed[u] = w0 + 32 * u < words ? __ldg(row + w0 + 32 * u) : 0u;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int w = w0 + 32 * u, k0 = w * kPerWord;
      if (w < words) {
        const int g = __float2int_rz((static_cast<float>(w) + 0.5f) * groups_per_word);  // one word, one group
        const float scale = to_float(row_scales[g]);
        const float offset = 8388608.f + static_cast<float>(row_zeros[g]);  // 2^23 + zero, exact
        float weight[kPerWord];
#pragma unroll
        for (int i = 0; i < kPerWord; ++i) {
          weight[i] = (code_plus_2_23(code_in_word<BITS>(packed[u], i)) - offset) * scale;
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
            float xv[kPerWord];
            load_floats<T, kPerWord>(x + static_cast<size_t>(m) * K + k0, xv);
#pragma unroll
            for (int i = 0; i < kPerWord; ++i) acc[m] = fmaf(weight[i], xv[i], acc[m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0 && m < M) y[static_cast<size_t>(m) * N + n] = from_float<T>(v);
  }
}

// One thread per packed word: its 32/BITS weights, written as 16-byte vectors.
template <typename T, int BITS>
__global__ void dequant_kernel(const uint32_t* __restrict__ qweight, const T* __restrict__ scales,
                               const uint8_t* __restrict__ zeros, T* __restrict__ out, int N, int K, int group_size) {
  constexpr int kPerWord = 32 / BITS;
  const int words = K / kPerWord;
  const int groups = (K + group_size - 1) / group_size;
  const size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<size_t>(N) * words) return;
  const int n = idx / words, w = idx % words;
  const uint32_t word = qweight[idx];
  const int k0 = w * kPerWord, g = k0 / group_size;
  const float scale = to_float(scales[static_cast<size_t>(n) * groups + g]);
  const float offset = 8388608.f + static_cast<float>(zeros[static_cast<size_t>(n) * groups + g]);
  union {
    T values[kPerWord];
    uint4 vectors[kPerWord * sizeof(T) / 16];
  } chunk;
#pragma unroll
  for (int i = 0; i < kPerWord; ++i) {
    chunk.values[i] = from_float<T>((code_plus_2_23(code_in_word<BITS>(word, i)) - offset) * scale);
  }
  uint4* dst = reinterpret_cast<uint4*>(out + static_cast<size_t>(n) * K + k0);
#pragma unroll
  for (int v = 0; v < kPerWord * static_cast<int>(sizeof(T)) / 16; ++v) dst[v] = chunk.vectors[v];
}

template <typename T, int BITS, int MT>
void launch_rows(const void* x, const int32_t* qweight, const void* scales, const uint8_t* zeros, void* y, int M,
                 int N, int K, int group_size, cudaStream_t stream) {
  const dim3 block(32 * kWarpsPerBlock), grid((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
  qgemv_kernel<T, BITS, MT><<<grid, block, 0, stream>>>(static_cast<const T*>(x),
                                                        reinterpret_cast<const uint32_t*>(qweight),
                                                        static_cast<const T*>(scales), zeros, static_cast<T*>(y), M,
                                                        N, K, group_size);
}

template <typename T, int BITS>
void qgemv(const void* x, const int32_t* qweight, const void* scales, const uint8_t* zeros, void* y, int M, int N,
           int K, int group_size, cudaStream_t stream) {
  static_assert(kMaxSmallBatch == 16, "the row counts below go up to kMaxSmallBatch");
  auto launch = M <= 1 ? launch_rows<T, BITS, 1> : M <= 2 ? launch_rows<T, BITS, 2> : M <= 4 ? launch_rows<T, BITS, 4>
                : M <= 8 ? launch_rows<T, BITS, 8> : launch_rows<T, BITS, 16>;
  launch(x, qweight, scales, zeros, y, M, N, K, group_size, stream);
}

template <typename T, int BITS>
void dequant(const int32_t* qweight, const void* scales, const uint8_t* zeros, void* out, int N, int K,
             int group_size, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(N) * (K / (32 / BITS));
  const int threads = 256;
  dequant_kernel<T, BITS><<<(total + threads - 1) / threads, threads, 0, stream>>>(
      reinterpret_cast<const uint32_t*>(qweight), static_cast<const T*>(scales), zeros, static_cast<T*>(out), N, K,
      group_size);
}

bool supported(int bits, int M, int K, int group_size) {
  return (bits == 2 || bits == 4) && group_size % (32 / bits) == 0 && K % kKMultiple == 0 &&
         K / (32 / bits) < (1 << 22) && M >= 0 && M <= kMaxSmallBatch;
}

}  // namespace

cudaError_t launch_qgemv(DType dtype, int bits, const void* x, const int32_t* qweight, const void* scales,
                         const uint8_t* zeros, void* y, int M, int N, int K, int group_size, cudaStream_t stream) {
  if (!supported(bits, M, K, group_size)) return cudaErrorInvalidValue;
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
  if (!supported(bits, 1, K, group_size)) return cudaErrorInvalidValue;
  if (dtype == DType::kFloat16) {
    (bits == 4 ? dequant<__half, 4> : dequant<__half, 2>)(qweight, scales, zeros, out, N, K, group_size, stream);
  } else {
    (bits == 4 ? dequant<__nv_bfloat16, 4> : dequant<__nv_bfloat16, 2>)(qweight, scales, zeros, out, N, K,
                                                                         group_size, stream);
  }
  return cudaGetLastError();
}

}  // namespace compressor
