#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "utils/errors.h"

namespace dsopen::model {

namespace {

const std::vector<std::pair<std::string, torch::ScalarType>>& dtype_table() {
  static const std::vector<std::pair<std::string, torch::ScalarType>> t = {
      {"F32", torch::kFloat32}, {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16}, {"F64", torch::kFloat64},
      {"I64", torch::kInt64},   {"I32", torch::kInt32},   {"I16", torch::kInt16},     {"I8", torch::kInt8},
      {"U8", torch::kUInt8},    {"BOOL", torch::kBool}};
  return t;
}

std::string dtype_name(torch::ScalarType t) {
  for (const auto& [name, type] : dtype_table())
    if (type == t) return name;
  throw runtime_error("safetensors", std::string("unsupported dtype ") + c10::toString(t));
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  auto bad = [&](const std::string& what) {
    return runtime_error(path, what, "the file is corrupt or truncated; re-save or re-download it");
  };
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw runtime_error(path, "cannot open safetensors file", "check the path");
  struct stat st{};
  ::fstat(fd, &st);
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    throw bad("file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  }
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) throw runtime_error(path, "mmap failed");
  mapping_ = std::shared_ptr<void>(p, [size](void* q) { ::munmap(q, size); });
  const auto* bytes = static_cast<const unsigned char*>(p);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes, 8);
  if (header_len > size - 8) throw bad("header length " + std::to_string(header_len) + " runs past the end of the file");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const nlohmann::json::exception& e) {
    throw bad(std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) throw bad("header is not a JSON object");
  data_ = bytes + 8 + header_len;
  const size_t data_size = size - 8 - header_len;
  std::vector<std::pair<size_t, size_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it.value().is_object())
        for (auto m = it.value().begin(); m != it.value().end(); ++m)
          if (m.value().is_string()) metadata_[m.key()] = m.value().get<std::string>();
      continue;
    }
    const auto& v = it.value();
    const std::string where = "tensor '" + it.key() + "'";
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      throw bad(where + " lacks dtype, shape or data_offsets");
    Entry e{};
    const std::string dt = v["dtype"].is_string() ? v["dtype"].get<std::string>() : "?";
    auto found = std::find_if(dtype_table().begin(), dtype_table().end(), [&](const auto& d) { return d.first == dt; });
    if (found == dtype_table().end()) throw bad(where + " has unknown dtype '" + dt + "'");
    e.dtype = found->second;
    int64_t numel = 1;
    if (!v["shape"].is_array()) throw bad(where + " shape is not a list");
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) throw bad(where + " has a negative or non-integer dimension");
      e.shape.push_back(d.get<int64_t>());
      if (e.shape.back() > 0 && numel > (int64_t{1} << 50) / e.shape.back()) throw bad(where + " shape is absurdly large");
      numel *= e.shape.back();
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw bad(where + " data_offsets is not [begin, end]");
    e.begin = off[0].get<size_t>();
    e.end = off[1].get<size_t>();
    if (e.begin > e.end || e.end > data_size)
      throw bad(where + " bytes [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + ") lie outside the " +
                std::to_string(data_size) + "-byte data section");
    if (e.end - e.begin != static_cast<size_t>(numel) * c10::elementSize(e.dtype))
      throw bad(where + " shape x element size (" + std::to_string(numel * c10::elementSize(e.dtype)) +
                " bytes) differs from its byte range (" + std::to_string(e.end - e.begin) + ")");
    ranges.push_back({e.begin, e.end});
    entries_[it.key()] = e;
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second) throw bad("two tensors overlap in the data section");
  const size_t covered = ranges.empty() ? 0 : ranges.back().second;
  if (covered != data_size)
    throw bad("data section is " + std::to_string(data_size) + " bytes but the tensors end at " + std::to_string(covered));
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& kv : entries_) out.push_back(kv.first);
  return out;
}

std::vector<int64_t> SafetensorsFile::shape(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw runtime_error(path_, "no tensor named '" + name + "'");
  return it->second.shape;
}

torch::Tensor SafetensorsFile::tensor(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw runtime_error(path_, "no tensor named '" + name + "'");
  const Entry& e = it->second;
  auto keep = mapping_;  // the tensor keeps the mapping alive
  return torch::from_blob(const_cast<unsigned char*>(data_ + e.begin), e.shape, [keep](void*) {},
                          torch::TensorOptions().dtype(e.dtype));
}

void save_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> data;
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    auto c = t.detach().to(torch::kCPU).contiguous();
    const size_t n = c.numel() * c.element_size();
    header[name] = {{"dtype", dtype_name(c.scalar_type())}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + n}}};
    offset += n;
    data.push_back(c);
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // data starts 8-byte aligned, as the reference writer does
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw runtime_error(path, "cannot create file", "check the directory exists and is writable");
  auto write_all = [&](const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    while (n > 0) {
      const ssize_t w = ::write(fd, c, n);
      if (w <= 0) {
        ::close(fd);
        ::unlink(tmp.c_str());
        throw runtime_error(path, "write failed (disk full?)");
      }
      c += w, n -= static_cast<size_t>(w);
    }
  };
  const uint64_t len = h.size();
  write_all(&len, 8);
  write_all(h.data(), h.size());
  for (const auto& t : data) write_all(t.data_ptr(), t.numel() * t.element_size());
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw runtime_error(path, "fsync failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    throw runtime_error(path, "rename into place failed");
  }
}

}  // namespace dsopen::model
