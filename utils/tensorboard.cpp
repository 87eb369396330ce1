#include "utils/tensorboard.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <filesystem>

#include "utils/errors.h"

namespace dsopen::tensorboard {

namespace {
// Table of the reflected Castagnoli polynomial 0x82F63B78, one byte at a time.
const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

// Protobuf wire format: a key is (field << 3) | wire type; 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
class Message {
public:
  Message& varint(int field, uint64_t v) {
    key(field, 0);
    put_varint(v);
    return *this;
  }
  Message& f64(int field, double v) {
    key(field, 1);
    put_fixed(&v, 8);
    return *this;
  }
  Message& f32(int field, float v) {
    key(field, 5);
    put_fixed(&v, 4);
    return *this;
  }
  Message& bytes(int field, const std::string& v) {
    key(field, 2);
    put_varint(v.size());
    out_ += v;
    return *this;
  }
  Message& message(int field, const Message& m) { return bytes(field, m.out_); }
  Message& packed_f64(int field, const std::vector<double>& v) {
    std::string body;
    for (double x : v) body.append(reinterpret_cast<const char*>(&x), 8);  // little-endian hosts
    return bytes(field, body);
  }
  const std::string& str() const { return out_; }

private:
  void key(int field, int wire_type) { put_varint(static_cast<uint64_t>(field) << 3 | static_cast<uint64_t>(wire_type)); }
  void put_varint(uint64_t v) {
    while (v >= 0x80) {
      out_ += static_cast<char>((v & 0x7F) | 0x80);
      v >>= 7;
    }
    out_ += static_cast<char>(v);
  }
  void put_fixed(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  std::string out_;
};

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}
}  // namespace

uint32_t crc32c(const void* data, size_t size) {
  const auto& t = crc_table();
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < size; ++i) c = t[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const void* data, size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

EventWriter::EventWriter(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw runtime_error(dir, "cannot create the TensorBoard directory: " + ec.message(), "check run.output_dir");
  char host[256] = "localhost";
  ::gethostname(host, sizeof host - 1);
  path_ = (std::filesystem::path(dir) / ("events.out.tfevents." + std::to_string(static_cast<int64_t>(now_seconds())) +
                                          "." + host + "." + std::to_string(::getpid()) + ".dsopen"))
              .string();
  file_ = std::fopen(path_.c_str(), "wb");
  if (!file_) throw runtime_error(path_, "cannot create the event file", "check that the directory is writable");
  write_record(Message().f64(1, now_seconds()).bytes(3, "brain.Event:2").str());
}

EventWriter::~EventWriter() {
  if (file_) std::fclose(file_);
}

void EventWriter::write_record(const std::string& data) {
  const uint64_t len = data.size();  // little-endian on every platform LibTorch supports
  const uint32_t len_crc = masked_crc32c(&len, sizeof len), data_crc = masked_crc32c(data.data(), data.size());
  std::string record(reinterpret_cast<const char*>(&len), sizeof len);
  record.append(reinterpret_cast<const char*>(&len_crc), sizeof len_crc);
  record += data;
  record.append(reinterpret_cast<const char*>(&data_crc), sizeof data_crc);
  // One write per record, then flush: a killed process leaves whole records (and at most one torn one at the end).
  if (std::fwrite(record.data(), 1, record.size(), file_) != record.size() || std::fflush(file_) != 0)
    throw runtime_error(path_, "write failed (disk full?)");
}

// An Event holding one Summary.Value.
static std::string event_with_value(int64_t step, const Message& value) {
  return Message()
      .f64(1, now_seconds())
      .varint(2, static_cast<uint64_t>(step))
      .message(5, Message().message(1, value))
      .str();
}

void EventWriter::add_scalar(const std::string& tag, int64_t step, double value) {
  write_record(event_with_value(step, Message().bytes(1, tag).f32(2, static_cast<float>(value))));
}

void EventWriter::add_histogram(const std::string& tag, int64_t step, const std::vector<double>& counts) {
  double num = 0, sum = 0, sum_sq = 0, lo = -1, hi = 0;
  std::vector<double> limits;
  for (size_t i = 0; i < counts.size(); ++i) {
    const double x = static_cast<double>(i), c = counts[i];
    num += c, sum += c * x, sum_sq += c * x * x;
    if (c > 0) {
      if (lo < 0) lo = x;
      hi = x;
    }
    limits.push_back(x + 0.5);
  }
  Message h;
  h.f64(1, lo < 0 ? 0 : lo).f64(2, hi).f64(3, num).f64(4, sum).f64(5, sum_sq).packed_f64(6, limits).packed_f64(7, counts);
  write_record(event_with_value(step, Message().bytes(1, tag).message(5, h)));
}

void EventWriter::add_text(const std::string& tag, int64_t step, const std::string& text) {
  const Message shape = Message().message(2, Message().varint(1, 1));
  const Message tensor = Message().varint(1, 7 /* DT_STRING */).message(2, shape).bytes(8, text);
  const Message metadata = Message().message(1, Message().bytes(1, "text"));
  write_record(event_with_value(step, Message().bytes(1, tag).message(8, tensor).message(9, metadata)));
}

}  // namespace dsopen::tensorboard
