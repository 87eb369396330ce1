#include "train/evaluator.h"

#include <optional>

#include "train/step.h"

namespace dsopen::train {

Evaluator::Evaluator(model::CausalLM model, data::BatchSource& source, const Precision& precision, ProcessGroup& group,
                     torch::Device device, int64_t micro_batch, int64_t steps)
    : model_(std::move(model)), source_(source), precision_(precision), group_(group), device_(device),
      micro_batch_(micro_batch), steps_(steps) {}

double Evaluator::run() {
  torch::NoGradGuard no_grad;
  model_->eval();
  data::DataCursor cursor;
  double ce = 0, n = 0;
  // A small validation set split over many ranks may give each fewer samples than a micro-batch; evaluate it in
  // smaller batches (equal on every rank) rather than refuse.
  const int64_t batch = std::min(micro_batch_, source_.samples_per_rank());
  for (int64_t i = 0; i < steps_ && batch > 0; ++i) {
    auto b = source_.next(cursor, batch);
    if (cursor.epoch > 0) break;  // one pass at most
    std::optional<compat::AutocastScope> autocast;
    precision_.autocast(autocast);
    auto out = model_->forward(forward_input(b, device_));
    ce += out.ce_sum.item<double>();
    n += out.n_targets.item<double>();
  }
  model_->train();
  ce = group_.all_reduce_sum(ce);
  n = group_.all_reduce_sum(n);
  return n > 0 ? ce / n : -1;
}

}  // namespace dsopen::train
