#include "model/safetensors_header.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "utils/errors.h"

namespace dsopen::model {

size_t dtype_element_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {{"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F64", 8}, {"I64", 8},
                                                      {"I32", 4}, {"I16", 2}, {"I8", 1},   {"U8", 1},  {"BOOL", 1}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

SafetensorsHeader parse_safetensors_header(const unsigned char* bytes, size_t size, const std::string& path) {
  auto bad = [&](const std::string& what) {
    return runtime_error(path, what, "the file is corrupt or truncated; re-save or re-download it");
  };
  if (size < 8) throw bad("file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes, 8);  // little-endian, as the format specifies
  if (header_len > size - 8) throw bad("header length " + std::to_string(header_len) + " runs past the end of the file");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const nlohmann::json::exception& e) {
    throw bad(std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) throw bad("header is not a JSON object");
  SafetensorsHeader out;
  out.data_offset = 8 + header_len;
  const size_t data_size = size - out.data_offset;
  std::vector<std::pair<size_t, size_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it.value().is_object())
        for (auto m = it.value().begin(); m != it.value().end(); ++m)
          if (m.value().is_string()) out.metadata[m.key()] = m.value().get<std::string>();
      continue;
    }
    const auto& v = it.value();
    const std::string where = "tensor '" + it.key() + "'";
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      throw bad(where + " lacks dtype, shape or data_offsets");
    TensorEntry e;
    e.dtype = v["dtype"].is_string() ? v["dtype"].get<std::string>() : "?";
    const size_t elem = dtype_element_size(e.dtype);
    if (elem == 0) throw bad(where + " has unknown dtype '" + e.dtype + "'");
    if (!v["shape"].is_array()) throw bad(where + " shape is not a list");
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) throw bad(where + " has a negative or non-integer dimension");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > (uint64_t{1} << 48) || (dim > 0 && numel > (uint64_t{1} << 48) / dim)) throw bad(where + " shape is absurdly large");
      e.shape.push_back(static_cast<int64_t>(dim));
      numel *= dim;
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw bad(where + " data_offsets is not [begin, end]");
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > data_size)
      throw bad(where + " bytes [" + std::to_string(begin) + ", " + std::to_string(end) + ") lie outside the " +
                std::to_string(data_size) + "-byte data section");
    e.begin = static_cast<size_t>(begin);
    e.end = static_cast<size_t>(end);
    if (e.end - e.begin != numel * elem)
      throw bad(where + " shape x element size (" + std::to_string(numel * elem) + " bytes) differs from its byte range (" +
                std::to_string(e.end - e.begin) + ")");
    ranges.push_back({e.begin, e.end});
    out.tensors[it.key()] = std::move(e);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second) throw bad("two tensors overlap in the data section");
  const size_t covered = ranges.empty() ? 0 : ranges.back().second;
  if (covered != data_size)
    throw bad("data section is " + std::to_string(data_size) + " bytes but the tensors end at " + std::to_string(covered));
  return out;
}

}  // namespace dsopen::model
