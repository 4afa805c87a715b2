// Bit unpacking for the packed layout of compressor/formats.py. Every kernel uses this header, and
// a host test checks it against the Python packer.
//
// A row's codes form a little-endian bit stream: code j occupies bits [j*bits, (j+1)*bits), bit k
// of the stream is bit k % 32 of word k / 32. For bits 2, 4, 8 a word holds 32/bits whole codes.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define COMPRESSOR_HD __host__ __device__ __forceinline__
#else
#define COMPRESSOR_HD inline
#endif

namespace compressor {

// Code j of a packed row, for any bit width (3-bit codes may cross a word boundary).
COMPRESSOR_HD uint32_t code_at(const uint32_t* row, int j, int bits) {
  const int start = j * bits, word = start >> 5, offset = start & 31;
  uint64_t both = row[word];
  if (offset + bits > 32) both |= static_cast<uint64_t>(row[word + 1]) << 32;
  return static_cast<uint32_t>(both >> offset) & ((1u << bits) - 1u);
}

// Code i (0 <= i < 32/BITS) of one word, for BITS dividing 32.
template <int BITS>
COMPRESSOR_HD uint32_t code_in_word(uint32_t word, int i) {
  return (word >> (i * BITS)) & ((1u << BITS) - 1u);
}

}  // namespace compressor
