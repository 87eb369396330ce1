// Metrics as JSON lines: one object per call, appended and flushed so a crash never loses logged steps.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdio>
#include <string>

namespace dsopen {

class MetricsWriter {
public:
  MetricsWriter() = default;
  // Opens `path` for appending (a resumed run continues the same file).
  explicit MetricsWriter(const std::string& path);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  bool is_open() const { return file_ != nullptr; }
  void write(const nlohmann::json& record);

private:
  std::FILE* file_ = nullptr;
  std::string path_;
};

}  // namespace dsopen
