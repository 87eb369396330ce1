// A model directory as a user names it, resolved once: a dsopen checkpoint (runs/x/checkpoints/step_00000300), a
// checkpoints directory (its `latest` file names the step), or a HuggingFace model directory. It knows the file
// names of the layout (docs/CHECKPOINTS.md), so no other code spells them:
//   config.json, generation_config.json, model.safetensors or model-0000K-of-0000N.safetensors +
//   model.safetensors.index.json, tokenizer.json (+ tokenizer_config.json) or tokenizer.model,
//   adapter_config.json + adapter_model.safetensors (a LoRA checkpoint), and a checkpoints directory's `latest`.
#pragma once

#include <optional>
#include <string>

#include "model/config.h"
#include "model/generation_config.h"
#include "model/weights.h"

namespace dsopen::model {

inline constexpr const char* kLatestFile = "latest";
inline constexpr const char* kConfigFile = "config.json";

// `dir` itself when it holds a config.json; else the checkpoint its `latest` file names (a checkpoints directory),
// or that of its checkpoints/latest (a run directory, run.output_dir); the step a `latest` file names when `dir` is
// that file; else `dir`.
std::string resolve_latest(const std::string& dir);
// The step directory name a checkpoints directory's `latest` file holds, "" when there is none.
std::string read_latest(const std::string& checkpoints_dir);
// Points `latest` at `step_dir_name` (atomically).
void write_latest(const std::string& checkpoints_dir, const std::string& step_dir_name);

class ModelDir {
public:
  // Resolves `latest`; a runtime error naming the path when it is not a directory.
  explicit ModelDir(const std::string& path);

  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const;  // path()/name
  bool has(const std::string& name) const;

  // config.json (a runtime error naming it when missing or invalid).
  ModelConfig config() const;
  // Single or sharded weights (runtime errors name the missing file or shard).
  WeightFiles weights() const;
  bool is_adapter() const { return has("adapter_config.json"); }
  std::optional<GenerationConfig> generation_config() const { return read_generation_config(path_); }

  // The directory whose tokenizer.json or tokenizer.model data::load_tokenizer reads: this one, else `fallback`
  // (a LoRA checkpoint carries its run's tokenizer), else "".
  std::string tokenizer_path(const std::string& fallback = "") const;

private:
  std::string path_;
};

}  // namespace dsopen::model
