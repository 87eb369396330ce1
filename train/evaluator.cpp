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
  // The first G = steps x micro_batch samples of the validation data (one pass at most), whatever the number of
  // ranks: rank r's k-th sample is sample k * N + r (data/batch_source.h), so rank r evaluates the first
  // ceil((G - r) / N) of its own. Every rank runs the same number of forward passes (zero3 gathers parameters in
  // each); one whose share is used up runs a masked batch, which adds nothing.
  const int64_t N = group_.size(), r = group_.rank();
  const int64_t total = std::min(steps_ * micro_batch_, source_.samples_per_rank() * N);
  const int64_t mine = total > r ? (total - r + N - 1) / N : 0;
  const int64_t most = (total + N - 1) / N;
  const int64_t passes = micro_batch_ > 0 ? (most + micro_batch_ - 1) / micro_batch_ : 0;
  data::DataCursor cursor;
  double ce = 0, n = 0;
  for (int64_t i = 0; i < passes; ++i) {
    const int64_t take = std::min(micro_batch_, mine - i * micro_batch_);
    data::Batch b;
    if (take > 0) {
      b = source_.next(cursor, take);
    } else {
      data::DataCursor first;
      b = source_.next(first, 1);
      b.labels.fill_(-100);
    }
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
