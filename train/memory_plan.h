// The memory plan of a training job, made from its config before anything is allocated: weights, gradients,
// AdamW moments and activations per rank (model/info.h plan_training), compared with what one rank can use
// (GPU memory on CUDA; on the CPU the host's available memory shared by the ranks of this machine). A job that
// cannot fit is refused with the plan and the nearest layouts that do fit.
#pragma once

#include <string>
#include <vector>

#include "model/info.h"
#include "train/options.h"

namespace dsopen::train {

struct JobMemoryPlan {
  model::TrainingPlan plan;
  int64_t world_size = 1;
  std::string layout;        // "1 rank, strategy none, fp32, micro-batch 8 x 256 tokens, no activation checkpointing"
  bool on_gpu = false;
  double device_budget = 0;  // bytes one rank may use for weights, gradients, moments, activations (0: unknown)
  double host_budget = 0;    // bytes for offloaded moments (CPU: the same memory as device_budget)
  std::string budget_source;
  bool fits() const;
};

// `local_world_size`: the ranks of this machine, which share its host memory.
JobMemoryPlan plan_job(const JobConfig& job, int64_t world_size, int64_t local_world_size);

// A few lines: the layout, each term in GiB, the total and the memory available.
std::string plan_text(const JobMemoryPlan& plan);

// Up to three changes of the config (each a --set list) with which the job fits, nearest first; empty when none.
std::vector<std::string> layouts_that_fit(const JobConfig& job, int64_t world_size, int64_t local_world_size);

// Throws a usage error (exit 2) when the plan does not fit, naming the total, the memory available and the
// layouts that fit; the plan itself is printed to stderr first.
void refuse_if_it_cannot_fit(const JobConfig& job, int64_t world_size, int64_t local_world_size);

}  // namespace dsopen::train
