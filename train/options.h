// The run configuration of dsopen-train: the `run:`, `train:`, `parallel:`, `checkpoint:` and `lora:` sections (owned
// here) plus the model, tokenizer and data sections decoded by their own layers. One call decodes a whole
// Document and reports every error of it together.
#pragma once

#include <string>
#include <vector>

#include "data/options.h"
#include "model/config.h"
#include "model/lora.h"
#include "train/data_parallel.h"
#include "train/precision.h"
#include "train/schedule.h"
#include "utils/config.h"

namespace dsopen::train {

struct RunOptions {
  std::string name = "run";
  std::string output_dir = "runs/run";
  int64_t seed = 1234;
  int64_t log_every = 10;
  bool tensorboard = true;  // event files under <output_dir>/tb/ (rank 0)
  std::string log_level = "info";
  int threads = 0;               // CPU intra-op threads; 0: all available
  std::string device = "auto";   // auto | cpu | cuda
};

struct TrainOptions {
  int64_t max_steps = 100;
  int64_t micro_batch_size = 8;
  int64_t grad_accum_steps = 1;
  double lr = 3e-4, min_lr = 3e-5;
  int64_t warmup_steps = 0;
  Schedule schedule = Schedule::Cosine;
  double decay_fraction = 0.1;      // wsd: the final fraction of steps that decays
  std::vector<double> milestones{0.8, 0.9};          // multistep: fractions of max_steps ...
  std::vector<double> milestone_factors{0.316, 0.1};  // ... from which lr is multiplied by these
  double weight_decay = 0.1;
  bool decay_embeddings = false;
  std::vector<double> betas{0.9, 0.95};
  double eps = 1e-8;
  double grad_clip = 1.0;  // 0: off
  PrecisionMode precision = PrecisionMode::Fp32;  // auto: measured per machine (shipped configs say auto)
  bool fused_ops = true;  // model/fused_ops.h kernels; false: the unfused ATen compositions (debugging)
  bool activation_checkpointing = false;
  int64_t eval_every = 0;  // 0: only at the end
  int64_t eval_steps = 10;
  int64_t max_bad_steps = 5;  // consecutive non-finite steps before giving up
  double peak_tflops = 0;     // for MFU; 0: the device's bf16 peak on CUDA, measured-free default on CPU
};

struct ParallelOptions {
  Strategy strategy = Strategy::None;
  std::string backend = "auto";   // auto | nccl | gloo
  double bucket_mb = 25;
  int64_t timeout_s = 300;
  bool offload_optimizer = false;  // "cpu": moments and the AdamW step in host memory (ZeRO-Offload)
  // Expert parallelism (model/expert_parallel.h): the world splits into world/E data-parallel groups of E ranks;
  // each of those E ranks holds n_routed_experts/E routed experts of every MoE block. 1: every rank holds all.
  int64_t expert_parallel = 1;
  // zero3 builds (and loads) the whole model on the host before cutting each rank's slices. "auto": the ranks of a
  // machine take turns when the host cannot hold a copy for each at once; "in_turns" always; "together" never.
  std::string zero3_build = "auto";
};

// LoRA fine-tuning: the base (model.pretrained) is frozen, only the adapters train, checkpoints hold the adapter.
struct LoraOptions {
  bool enabled = false;
  model::LoraConfig config;          // r, alpha, dropout, target_modules, ... (model/lora.h)
  std::string adapter;               // start from this adapter directory (PEFT layout) instead of fresh adapters
  torch::Dtype base_dtype = torch::kFloat32;  // "fp32" | "bf16": storage of the frozen projection weights
};

struct CheckpointOptions {
  std::string dir;  // default: <output_dir>/checkpoints
  int64_t every = 0;  // 0: only at the end
  int64_t keep_last = 3;
  std::string resume = "auto";  // auto | none | PATH
};

struct JobConfig {
  RunOptions run;
  model::ModelConfig model;
  data::TokenizerOptions tokenizer;
  data::DataOptions data;
  TrainOptions train;
  ParallelOptions parallel;
  CheckpointOptions checkpoint;
  LoraOptions lora;
};

// Whether a run with these options trains on CUDA (run.device cuda, or auto with a CUDA device present).
bool runs_on_cuda(const RunOptions& run);

// Decodes and validates every section; throws one usage error listing all problems with file:line.
JobConfig decode_job(const config::Document& doc);

}  // namespace dsopen::train
