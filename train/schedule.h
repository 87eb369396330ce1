// Learning-rate schedules: linear warmup, then cosine, linear, constant or warmup-stable-decay (WSD, MiniCPM,
// Hu et al. 2024) to min_lr at the last step, or multi-step (DeepSeek-LLM §2.3, DeepSeek-V2 §3.1.2: lr times
// factors from fractions of the run on). Formulas in docs/CONFIG.md §5.7.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dsopen::train {

enum class Schedule { Cosine, Linear, Constant, Wsd, MultiStep };
// "cosine", "linear", "constant", "wsd", "multistep"
const std::vector<std::pair<std::string, Schedule>>& schedule_names();

struct ScheduleOptions {
  Schedule kind = Schedule::Cosine;
  double lr = 3e-4, min_lr = 3e-5;
  int64_t warmup_steps = 0, max_steps = 1;
  double decay_fraction = 0.1;  // wsd: the final fraction of the steps that decays
  // multistep: from step milestones[i] * max_steps on, lr * milestone_factors[i] (DeepSeek-LLM: 0.8 -> 0.316,
  // 0.9 -> 0.1).
  std::vector<double> milestones{0.8, 0.9};
  std::vector<double> milestone_factors{0.316, 0.1};
};

// Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr, then the schedule
// from lr to min_lr at the last step.
double lr_at(int64_t step, const ScheduleOptions& s);

}  // namespace dsopen::train
