#include "utils/metrics.h"

#include <filesystem>
#include <fstream>

#include "utils/env.h"
#include "utils/errors.h"

namespace dsopen {

MetricsWriter::MetricsWriter(const std::string& path, int64_t resumed_step) : path_(path) {
  std::error_code ec;
  if (resumed_step >= 0 && std::filesystem::is_regular_file(path, ec)) {
    std::ifstream in(path);
    std::string kept, line;
    bool dropped = false;
    while (std::getline(in, line)) {
      const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      const bool later = j.is_object() && j.contains("step") && j["step"].is_number_integer() &&
                         j["step"].get<int64_t>() > resumed_step;
      if (later) dropped = true;
      else kept += line + "\n";
    }
    if (dropped) env::write_file_atomic(path, kept);
  }
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
