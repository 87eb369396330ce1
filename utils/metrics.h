// Metrics as JSON lines: one object per call, appended and flushed so a crash never loses logged steps.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdio>
#include <string>

namespace dsopen {

class MetricsWriter {
public:
  MetricsWriter() = default;
  // Opens `path` for appending (a resumed run continues the same file). `resumed_step` >= 0: the run resumes after
  // that step, so records of later steps (written before a crash or stop, and about to be written again) are
  // dropped first, keeping one record per step.
  explicit MetricsWriter(const std::string& path, int64_t resumed_step = -1);
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
