// Checkpoints (docs/CHECKPOINTS.md). A checkpoint directory step_00001000/ holds
//   model.safetensors     HF names (loads in transformers), config.json, tokenizer.model, dsopen.yaml
//                         (a LoRA run: adapter_config.json + adapter_model.safetensors instead, PEFT layout)
//   optimizer/rank_R.safetensors   rank R's slices of the flat AdamW moments, the unpadded ranges they cover, the
//                         parameter layout (metadata), the step and R's RNG state; unsharded state: rank 0 only
//   optimizer/experts_rank_R.safetensors   expert parallelism: the same for the routed experts rank R holds
//   (expert parallelism: model-0000k-of-0000E.safetensors + index, shard k holding expert-parallel rank k's experts)
//   trainer_state.json    step, tokens, data cursor (global), loss scale, world size — written last.
// With several ranks, rank 0 writes everything but the other ranks' optimizer files, with barriers between the
// phases, so the directory is complete before it is renamed. Any world size resumes any checkpoint: the moments
// are re-sliced by their unpadded ranges and the data cursor by the new world size.
// It is written to step_X.tmp/, fsynced and renamed, then `latest` is updated; `resume: auto` takes the newest
// directory that has a trainer_state.json, so a partial write (crash, SIGKILL) is never picked up.
#pragma once

#include <string>

#include "data/dataset.h"
#include "model/transformer.h"
#include "train/optimizer.h"
#include "train/process_group.h"
#include "train/sharded_units.h"

namespace dsopen::train {

struct TrainerState {
  int64_t step = 0;    // optimizer steps done
  int64_t tokens = 0;  // tokens consumed
  data::DataCursor cursor;  // this rank's cursor (saved as the global position: position * world_size)
  double loss_scale = 1.0;
  int64_t loss_scale_good_steps = 0;
  int64_t world_size = 1;
  std::string precision;  // what the run trained in (fp32 | bf16 | fp16); "" in checkpoints written before it was kept
};

struct CheckpointFiles {
  std::string resolved_config;  // YAML text saved as dsopen.yaml
  std::string tokenizer_path;   // copied as tokenizer.model (may be empty)
};

// Writes step_<step>/ under `dir` atomically and prunes all but the newest `keep_last`. Returns its path. Every
// rank of `group` (none: a single process) calls it.
// Under expert parallelism `expert_optimizer` is the routed experts' part (train/data_parallel.h, ExpertShards).
// Under zero3 `sharded` (and, with expert parallelism, `expert_sharded`) hold the parameters (the model's are
// gathered only while they run): rank 0 streams model.safetensors unit by unit as every rank takes part in each
// unit's all-gather, so no rank ever holds the whole model.
std::string save_checkpoint(const std::string& dir, model::CausalLM& model, const FlatAdamW& optimizer,
                            const TrainerState& state, const CheckpointFiles& files, int64_t keep_last,
                            ProcessGroup* group = nullptr, const FlatAdamW* expert_optimizer = nullptr,
                            ShardedUnits* sharded = nullptr, ShardedUnits* expert_sharded = nullptr);

// The newest complete checkpoint under `dir`, or "" when there is none: the one its `latest` file names when that
// is complete (a run that resumed from an earlier step), else the highest step (`highest_step`: always that).
std::string find_latest_checkpoint(const std::string& dir, bool highest_step = false);

// Restores model weights, optimizer state, RNG state and returns the trainer state. Every problem is a runtime
// error naming the file (truncated safetensors, edited or partial trainer_state.json, layout mismatch).
// The data cursor is converted to this run's world size (an error when the global position does not divide).
TrainerState load_checkpoint(const std::string& path, model::CausalLM& model, FlatAdamW& optimizer,
                             ProcessGroup* group = nullptr, FlatAdamW* expert_optimizer = nullptr);
// The same in two halves, for a trainer that builds its optimizer from the loaded weights (zero3 cuts its slices
// from them): the trainer state and model weights (or LoRA adapter), then the optimizer state and RNG.
TrainerState load_checkpoint_weights(const std::string& path, model::CausalLM& model, ProcessGroup* group = nullptr);
void load_optimizer_state_files(const std::string& path, model::CausalLM& model, FlatAdamW& optimizer,
                                ProcessGroup* group = nullptr, FlatAdamW* expert_optimizer = nullptr);
TrainerState read_trainer_state(const std::string& path);

}  // namespace dsopen::train
