#include "model/safetensors.h"

#include "model/safetensors_header.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <nlohmann/json.hpp>

#include "utils/compat.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/progress.h"

namespace dsopen::model {

namespace {

// safetensors dtype names with a LibTorch type. F4 and F6_* (sub-byte) are valid in a file but have no tensor here.
const std::vector<std::pair<std::string, torch::ScalarType>>& dtype_table() {
  static const std::vector<std::pair<std::string, torch::ScalarType>> t = [] {
    std::vector<std::pair<std::string, torch::ScalarType>> v = {
        {"F32", torch::kFloat32},  {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16}, {"F64", torch::kFloat64},
        {"I64", torch::kInt64},    {"I32", torch::kInt32},   {"I16", torch::kInt16},     {"I8", torch::kInt8},
        {"U8", torch::kUInt8},     {"BOOL", torch::kBool},   {"U16", torch::kUInt16},    {"U32", torch::kUInt32},
        {"U64", torch::kUInt64},   {"C64", torch::kComplexFloat},
        {"F8_E4M3", torch::kFloat8_e4m3fn}, {"F8_E5M2", torch::kFloat8_e5m2},
        {"F8_E4M3FNUZ", torch::kFloat8_e4m3fnuz}, {"F8_E5M2FNUZ", torch::kFloat8_e5m2fnuz}};
    for (const auto& extra : compat::newer_safetensors_dtypes()) v.push_back(extra);
    return v;
  }();
  return t;
}

std::string dtype_name(torch::ScalarType t) {
  for (const auto& [name, type] : dtype_table())
    if (type == t) return name;
  throw runtime_error("safetensors", std::string("unsupported dtype ") + c10::toString(t));
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw runtime_error(path, "cannot open safetensors file", "check the path");
  struct stat st{};
  ::fstat(fd, &st);
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    parse_safetensors_header(nullptr, size, path);  // throws the "too short" error
  }
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) throw runtime_error(path, "mmap failed");
  mapping_ = std::shared_ptr<void>(p, [size](void* q) { ::munmap(q, size); });
  const auto* bytes = static_cast<const unsigned char*>(p);
  SafetensorsHeader header = parse_safetensors_header(bytes, size, path);
  data_ = bytes + header.data_offset;
  metadata_ = std::move(header.metadata);
  for (auto& [name, t] : header.tensors) {
    auto found = std::find_if(dtype_table().begin(), dtype_table().end(), [&](const auto& d) { return d.first == t.dtype; });
    const auto type = found == dtype_table().end() ? std::optional<torch::ScalarType>() : found->second;
    entries_[name] = Entry{type, t.dtype, t.shape, t.begin, t.end};
  }
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

std::string SafetensorsFile::dtype(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw runtime_error(path_, "no tensor named '" + name + "'");
  return it->second.dtype_name;
}

size_t SafetensorsFile::byte_size(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw runtime_error(path_, "no tensor named '" + name + "'");
  return it->second.end - it->second.begin;
}

void SafetensorsFile::release(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) return;
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  // Whole pages inside the tensor's bytes only: a page shared with a neighbour may still be needed.
  const auto first = (reinterpret_cast<uintptr_t>(data_ + it->second.begin) + page - 1) / page * page;
  const auto last = reinterpret_cast<uintptr_t>(data_ + it->second.end) / page * page;
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

torch::Tensor SafetensorsFile::tensor(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw runtime_error(path_, "no tensor named '" + name + "'");
  const Entry& e = it->second;
  if (!e.dtype)
    throw runtime_error(path_, "tensor '" + name + "' has dtype " + e.dtype_name + ", which LibTorch cannot hold",
                        "convert the file to F32, BF16 or F16 first");
  auto keep = mapping_;  // the tensor keeps the mapping alive
  return torch::from_blob(const_cast<unsigned char*>(data_ + e.begin), e.shape, [keep](void*) {},
                          torch::TensorOptions().dtype(*e.dtype));
}

void save_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsWriter::Entry> entries;
  for (const auto& [name, t] : tensors) entries.push_back({name, t.scalar_type(), t.sizes().vec()});
  SafetensorsWriter writer(path, std::move(entries), metadata);
  for (const auto& [name, t] : tensors) writer.write(name, t);
  writer.commit();
}

struct SafetensorsWriter::Impl {
  env::AtomicFile file;
  std::vector<Entry> entries;
  size_t next = 0;
  std::optional<Progress> progress;  // silent for small files; a line with bytes and rate past two seconds
  explicit Impl(const std::string& path) : file(path) {}
  void write(const env::Bytes& piece) {
    file.write(piece, [&](size_t written) { progress->update(static_cast<int64_t>(written)); });
  }
};

SafetensorsWriter::SafetensorsWriter(const std::string& path, std::vector<Entry> entries,
                                     const std::map<std::string, std::string>& metadata)
    : impl_(std::make_unique<Impl>(path)) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (const auto& e : entries) {
    if (header.contains(e.name)) throw std::logic_error("SafetensorsWriter: " + e.name + " declared twice");
    int64_t numel = 1;
    for (const int64_t d : e.shape) numel *= d;
    const size_t n = static_cast<size_t>(numel) * c10::elementSize(e.dtype);
    header[e.name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // data starts 8-byte aligned, as the reference writer does
  const uint64_t len = h.size();
  impl_->progress.emplace("writing " + path, static_cast<int64_t>(8 + h.size() + offset), "B", 30.0, /*quiet_below_s=*/2.0);
  impl_->write({&len, 8});
  impl_->write({h.data(), h.size()});
  impl_->entries = std::move(entries);
}

SafetensorsWriter::~SafetensorsWriter() = default;

void SafetensorsWriter::write(const std::string& name, const torch::Tensor& t) {
  if (impl_->next >= impl_->entries.size() || impl_->entries[impl_->next].name != name)
    throw std::logic_error("SafetensorsWriter: " + name + " written out of the declared order");
  const Entry& e = impl_->entries[impl_->next++];
  if (t.scalar_type() != e.dtype || t.sizes().vec() != e.shape)
    throw std::logic_error("SafetensorsWriter: " + name + " has another dtype or shape than declared");
  const auto c = t.detach().to(torch::kCPU).contiguous();
  impl_->write({c.data_ptr(), static_cast<size_t>(c.numel() * c.element_size())});
}

void SafetensorsWriter::commit() {
  if (impl_->next != impl_->entries.size())
    throw std::logic_error("SafetensorsWriter: " + std::to_string(impl_->entries.size() - impl_->next) + " entries not written");
  impl_->file.commit();
  impl_->progress->finish();
}

}  // namespace dsopen::model
