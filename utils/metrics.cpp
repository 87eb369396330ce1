#include "utils/metrics.h"

#include "utils/errors.h"

namespace dsopen {

MetricsWriter::MetricsWriter(const std::string& path) : path_(path) {
  file_ = std::fopen(path.c_str(), "a");
  if (!file_) throw runtime_error(path, "cannot open metrics file for appending", "check run.output_dir");
}

MetricsWriter::~MetricsWriter() {
  if (file_) std::fclose(file_);
}

void MetricsWriter::write(const nlohmann::json& record) {
  if (!file_) return;
  // NaN/Inf are not JSON; nlohmann writes them as null, which readers handle.
  const std::string line = record.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), file_) != line.size() || std::fflush(file_) != 0)
    throw runtime_error(path_, "cannot write metrics (disk full?)");
}

}  // namespace dsopen
