#include "train/schedule.h"

#include <algorithm>
#include <cmath>

namespace dsopen::train {

const std::vector<std::pair<std::string, Schedule>>& schedule_names() {
  static const std::vector<std::pair<std::string, Schedule>> names = {
      {"cosine", Schedule::Cosine}, {"linear", Schedule::Linear}, {"constant", Schedule::Constant}, {"wsd", Schedule::Wsd},
      {"multistep", Schedule::MultiStep}};
  return names;
}

double lr_at(int64_t step, const ScheduleOptions& s) {
  if (step < s.warmup_steps) return s.lr * static_cast<double>(step + 1) / static_cast<double>(s.warmup_steps);
  const double span = std::max<int64_t>(1, s.max_steps - 1 - s.warmup_steps);
  const double t = std::min(1.0, static_cast<double>(step - s.warmup_steps) / span);  // 0 -> 1 after warmup
  switch (s.kind) {
    case Schedule::Constant:
      return s.lr;
    case Schedule::Linear:
      return s.lr + (s.min_lr - s.lr) * t;
    case Schedule::Cosine:
      return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + std::cos(M_PI * t));
    case Schedule::MultiStep: {
      double lr = s.lr;
      for (size_t i = 0; i < s.milestones.size() && i < s.milestone_factors.size(); ++i)
        if (static_cast<double>(step) >= s.milestones[i] * static_cast<double>(s.max_steps)) lr = s.lr * s.milestone_factors[i];
      return lr;
    }
    case Schedule::Wsd:
      break;
  }
  // wsd: hold lr, then decay linearly over the last decay_fraction of all steps.
  const double decay_start = (1.0 - s.decay_fraction) * static_cast<double>(s.max_steps - 1);
  if (step <= decay_start) return s.lr;
  const double u = (step - decay_start) / std::max(1e-9, static_cast<double>(s.max_steps - 1) - decay_start);
  return s.lr + (s.min_lr - s.lr) * std::min(1.0, u);
}

}  // namespace dsopen::train
