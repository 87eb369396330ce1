// The GGUF file format (version 3) as llama.cpp reads it, written in one pass: header, metadata key/value pairs,
// tensor descriptions, then the tensor data, each tensor aligned to 32 bytes. Reference: ggml/docs/gguf.md and
// gguf-py (the `gguf` PyPI package), whose reader the tests use.
//
// Tensor types written here and their blocks (ggml-common.h):
//   F32, F16, BF16  one value per element
//   Q8_0            32 values -> fp16 scale d = max|x| / 127, int8 q = round(x / d)                      (34 bytes)
//   Q4_0            32 values -> fp16 d = m / -8 where m is the value of largest magnitude,
//                   4-bit q = min(15, trunc(x / d + 8.5)); byte j holds q[j] (low) and q[j + 16] (high) (18 bytes)
// A tensor's GGUF dims are its torch sizes reversed (ne[0] is the contiguous one); quantized types need
// ne[0] % 32 == 0.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace dsopen::model::gguf {

enum class TensorType : uint32_t { F32 = 0, F16 = 1, Q4_0 = 2, Q8_0 = 8, BF16 = 30 };
const char* type_name(TensorType t);
bool is_quantized(TensorType t);

// Quantizes `x` (float32, contiguous, numel % 32 == 0) into blocks, as ggml's quantize_row_*_ref does.
std::vector<uint8_t> quantize_q8_0(const torch::Tensor& x);
std::vector<uint8_t> quantize_q4_0(const torch::Tensor& x);

class Writer {
public:
  // Metadata, in the order added (keys must be unique: a logic error otherwise).
  void add_string(const std::string& key, const std::string& value);
  void add_u32(const std::string& key, uint32_t value);
  void add_i32(const std::string& key, int32_t value);
  void add_f32(const std::string& key, float value);
  void add_bool(const std::string& key, bool value);
  void add_strings(const std::string& key, const std::vector<std::string>& values);
  void add_f32s(const std::string& key, const std::vector<float>& values);
  void add_i32s(const std::string& key, const std::vector<int32_t>& values);
  bool has(const std::string& key) const;

  // A tensor stored as `type` (converted or quantized now; the float input is not kept for quantized types).
  void add_tensor(const std::string& name, const torch::Tensor& t, TensorType type);
  size_t tensor_count() const { return tensors_.size(); }
  int64_t data_bytes() const;

  // Writes the file atomically (temporary file, fsync, rename), with a progress line for long writes.
  void write(const std::string& path) const;

private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> dims;  // GGUF order (reversed torch sizes)
    TensorType type;
    torch::Tensor data;          // F32/F16/BF16: the converted tensor (contiguous)
    std::vector<uint8_t> blocks;  // quantized types
    size_t bytes() const;
    const void* ptr() const;
  };
  void key(const std::string& k, uint32_t type);

  std::string kv_;
  std::vector<std::string> keys_;
  uint64_t kv_count_ = 0;
  std::vector<Tensor> tensors_;
};

}  // namespace dsopen::model::gguf
