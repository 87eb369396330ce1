#include "train/options.h"

#include <filesystem>

#include "model/model_dir.h"
#include "utils/env.h"
#include "utils/errors.h"

namespace dsopen::train {

namespace {

void decode(config::Reader& r, RunOptions& o) {
  r.optional("name", o.name);
  r.optional("output_dir", o.output_dir);
  r.optional("seed", o.seed, config::at_least(0));
  r.optional("log_every", o.log_every, config::at_least(1));
  r.optional("tensorboard", o.tensorboard);
  r.choice("log_level", o.log_level, {"trace", "debug", "info", "warn", "error", "off"});
  r.optional("threads", o.threads, config::in_range_i(0, env::kMaxThreads));
  r.choice("device", o.device, {"auto", "cpu", "cuda"});
  if (o.device == "cuda" && !torch::cuda::is_available())
    r.error("device", "cuda, but LibTorch sees no CUDA device here; set auto or cpu");
  r.finish();
}

void decode(config::Reader& r, TrainOptions& o) {
  r.optional("max_steps", o.max_steps, config::at_least(1));
  r.optional("micro_batch_size", o.micro_batch_size, config::at_least(1));
  r.optional("grad_accum_steps", o.grad_accum_steps, config::in_range_i(1, 65536));
  r.optional("lr", o.lr, config::greater_than(0));
  r.optional("min_lr", o.min_lr, config::at_least_f(0));
  r.optional("warmup_steps", o.warmup_steps, config::at_least(0));
  r.choice("schedule", o.schedule, schedule_names());
  r.optional("decay_fraction", o.decay_fraction, config::in_range(0.0, 1.0));
  r.optional("milestones", o.milestones);
  r.optional("milestone_factors", o.milestone_factors);
  for (size_t i = 0; i < o.milestones.size(); ++i)
    if (!(o.milestones[i] > 0 && o.milestones[i] < 1) || (i > 0 && o.milestones[i] <= o.milestones[i - 1])) {
      r.error("milestones", "must be increasing fractions of max_steps in (0, 1)");
      break;
    }
  if (o.milestone_factors.size() != o.milestones.size())
    r.error("milestone_factors", "needs one factor per milestone (" + std::to_string(o.milestones.size()) + ")");
  for (double f : o.milestone_factors)
    if (!(f > 0)) r.error("milestone_factors", "each factor must be > 0");
  r.optional("weight_decay", o.weight_decay, config::at_least_f(0));
  r.optional("decay_embeddings", o.decay_embeddings);
  r.optional("betas", o.betas, 2);
  for (double b : o.betas)
    if (b < 0 || b >= 1) r.error("betas", "each beta must be in [0, 1)");
  r.optional("eps", o.eps, config::greater_than(0));
  r.optional("grad_clip", o.grad_clip, config::at_least_f(0));
  r.choice("precision", o.precision, precision_names());
  r.optional("fused_ops", o.fused_ops);
  r.optional("activation_checkpointing", o.activation_checkpointing);
  r.optional("eval_every", o.eval_every, config::at_least(0));
  r.optional("eval_steps", o.eval_steps, config::at_least(1));
  r.optional("max_bad_steps", o.max_bad_steps, config::at_least(1));
  r.optional("peak_tflops", o.peak_tflops, config::at_least_f(0));
  if (o.min_lr > o.lr) r.error("min_lr", "must not exceed lr");
  r.finish();
}

void decode(config::Reader& r, ParallelOptions& o) {
  r.choice("strategy", o.strategy, strategy_names());
  r.choice("backend", o.backend, {"auto", "nccl", "gloo"});
  r.optional("bucket_mb", o.bucket_mb, config::greater_than(0));
  r.optional("timeout_s", o.timeout_s, config::at_least(1));
  r.choice<bool>("offload_optimizer", o.offload_optimizer, {{"none", false}, {"cpu", true}});
  r.optional("expert_parallel", o.expert_parallel, config::at_least(1));
  r.choice("zero3_build", o.zero3_build, {"auto", "in_turns", "together"});
  r.finish();
}

void decode(config::Reader& r, LoraOptions& o) {
  r.optional("enabled", o.enabled);
  r.optional("adapter", o.adapter);
  r.choice<torch::Dtype>("base_dtype", o.base_dtype, {{"fp32", torch::kFloat32}, {"bf16", torch::kBFloat16}});
  model::decode_lora_keys(r, o.config);
  r.finish();
}

void decode(config::Reader& r, CheckpointOptions& o) {
  r.optional("dir", o.dir);
  r.optional("every", o.every, config::at_least(0));
  r.optional("keep_last", o.keep_last, config::at_least(1));
  r.optional("resume", o.resume);
  r.finish();
}

}  // namespace

JobConfig decode_job(const config::Document& doc) {
  config::ErrorList errors;
  config::Reader root(doc, doc.root(), "", errors);
  JobConfig job;
  for (const char* required : {"model", "tokenizer", "data"}) {
    if (!root.has(required)) root.error(required, "missing required section");
    else if (doc.root()[required].IsNull())  // `model:` alone would silently build every default
      root.error(required, "empty section; give its keys (see docs/CONFIG.md)");
  }
  auto run = root.child("run");
  decode(run, job.run);
  if (root.has("model")) {
    auto m = root.child("model");
    bool base_missing = false;
    if (m.has("pretrained")) {
      std::string dir;
      m.optional("pretrained", dir);
      std::error_code ec;
      if (!dir.empty() && !std::filesystem::exists(dir, ec)) {
        // Typically a fine-tune run before the run that writes its base (configs/lora.yaml before configs/tiny.yaml).
        m.error("pretrained", dir + " does not exist yet; run the training that writes it first, or point it at a "
                                    "model directory");
        base_missing = true;
      } else {
        // (config.json is what is missing when the directory is: the error names the file to look for)
        job.model = model::ModelConfig::from_hf_json_file(
            (std::filesystem::path(model::resolve_latest(dir)) / model::kConfigFile).string());
      }
    }
    if (base_missing) errors.throw_if_any();
    model::decode(m, job.model, true);
    if (!job.model.pretrained.empty()) job.model.pretrained = model::resolve_latest(job.model.pretrained);
  }
  if (root.has("tokenizer")) {
    auto t = root.child("tokenizer");
    data::decode(t, job.tokenizer);
  }
  if (root.has("data")) {
    auto d = root.child("data");
    data::decode(d, job.data);
    // Known before any work: rows longer than the model's positions would fail at the first forward pass.
    if (root.has("model") && job.data.seq_len > job.model.context_length())
      d.error("seq_len", std::to_string(job.data.seq_len) + " exceeds model.max_position_embeddings (" +
                             std::to_string(job.model.context_length()) +
                             (job.model.context_length() != job.model.max_position_embeddings
                                  ? " with dynamic rope scaling" : "") +
                             "); lower it or raise the model's");
  }
  auto tr = root.child("train");
  decode(tr, job.train);
  auto p = root.child("parallel");
  decode(p, job.parallel);
  auto c = root.child("checkpoint");
  decode(c, job.checkpoint);
  auto l = root.child("lora");
  decode(l, job.lora);
  if (job.lora.enabled && root.has("model") && job.model.pretrained.empty())
    l.error("enabled", "LoRA adapts a pretrained model: set model.pretrained to its directory");
  if (job.parallel.expert_parallel > 1 && root.has("model")) {
    if (job.model.n_routed_experts == 0)
      p.error("expert_parallel", std::to_string(job.parallel.expert_parallel) +
                                     " needs a MoE model, but model " + job.model.model_type + " has no routed experts; set it to 1");
    else if (job.model.n_routed_experts % job.parallel.expert_parallel != 0)
      p.error("expert_parallel", std::to_string(job.model.n_routed_experts) + " routed experts do not divide among " +
                                     std::to_string(job.parallel.expert_parallel) + " expert-parallel ranks; choose a divisor of " +
                                     std::to_string(job.model.n_routed_experts));
  }
  root.finish();
  errors.throw_if_any();
  job.model.validate("model");
  if (job.checkpoint.dir.empty()) job.checkpoint.dir = job.run.output_dir + "/checkpoints";
  // Found at the first save otherwise, after training has run.
  for (const auto& [key, dir] : {std::pair<std::string, std::string>{"checkpoint.dir", job.checkpoint.dir},
                                 {"run.output_dir", job.run.output_dir}}) {
    std::error_code ec;
    if (std::filesystem::exists(dir, ec) && !std::filesystem::is_directory(dir, ec))
      throw usage_error(key, dir + " exists and is not a directory", "give a directory (it is created when missing)");
  }
  // The base of a fine-tune must not sit among this run's checkpoints: their `latest` pointer and pruning
  // (checkpoint.keep_last) would replace or delete it.
  if (!job.model.pretrained.empty() && env::path_within(job.model.pretrained, job.checkpoint.dir))
    throw usage_error("checkpoint.dir", job.checkpoint.dir + " holds model.pretrained " + job.model.pretrained +
                                            ", which this run's checkpoints and their pruning would replace",
                      "give this run its own run.output_dir (or checkpoint.dir)");
  return job;
}

bool runs_on_cuda(const RunOptions& run) {
  return run.device == "cuda" || (run.device == "auto" && torch::cuda::is_available());
}

}  // namespace dsopen::train
