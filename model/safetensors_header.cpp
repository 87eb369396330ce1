#include "model/safetensors_header.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string_view>

#include "utils/errors.h"
#include "utils/json.h"

namespace dsopen::model {

namespace {
constexpr uint64_t kMaxHeaderBytes = 100000000;  // the reference reader's limit
}

size_t dtype_bits(const std::string& dtype) {
  static const std::map<std::string, size_t> bits = {
      {"BOOL", 8},     {"U8", 8},       {"I8", 8},       {"F8_E5M2", 8},      {"F8_E4M3", 8},      {"F8_E8M0", 8},
      {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8}, {"I16", 16}, {"U16", 16},       {"F16", 16},         {"BF16", 16},
      {"I32", 32},     {"U32", 32},     {"F32", 32},     {"C64", 64},         {"F64", 64},         {"I64", 64},
      {"U64", 64},     {"F4", 4},       {"F6_E2M3", 6},  {"F6_E3M2", 6}};
  auto it = bits.find(dtype);
  return it == bits.end() ? 0 : it->second;
}

SafetensorsHeader parse_safetensors_header(const unsigned char* bytes, size_t size, const std::string& path) {
  auto bad = [&](const std::string& what) {
    return runtime_error(path, what, "the file is corrupt or truncated; re-save or re-download it");
  };
  if (size < 8) throw bad("file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes, 8);  // little-endian, as the format specifies
  if (header_len > size - 8) throw bad("header length " + std::to_string(header_len) + " runs past the end of the file");
  if (header_len > kMaxHeaderBytes)
    throw bad("header length " + std::to_string(header_len) + " exceeds the format's limit of 100 MB");
  const std::string_view text(reinterpret_cast<const char*>(bytes) + 8, header_len);
  // nlohmann skips a UTF-8 byte-order mark; the format (and serde) does not.
  if (text.size() >= 3 && text.compare(0, 3, "\xEF\xBB\xBF") == 0) throw bad("header starts with a byte-order mark");
  nlohmann::json header;
  try {
    header = json::parse(text, path);
  } catch (const nlohmann::json::exception& e) {
    throw bad("header is not valid JSON: " + json::reason(e));
  }
  if (!header.is_object()) throw bad("header is not a JSON object");
  SafetensorsHeader out;
  out.data_offset = 8 + header_len;
  const size_t data_size = size - out.data_offset;
  struct Range {
    uint64_t begin, end;
    std::string name;
  };
  std::vector<Range> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      const auto& m = it.value();
      if (m.is_null()) continue;
      if (!m.is_object()) throw bad("__metadata__ is not an object of strings");
      for (auto kv = m.begin(); kv != m.end(); ++kv) {
        if (!kv.value().is_string()) throw bad("__metadata__ value '" + kv.key() + "' is not a string");
        out.metadata[kv.key()] = kv.value().get<std::string>();
      }
      continue;
    }
    const auto& v = it.value();
    const std::string where = "tensor '" + it.key() + "'";
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      throw bad(where + " lacks dtype, shape or data_offsets");
    TensorEntry e;
    e.dtype = v["dtype"].is_string() ? v["dtype"].get<std::string>() : "?";
    const size_t bits = dtype_bits(e.dtype);
    if (bits == 0) throw bad(where + " has unknown dtype '" + e.dtype + "'");
    if (!v["shape"].is_array()) throw bad(where + " shape is not a list");
    uint64_t numel = 1;
    bool empty = false;  // a zero dimension: no element, whatever the others (the reference accepts [0, 2^62])
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) throw bad(where + " has a negative or non-integer dimension");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > uint64_t{INT64_MAX}) throw bad(where + " shape is absurdly large");
      e.shape.push_back(static_cast<int64_t>(dim));
      empty = empty || dim == 0;
    }
    constexpr uint64_t kLimit = uint64_t{1} << 56;  // far beyond any file, small enough that numel * bits cannot wrap
    for (int64_t dim : e.shape) {
      if (empty) {
        numel = 0;
        break;
      }
      if (static_cast<uint64_t>(dim) > kLimit || numel > kLimit / static_cast<uint64_t>(dim))
        throw bad(where + " shape is absurdly large");
      numel *= static_cast<uint64_t>(dim);
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw bad(where + " data_offsets is not [begin, end]");
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > data_size)
      throw bad(where + " bytes [" + std::to_string(begin) + ", " + std::to_string(end) + ") lie outside the " +
                std::to_string(data_size) + "-byte data section");
    if (numel * bits % 8 != 0)
      throw bad(where + " has " + std::to_string(numel) + " " + e.dtype + " elements, not a whole number of bytes");
    e.begin = static_cast<size_t>(begin);
    e.end = static_cast<size_t>(end);
    if (e.end - e.begin != numel * bits / 8)
      throw bad(where + " shape x element size (" + std::to_string(numel * bits / 8) + " bytes) differs from its byte range (" +
                std::to_string(e.end - e.begin) + ")");
    ranges.push_back({begin, end, it.key()});
    out.tensors[it.key()] = std::move(e);
  }
  // The tensors must tile the data section exactly, as the reference reader demands.
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  uint64_t offset = 0;
  for (const auto& r : ranges) {
    if (r.begin < offset) throw bad("tensor '" + r.name + "' overlaps the tensor before it in the data section");
    if (r.begin > offset)
      throw bad("tensor '" + r.name + "' starts at byte " + std::to_string(r.begin) + " but the bytes before it end at " +
                std::to_string(offset) + " (a gap in the data section)");
    offset = r.end;
  }
  if (offset != data_size)
    throw bad("data section is " + std::to_string(data_size) + " bytes but the tensors end at " + std::to_string(offset));
  return out;
}

}  // namespace dsopen::model
