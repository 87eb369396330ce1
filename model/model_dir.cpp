#include "model/model_dir.h"

#include <filesystem>

#include "utils/env.h"
#include "utils/errors.h"

namespace fs = std::filesystem;

namespace dsopen::model {

std::string read_latest(const std::string& checkpoints_dir) {
  const fs::path latest = fs::path(checkpoints_dir) / kLatestFile;
  if (!fs::exists(latest)) return "";
  std::string name = env::read_file(latest.string());
  name.erase(name.find_last_not_of(" \t\r\n") + 1);
  return name;
}

void write_latest(const std::string& checkpoints_dir, const std::string& step_dir_name) {
  env::write_file_atomic((fs::path(checkpoints_dir) / kLatestFile).string(), step_dir_name + "\n");
}

std::string resolve_latest(const std::string& dir) {
  std::error_code ec;
  // A checkpoints directory's `latest` file itself: the step it names.
  if (fs::path(dir).filename() == kLatestFile && fs::is_regular_file(dir, ec)) {
    const fs::path checkpoints = fs::path(dir).parent_path();
    const std::string name = read_latest(checkpoints.empty() ? "." : checkpoints.string());
    return name.empty() ? dir : (checkpoints / name).string();
  }
  if (fs::exists(fs::path(dir) / kConfigFile)) return dir;
  const std::string name = read_latest(dir);
  if (!name.empty()) return (fs::path(dir) / name).string();
  // A run directory (run.output_dir): its checkpoints/ directory's latest.
  const fs::path checkpoints = fs::path(dir) / "checkpoints";
  const std::string in_run = read_latest(checkpoints.string());
  return in_run.empty() ? dir : (checkpoints / in_run).string();
}

ModelDir::ModelDir(const std::string& path) : path_(resolve_latest(path)) {
  if (!fs::is_directory(path_)) throw runtime_error(path, "model directory not found", "pass a checkpoint or HF model directory");
}

std::string ModelDir::file(const std::string& name) const { return (fs::path(path_) / name).string(); }

bool ModelDir::has(const std::string& name) const { return fs::exists(fs::path(path_) / name); }

ModelConfig ModelDir::config() const { return ModelConfig::from_hf_json_file(file(kConfigFile)); }

WeightFiles ModelDir::weights() const { return WeightFiles(path_); }

std::string ModelDir::tokenizer_path(const std::string& fallback) const {
  for (const std::string& dir : {path_, fallback}) {
    if (dir.empty()) continue;
    for (const char* name : {"tokenizer.json", "tokenizer.model"})
      if (fs::exists(fs::path(dir) / name)) return dir;
  }
  return "";
}

}  // namespace dsopen::model
