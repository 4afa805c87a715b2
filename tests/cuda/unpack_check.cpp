// Reads "bits in_features n_words" and n_words packed words (unsigned) from stdin; prints every code
// of the row via compressor::code_at, and for bits dividing 32 checks code_in_word agrees.
#include <cstdio>
#include <vector>

#include "../../cuda/unpack.cuh"

int main() {
  int bits, in_features, n_words;
  if (std::scanf("%d %d %d", &bits, &in_features, &n_words) != 3) return 2;
  std::vector<uint32_t> row(n_words);
  for (auto& w : row) std::scanf("%u", &w);
  for (int j = 0; j < in_features; ++j) {
    const uint32_t code = compressor::code_at(row.data(), j, bits);
    if (bits == 4 && code != compressor::code_in_word<4>(row[j / 8], j % 8)) return 3;
    if (bits == 2 && code != compressor::code_in_word<2>(row[j / 16], j % 16)) return 3;
    std::printf("%u ", code);
  }
  return 0;
}
