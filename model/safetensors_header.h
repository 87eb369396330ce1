// Validation of a safetensors header, kept free of LibTorch so that it can be fuzzed on its own. It accepts exactly
// the files the reference reader (HuggingFace `safetensors`, Rust) accepts, with one deliberate exception: a key
// repeated in the JSON is refused even where the reference would take the last copy. Checked before any tensor
// byte is touched:
//   - 8-byte little-endian header length N, N <= 100,000,000 and 8 + N <= file size;
//   - the header is UTF-8 JSON (no byte-order mark; whitespace around it allowed), an object without repeated keys;
//   - `__metadata__` is absent, null or an object of string values;
//   - every other key is a tensor {dtype, shape, data_offsets} with a known dtype, non-negative integer dimensions
//     and numel x bits a whole number of bytes equal to end - begin (sub-byte dtypes F4 and F6_* included);
//   - sorted by (begin, end), each tensor starts where the previous ended and the last ends at the end of the file:
//     no gap before the first tensor, no hole between two, no overlap, nothing after the last (zero-size tensors
//     anywhere are fine).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace dsopen::model {

struct TensorEntry {
  std::string dtype;  // a safetensors dtype name: F32, BF16, F8_E4M3, U16, ...
  std::vector<int64_t> shape;
  size_t begin = 0, end = 0;  // byte range relative to the data section
};

struct SafetensorsHeader {
  std::map<std::string, TensorEntry> tensors;
  std::map<std::string, std::string> metadata;
  size_t data_offset = 0;  // where the data section starts in the file
};

// Bits per element of a safetensors dtype name (4 for F4, 6 for F6_E2M3, 8 for U8, ...), 0 when unknown.
size_t dtype_bits(const std::string& dtype);

// Parses and checks the header of a whole file held in [bytes, bytes + size). Throws dsopen::Error naming `path`.
SafetensorsHeader parse_safetensors_header(const unsigned char* bytes, size_t size, const std::string& path);

}  // namespace dsopen::model
