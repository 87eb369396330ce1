// TensorBoard event files: a writer of scalars, histograms and text that `tensorboard --logdir DIR` shows.
//
// File: DIR/events.out.tfevents.<unix seconds>.<host>.<pid>.dsopen, a sequence of TFRecords, each
//   uint64 length | uint32 masked_crc32c(length bytes) | data[length] | uint32 masked_crc32c(data)
// (little-endian; masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8, CRC-32C Castagnoli polynomial), whose data is a
// serialized tensorflow.Event in protobuf wire format, with TensorBoard's field numbers
// (tensorflow/core/util/event.proto, core/framework/summary.proto, tensor.proto):
//   Event           1 wall_time double, 2 step int64, 3 file_version string, 5 summary Summary
//   Summary         1 value repeated Value
//   Value           1 tag string, 2 simple_value float, 5 histo HistogramProto, 8 tensor TensorProto,
//                   9 metadata SummaryMetadata {1 plugin_data {1 plugin_name string}}
//   HistogramProto  1 min, 2 max, 3 num, 4 sum, 5 sum_squares (double), 6 bucket_limit, 7 bucket (packed double)
//   TensorProto     1 dtype (DT_STRING = 7), 2 tensor_shape {2 dim {1 size}}, 8 string_val bytes
// The six messages are encoded here by hand: Debian's libsentencepiece embeds protobuf 3.14, whose symbols clash with
// Debian's libprotobuf 3.21 at load time (a fatal version check), so the generated-code route is closed.
// The first Event carries file_version "brain.Event:2". Every record is written whole and flushed before the call
// returns, so after a crash or SIGKILL a reader loads every record but at most the last.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace dsopen::tensorboard {

// CRC-32C (Castagnoli) of `size` bytes, and TensorBoard's masked form of it.
uint32_t crc32c(const void* data, size_t size);
uint32_t masked_crc32c(const void* data, size_t size);

class EventWriter {
public:
  // Creates `dir` and a new event file in it; a runtime error naming the directory when it cannot.
  explicit EventWriter(const std::string& dir);
  ~EventWriter();
  EventWriter(const EventWriter&) = delete;
  EventWriter& operator=(const EventWriter&) = delete;

  void add_scalar(const std::string& tag, int64_t step, double value);
  // A histogram of integer positions 0..n-1 weighted by `counts` (bucket i covers (i - 0.5, i + 0.5]): how many
  // tokens each of n experts received. num is the total count.
  void add_histogram(const std::string& tag, int64_t step, const std::vector<double>& counts);
  // Text shown by TensorBoard's text plugin (markdown).
  void add_text(const std::string& tag, int64_t step, const std::string& text);
  const std::string& path() const { return path_; }

private:
  void write_record(const std::string& data);
  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace dsopen::tensorboard
