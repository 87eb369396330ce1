// The training loop of dsopen-train: builds a run (process group, tokenizer and data, model, optimizer, resume) and
// repeats step -> log -> evaluate -> checkpoint until max_steps or a signal. What each of those does lives in its
// own file (train/step.h, step_log.h, evaluator.h, checkpoint.h; data/batch_source.h); this one only orders them.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "model/transformer.h"
#include "train/options.h"

namespace dsopen::train {

struct TrainResult {
  std::vector<double> losses;  // global-batch loss of every optimizer step run by this call
  int64_t final_step = 0;
  std::string last_checkpoint;
  bool interrupted = false;  // stopped by SIGINT/SIGTERM (after saving)
  double eval_loss = -1;     // last evaluation, -1 when none ran
};

// Installs SIGINT/SIGTERM handlers: inside the training loop the first signal makes the Trainer finish its step,
// save a checkpoint and stop; outside it (setup: tokenizer, shards, model, weights) and on a second signal the
// process exits at once with 128 + the signal number.
void install_stop_handlers();

class Trainer {
public:
  // `resolved_config` is saved into every checkpoint as dsopen.yaml.
  Trainer(JobConfig job, std::string resolved_config);
  ~Trainer();
  TrainResult run();
  // The model being trained: its weights live in the optimizer's buffers; under zero3 they are whole only inside
  // its forward and backward passes (between them the parameters view empty storage).
  model::CausalLM& model();

private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace dsopen::train
