// safetensors files: an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and
// byte range, then the raw data. The reader memory-maps the file and has safetensors_header check every claim of
// the header before it hands out a tensor, so a corrupt or truncated file is a clear error, never an
// out-of-bounds read.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace dsopen::model {

class SafetensorsFile {
public:
  // Throws a runtime error naming `path` and the violated rule.
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return entries_.count(name) > 0; }
  std::vector<int64_t> shape(const std::string& name) const;
  // The file's dtype name of a tensor (F32, BF16, F8_E4M3, ...) and its size in bytes.
  std::string dtype(const std::string& name) const;
  size_t byte_size(const std::string& name) const;
  // A CPU tensor viewing the mapped bytes (valid while any tensor or this object lives); clone to own it. A runtime
  // error for dtypes LibTorch has no type for.
  torch::Tensor tensor(const std::string& name) const;
  // Drops the tensor's pages from this process's resident memory. They stay in the page cache, and reading the
  // tensor again faults them back in. Loaders call it once a tensor is copied, so a load peaks at the model's size
  // rather than the model's plus the file's.
  void release(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

private:
  struct Entry {
    std::optional<torch::ScalarType> dtype;  // none for dtypes LibTorch lacks (F4, F6_*): tensor() refuses them
    std::string dtype_name;
    std::vector<int64_t> shape;
    size_t begin, end;  // relative to the data section
  };
  std::string path_;
  std::shared_ptr<void> mapping_;  // munmap on release
  const unsigned char* data_ = nullptr;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors (any device/dtype among F32/F16/BF16/F64/I64/I32/I16/I8/U8/BOOL) atomically: temporary file,
// fsync, rename. Tensors are written in name order.
void save_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// A safetensors file written tensor by tensor, for files larger than memory (ZeRO-3 checkpoints gather one layer
// at a time). The entries are declared up front, in the order write() will receive them; commit() checks that
// every one came and moves the file into place (atomically, as save_safetensors). Destroyed before commit(), it
// leaves `path` as it was.
class SafetensorsWriter {
public:
  struct Entry {
    std::string name;
    torch::ScalarType dtype;
    std::vector<int64_t> shape;
  };
  SafetensorsWriter(const std::string& path, std::vector<Entry> entries,
                    const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsWriter();
  // The next declared entry: a logic error when `name`, its shape or dtype differ.
  void write(const std::string& name, const torch::Tensor& t);
  void commit();

private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsopen::model
