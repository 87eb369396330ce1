#include "model/gguf_writer.h"

#include <cmath>
#include <cstring>
#include <stdexcept>

#include "utils/env.h"
#include "utils/progress.h"

// The block quantizers must give ggml's bytes exactly: this file is compiled with -ffp-contract=off so that
// x * id + 8.5f is not fused into one rounding (CMakeLists.txt).

namespace dsopen::model::gguf {

namespace {

constexpr uint32_t kString = 8, kArray = 9, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7;
constexpr uint32_t kAlignment = 32;
constexpr int kBlock = 32;

template <class T>
void put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof v);
}
void put_string(std::string& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out += s;
}

uint16_t fp16_bits(float f) {
  const c10::Half h(f);  // round to nearest even, as ggml's FP32_TO_FP16 and numpy's astype(float16)
  return h.x;
}

}  // namespace

const char* type_name(TensorType t) {
  switch (t) {
    case TensorType::F32: return "f32";
    case TensorType::F16: return "f16";
    case TensorType::BF16: return "bf16";
    case TensorType::Q8_0: return "q8_0";
    case TensorType::Q4_0: return "q4_0";
  }
  return "?";
}

bool is_quantized(TensorType t) { return t == TensorType::Q8_0 || t == TensorType::Q4_0; }

std::vector<uint8_t> quantize_q8_0(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.numel() % kBlock == 0, "quantize_q8_0");
  const float* p = x.data_ptr<float>();
  const int64_t blocks = x.numel() / kBlock;
  std::vector<uint8_t> out(static_cast<size_t>(blocks) * 34);
  at::parallel_for(0, blocks, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* v = p + b * kBlock;
      float amax = 0;
      for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.0f;
      const float id = d != 0 ? 1.0f / d : 0.0f;
      uint8_t* o = out.data() + b * 34;
      const uint16_t dh = fp16_bits(d);
      std::memcpy(o, &dh, 2);
      for (int j = 0; j < kBlock; ++j) o[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::roundf(v[j] * id)));
    }
  });
  return out;
}

std::vector<uint8_t> quantize_q4_0(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.numel() % kBlock == 0, "quantize_q4_0");
  const float* p = x.data_ptr<float>();
  const int64_t blocks = x.numel() / kBlock;
  std::vector<uint8_t> out(static_cast<size_t>(blocks) * 18);
  at::parallel_for(0, blocks, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* v = p + b * kBlock;
      float amax = 0, max = 0;  // the value of largest magnitude, first one on ties
      for (int j = 0; j < kBlock; ++j)
        if (amax < std::fabs(v[j])) amax = std::fabs(v[j]), max = v[j];
      const float d = max / -8.0f;
      const float id = d != 0 ? 1.0f / d : 0.0f;
      uint8_t* o = out.data() + b * 18;
      const uint16_t dh = fp16_bits(d);
      std::memcpy(o, &dh, 2);
      for (int j = 0; j < kBlock / 2; ++j) {
        const float x0 = v[j] * id, x1 = v[kBlock / 2 + j] * id;
        const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>(x0 + 8.5f)));
        const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>(x1 + 8.5f)));
        o[2 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
      }
    }
  });
  return out;
}

void Writer::key(const std::string& k, uint32_t type) {
  for (const auto& existing : keys_)
    if (existing == k) throw std::logic_error("gguf: metadata key " + k + " added twice");
  keys_.push_back(k);
  put_string(kv_, k);
  put<uint32_t>(kv_, type);
  ++kv_count_;
}

bool Writer::has(const std::string& k) const {
  for (const auto& existing : keys_)
    if (existing == k) return true;
  return false;
}

void Writer::add_string(const std::string& k, const std::string& v) {
  key(k, kString);
  put_string(kv_, v);
}
void Writer::add_u32(const std::string& k, uint32_t v) {
  key(k, kU32);
  put(kv_, v);
}
void Writer::add_i32(const std::string& k, int32_t v) {
  key(k, kI32);
  put(kv_, v);
}
void Writer::add_f32(const std::string& k, float v) {
  key(k, kF32);
  put(kv_, v);
}
void Writer::add_bool(const std::string& k, bool v) {
  key(k, kBool);
  put<uint8_t>(kv_, v ? 1 : 0);
}
void Writer::add_strings(const std::string& k, const std::vector<std::string>& v) {
  key(k, kArray);
  put<uint32_t>(kv_, kString);
  put<uint64_t>(kv_, v.size());
  for (const auto& s : v) put_string(kv_, s);
}
void Writer::add_f32s(const std::string& k, const std::vector<float>& v) {
  key(k, kArray);
  put<uint32_t>(kv_, kF32);
  put<uint64_t>(kv_, v.size());
  for (float f : v) put(kv_, f);
}
void Writer::add_i32s(const std::string& k, const std::vector<int32_t>& v) {
  key(k, kArray);
  put<uint32_t>(kv_, kI32);
  put<uint64_t>(kv_, v.size());
  for (int32_t i : v) put(kv_, i);
}

size_t Writer::Tensor::bytes() const {
  return is_quantized(type) ? blocks.size() : static_cast<size_t>(data.numel() * data.element_size());
}
const void* Writer::Tensor::ptr() const { return is_quantized(type) ? blocks.data() : data.data_ptr(); }

void Writer::add_tensor(const std::string& name, const torch::Tensor& t, TensorType type) {
  Tensor out;
  out.name = name;
  out.type = type;
  for (int64_t d = t.dim() - 1; d >= 0; --d) out.dims.push_back(t.size(d));
  auto f = t.detach().to(torch::kCPU);
  switch (type) {
    case TensorType::F32: out.data = f.to(torch::kFloat32).contiguous(); break;
    case TensorType::F16: out.data = f.to(torch::kFloat16).contiguous(); break;
    case TensorType::BF16: out.data = f.to(torch::kBFloat16).contiguous(); break;
    case TensorType::Q8_0:
    case TensorType::Q4_0: {
      TORCH_CHECK(t.dim() >= 1 && t.size(-1) % kBlock == 0, "gguf: ", name, " rows of ", t.size(-1),
                  " values do not split into blocks of 32");
      const auto x = f.to(torch::kFloat32).contiguous();
      out.blocks = type == TensorType::Q8_0 ? quantize_q8_0(x) : quantize_q4_0(x);
      break;
    }
  }
  tensors_.push_back(std::move(out));
}

int64_t Writer::data_bytes() const {
  int64_t n = 0;
  for (const auto& t : tensors_) n += static_cast<int64_t>((t.bytes() + kAlignment - 1) / kAlignment * kAlignment);
  return n;
}

void Writer::write(const std::string& path) const {
  std::string head;
  head += "GGUF";
  put<uint32_t>(head, 3);
  put<uint64_t>(head, tensors_.size());
  put<uint64_t>(head, kv_count_);
  head += kv_;
  uint64_t offset = 0;
  for (const auto& t : tensors_) {
    put_string(head, t.name);
    put<uint32_t>(head, static_cast<uint32_t>(t.dims.size()));
    for (int64_t d : t.dims) put<uint64_t>(head, static_cast<uint64_t>(d));
    put<uint32_t>(head, static_cast<uint32_t>(t.type));
    put<uint64_t>(head, offset);
    offset += (t.bytes() + kAlignment - 1) / kAlignment * kAlignment;
  }
  head.append((kAlignment - head.size() % kAlignment) % kAlignment, '\0');
  static const char zeros[kAlignment] = {};
  std::vector<env::Bytes> pieces{{head.data(), head.size()}};
  for (const auto& t : tensors_) {
    pieces.push_back({t.ptr(), t.bytes()});
    const size_t pad = (kAlignment - t.bytes() % kAlignment) % kAlignment;
    if (pad) pieces.push_back({zeros, pad});
  }
  Progress progress("writing " + path, static_cast<int64_t>(head.size() + offset), "B", 30.0, /*quiet_below_s=*/2.0);
  env::write_file_atomic(path, pieces, [&](size_t written) { progress.update(static_cast<int64_t>(written)); });
  progress.finish();
}

}  // namespace dsopen::model::gguf
