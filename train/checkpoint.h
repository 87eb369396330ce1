// Checkpoints (DESIGN §5). A checkpoint directory step_00001000/ holds
//   model.safetensors     HF names (loads in transformers), config.json, tokenizer.model, dsopen.yaml
//   optimizer/rank_0.safetensors   the flat AdamW moments and step, the RNG state
//   trainer_state.json    step, tokens, data cursor, loss scale, world size — written last.
// It is written to step_X.tmp/, fsynced and renamed, then `latest` is updated; `resume: auto` takes the newest
// directory that has a trainer_state.json, so a partial write (crash, SIGKILL) is never picked up.
#pragma once

#include <string>

#include "data/dataset.h"
#include "model/transformer.h"
#include "train/optimizer.h"

namespace dsopen::train {

struct TrainerState {
  int64_t step = 0;    // optimizer steps done
  int64_t tokens = 0;  // tokens consumed
  data::DataCursor cursor;
  double loss_scale = 1.0;
  int64_t loss_scale_good_steps = 0;
  int64_t world_size = 1;
};

struct CheckpointFiles {
  std::string resolved_config;  // YAML text saved as dsopen.yaml
  std::string tokenizer_path;   // copied as tokenizer.model (may be empty)
};

// Writes step_<step>/ under `dir` atomically and prunes all but the newest `keep_last`. Returns its path.
std::string save_checkpoint(const std::string& dir, model::CausalLM& model, const FlatAdamW& optimizer,
                            const TrainerState& state, const CheckpointFiles& files, int64_t keep_last);

// The newest complete checkpoint under `dir`, or "" when there is none.
std::string find_latest_checkpoint(const std::string& dir);

// Restores model weights, optimizer state, RNG state and returns the trainer state. Every problem is a runtime
// error naming the file (truncated safetensors, edited or partial trainer_state.json, layout mismatch).
TrainerState load_checkpoint(const std::string& path, model::CausalLM& model, FlatAdamW& optimizer);
TrainerState read_trainer_state(const std::string& path);

}  // namespace dsopen::train
