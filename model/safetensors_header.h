// Validation of a safetensors header, kept free of LibTorch so that it can be fuzzed on its own: every claim of
// the header (length, JSON, dtype names, shape x element size = byte span, ranges inside the data, no overlaps,
// total size) is checked before any tensor byte is touched.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace dsopen::model {

struct TensorEntry {
  std::string dtype;  // F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL
  std::vector<int64_t> shape;
  size_t begin = 0, end = 0;  // byte range relative to the data section
};

struct SafetensorsHeader {
  std::map<std::string, TensorEntry> tensors;
  std::map<std::string, std::string> metadata;
  size_t data_offset = 0;  // where the data section starts in the file
};

// Bytes per element of a safetensors dtype name, 0 when unknown.
size_t dtype_element_size(const std::string& dtype);

// Parses and checks the header of a whole file held in [bytes, bytes + size). Throws dsopen::Error naming `path`.
SafetensorsHeader parse_safetensors_header(const unsigned char* bytes, size_t size, const std::string& path);

}  // namespace dsopen::model
