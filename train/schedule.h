// Learning-rate schedules: linear warmup, then cosine, linear, constant or warmup-stable-decay (WSD, MiniCPM,
// Hu et al. 2024) to min_lr at the last step. Formulas in docs/CONFIG.md §5.7.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dsopen::train {

enum class Schedule { Cosine, Linear, Constant, Wsd };
const std::vector<std::pair<std::string, Schedule>>& schedule_names();  // "cosine", "linear", "constant", "wsd"

struct ScheduleOptions {
  Schedule kind = Schedule::Cosine;
  double lr = 3e-4, min_lr = 3e-5;
  int64_t warmup_steps = 0, max_steps = 1;
  double decay_fraction = 0.1;  // wsd: the final fraction of the steps that decays
};

// Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr, then the schedule
// from lr to min_lr at the last step.
double lr_at(int64_t step, const ScheduleOptions& s);

}  // namespace dsopen::train
