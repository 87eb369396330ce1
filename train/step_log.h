// What a run reports as it goes (docs/CONFIG.md §5.8): tokens/s and seconds per step over the steps since the
// last record, MFU against the device's peak FLOP/s, the one-line log, the metrics.jsonl record (rank 0), and the
// memory of the data-parallel buffers at the first and last step.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <memory>
#include <string>

#include "model/config.h"
#include "model/moe_balance.h"
#include "train/data_parallel.h"
#include "train/expert_parallel.h"
#include "train/step.h"
#include "utils/metrics.h"
#include "utils/tensorboard.h"

namespace dsopen::train {

// Peak dense bf16 FLOP/s of `device` for MFU: `configured_tflops` when > 0; on CUDA the datasheet figure of the
// GPU model (H100/H200/H800 989 TFLOP/s, A100/A800 312, L40S 362, L4 121, ...); 0 (no MFU) when unknown.
double peak_flops(torch::Device device, double configured_tflops);

class StepLogger {
public:
  // `metrics_path` empty: no metrics.jsonl (ranks other than 0); `tensorboard_dir` empty: no event files. Every
  // metrics.jsonl number is also a TensorBoard scalar (train/<key>, eval/loss, eval/ppl, moe/imbalance/<block>), and
  // each MoE block's tokens per expert a histogram (moe/expert_load/<block>) and a line of expert_load.jsonl (next to
  // metrics.jsonl: {"step": S, "expert_load": {block: [tokens per expert]}}).
  // `resumed_step`: the step a resumed run starts after (-1: a fresh run); see MetricsWriter.
  StepLogger(const model::ModelConfig& model, int64_t seq_len, int64_t max_steps, int64_t log_every,
             double peak_flops, const std::string& metrics_path, const std::string& tensorboard_dir = "",
             int64_t resumed_step = -1);
  ~StepLogger();
  // The run's resolved config, as text in TensorBoard.
  void config_text(const std::string& yaml);
  // Expert parallelism: each record also gets the token copies each rank's experts received per step
  // (ep_tokens_per_rank) and the share of the step time spent in all-to-alls (all_to_all_share, mean over ranks);
  // every rank of `world` then takes part in one all-reduce per record.
  void track_expert_traffic(GroupExchange* exchange, ProcessGroup* world) { exchange_ = exchange, world_ = world; }

  // Counts a finished step into the throughput window; logs and records it when it is due. Returns whether it did.
  bool step_done(int64_t step, double lr, const StepStats& stats, int64_t tokens, DataParallel& dp,
                 const model::MoEBalancer& balancer, bool mtp);
  void eval_done(int64_t step, double eval_loss);
  // Starts a new throughput window (after logging, evaluation and checkpointing, which are not steps).
  void restart_window() { window_start_ = std::chrono::steady_clock::now(); }

private:
  nlohmann::json record(int64_t step, double lr, const StepStats& stats, int64_t tokens, DataParallel& dp,
                        const model::MoEBalancer& balancer, bool mtp, std::string& extra) const;
  void record_expert_traffic(nlohmann::json& rec, std::string& extra);

  double flops_per_token_, peak_;
  int64_t max_steps_, log_every_;
  std::unique_ptr<MetricsWriter> metrics_;
  std::unique_ptr<MetricsWriter> expert_load_;  // expert_load.jsonl next to metrics.jsonl, MoE models only
  std::unique_ptr<tensorboard::EventWriter> tensorboard_;
  std::chrono::steady_clock::time_point window_start_ = std::chrono::steady_clock::now();
  int64_t window_tokens_ = 0, window_steps_ = 0;
  double window_comm_s_ = 0;
  GroupExchange* exchange_ = nullptr;
  ProcessGroup* world_ = nullptr;
  double window_a2a_s_ = 0, window_a2a_rows_ = 0;
  // The ETA averages from the end of the first step of this process to now (evaluation and checkpoints included,
  // as they recur): a window of a few steps swings with every checkpoint and evaluation.
  std::chrono::steady_clock::time_point run_start_;
  int64_t run_start_step_ = -1;
  bool first_step_ = true;  // the first step of this process (a resumed run's too): memory lines are logged then
};

}  // namespace dsopen::train
