#include "train/trainer.h"


#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>

#include "data/dataset.h"
#include "data/sft.h"
#include "model/info.h"
#include "model/lora.h"
#include "model/moe_balance.h"
#include "model/weights.h"
#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/data_parallel.h"
#include "train/optimizer.h"
#include "train/precision.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/metrics.h"
#include "utils/progress.h"

namespace dsopen::train {

namespace {

std::atomic<int> g_stop_signal{0};
extern "C" void on_stop_signal(int sig) { g_stop_signal.store(sig); }

// One interface over packed pretraining shards and SFT conversations.
class BatchSource {
public:
  virtual ~BatchSource() = default;
  virtual data::Batch next(data::DataCursor& cursor, int64_t micro_batch) = 0;
  virtual int64_t samples_per_rank() const = 0;  // per epoch
};

class ShardSource : public BatchSource {
public:
  explicit ShardSource(std::unique_ptr<data::TokenDataset> ds) : ds_(std::move(ds)) {}
  data::Batch next(data::DataCursor& c, int64_t b) override { return ds_->next(c, b); }
  int64_t samples_per_rank() const override { return ds_->samples_per_rank(); }

private:
  std::unique_ptr<data::TokenDataset> ds_;
};

class SftSource : public BatchSource {
public:
  explicit SftSource(std::unique_ptr<data::SftDataset> ds) : ds_(std::move(ds)) {}
  data::Batch next(data::DataCursor& c, int64_t b) override {
    const int64_t per_epoch = ds_->batches_per_epoch(b);
    if (per_epoch < 1)
      throw usage_error("train.micro_batch_size", "larger than the SFT samples each rank has per epoch");
    if (c.position / b >= per_epoch) c = {c.epoch + 1, 0};
    auto batch = ds_->batch(c.epoch, c.position / b, b);
    c.position += b;
    return batch;
  }
  int64_t samples_per_rank() const override { return ds_->samples_per_rank(); }

private:
  std::unique_ptr<data::SftDataset> ds_;
};

// LoRA: the base weights from model.pretrained (on every start: checkpoints hold only the adapter), then fresh
// adapters or those of lora.adapter, then the base frozen — all before the optimizer sees the parameters.
void setup_lora(model::CausalLM& m, const JobConfig& j) {
  const int64_t fresh = model::load_hf_state_dict(m, model::WeightFiles(j.model.pretrained), j.model.strict, true);
  if (fresh > 0)
    throw usage_error("model.use_mtp", j.model.pretrained + " has no MTP modules and a LoRA run does not train them",
                      "set model.use_mtp: false");
  const auto adapted = j.lora.adapter.empty() ? model::inject_lora(*m, j.lora.config) : model::load_adapter(*m, j.lora.adapter);
  const auto n = model::freeze_base(*m, j.lora.base_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32);
  spdlog::info("LoRA on {} projections{}: trainable parameters {} of {} ({:.3f}%); base from {} frozen ({})",
               adapted.size(), j.lora.adapter.empty() ? "" : " from " + j.lora.adapter, n.trainable, n.total,
               100.0 * n.trainable / n.total, j.model.pretrained, j.lora.base_dtype);
}

double directory_mb(const std::string& dir) {
  int64_t bytes = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir))
    if (e.is_regular_file()) bytes += static_cast<int64_t>(e.file_size());
  return bytes / 1e6;
}

}  // namespace

void install_stop_handlers() {
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
}

struct Trainer::State {
  JobConfig job;
  std::string resolved_config;
  torch::Device device{torch::kCPU};
  DistEnv dist;
  std::shared_ptr<ProcessGroup> group;
  std::unique_ptr<data::Tokenizer> tokenizer;
  model::CausalLM model{nullptr};
  std::unique_ptr<DataParallel> dp;
  std::unique_ptr<Precision> precision;
  std::unique_ptr<BatchSource> train_data, valid_data;
  TrainerState state;
  std::unique_ptr<MetricsWriter> metrics;
};

Trainer::Trainer(JobConfig job, std::string resolved_config) : s_(std::make_unique<State>()) {
  State& s = *s_;
  s.job = std::move(job);
  s.resolved_config = std::move(resolved_config);
  const JobConfig& j = s.job;
  s.dist = read_dist_env();
  // Ranks sharing a machine share its cores.
  env::configure_threads(j.run.threads > 0 ? j.run.threads
                                           : std::max(1, env::available_cpus() / s.dist.local_world_size));
  if (j.run.device == "cuda" && !torch::cuda::is_available())
    throw usage_error("run.device", "cuda requested but no CUDA device is available", "use auto or cpu");
  const bool cuda = j.run.device == "cuda" || (j.run.device == "auto" && torch::cuda::is_available());
  s.device = cuda ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(s.dist.local_rank)) : torch::Device(torch::kCPU);
  s.precision = std::make_unique<Precision>(j.train.precision, s.device);
  s.group = create_process_group(s.dist, s.device, {j.parallel.backend, std::chrono::seconds(j.parallel.timeout_s)});
  if (s.group->size() > 1)
    spdlog::info("rank {} of {} ({}, local rank {} of {}), backend {}, strategy {}", s.group->rank(), s.group->size(),
                 s.dist.source, s.dist.local_rank, s.dist.local_world_size, s.group->backend(), j.parallel.strategy);
  const int rank = s.group->rank(), world = s.group->size();

  // Data: tokenizer and shards are built on first use when the config says how — by rank 0 while the others
  // wait, then read by all.
  if (rank == 0) s.tokenizer = data::prepare_tokenizer(j.tokenizer);
  s.group->barrier();
  if (rank != 0) s.tokenizer = data::prepare_tokenizer(j.tokenizer);
  if (s.tokenizer->vocab_size() > j.model.vocab_size)
    throw usage_error("model.vocab_size", "the tokenizer has " + std::to_string(s.tokenizer->vocab_size()) +
                                              " tokens but the model only " + std::to_string(j.model.vocab_size),
                      "set model.vocab_size >= the tokenizer's vocabulary");
  if (rank == 0) data::prepare_shards(j.data, *s.tokenizer);
  s.group->barrier();
  const uint64_t seed = static_cast<uint64_t>(j.run.seed);
  if (j.data.format == "pretrain") {
    data::TokenDatasetOptions o;
    o.shards = j.data.train;
    o.seq_len = j.data.seq_len;
    o.seed = seed;
    o.rank = rank;
    o.world_size = world;
    o.valid_fraction = j.data.valid.empty() ? j.data.valid_fraction : 0.0;
    o.tokenizer_hash = s.tokenizer->hash();
    o.model_vocab_size = j.model.vocab_size;
    s.train_data = std::make_unique<ShardSource>(std::make_unique<data::TokenDataset>(o, data::Split::Train));
    if (!j.data.valid.empty()) {
      o.shards = j.data.valid;
      s.valid_data = std::make_unique<ShardSource>(std::make_unique<data::TokenDataset>(o, data::Split::All));
    } else if (j.data.valid_fraction > 0) {
      s.valid_data = std::make_unique<ShardSource>(std::make_unique<data::TokenDataset>(o, data::Split::Valid));
    }
  } else {
    auto load = [&](const std::vector<std::string>& files) {
      std::vector<data::Conversation> convs;
      for (const auto& f : files) {
        auto part = data::read_sft_jsonl(f);
        convs.insert(convs.end(), part.begin(), part.end());
      }
      return std::make_unique<data::SftDataset>(convs, *s.tokenizer, j.data.chat_template, j.data.seq_len,
                                                j.data.truncation == "drop" ? data::Truncation::Drop : data::Truncation::Right,
                                                j.data.pack, seed, rank, world);
    };
    s.train_data = std::make_unique<SftSource>(load(j.data.train));
    if (!j.data.valid.empty()) s.valid_data = std::make_unique<SftSource>(load(j.data.valid));
  }

  // Model and optimizer: the seed makes initialization reproducible; a resume overwrites both.
  torch::manual_seed(seed);
  s.model = model::CausalLM(j.model);
  if (j.lora.enabled) setup_lora(s.model, j);
  s.model->to(s.device);
  s.model->set_activation_checkpointing(j.train.activation_checkpointing);
  AdamWOptions ao;
  ao.beta1 = j.train.betas[0];
  ao.beta2 = j.train.betas[1];
  ao.eps = j.train.eps;
  ao.weight_decay = j.train.weight_decay;
  ao.decay_embeddings = j.train.decay_embeddings;
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (auto& p : s.model->named_parameters()) named.push_back({p.key(), p.value()});
  s.dp = std::make_unique<DataParallel>(named, ao,
                                        DataParallelOptions{j.parallel.strategy, j.parallel.bucket_mb,
                                                            j.parallel.offload_optimizer == "cpu"},
                                        s.group);

  std::string resume;
  if (j.checkpoint.resume == "auto") resume = find_latest_checkpoint(j.checkpoint.dir);
  else if (j.checkpoint.resume != "none") resume = j.checkpoint.resume;
  if (resume.empty() && !j.model.pretrained.empty() && !j.lora.enabled) {
    // Fine-tuning: start from the HF directory's weights (the optimizer buffers alias the parameters, so the
    // copy lands in them too).
    const int64_t fresh = model::load_hf_state_dict(s.model, model::WeightFiles(j.model.pretrained), j.model.strict, true);
    spdlog::info("loaded pretrained weights from {}", j.model.pretrained);
    if (fresh > 0) spdlog::warn("{} MTP tensors are not in {}; those modules start from their initialization", fresh, j.model.pretrained);
  }
  if (!resume.empty()) {
    s.state = load_checkpoint(resume, s.model, s.dp->optimizer(), s.group.get());
    s.precision->set_state(s.state.loss_scale, s.state.loss_scale_good_steps);
    spdlog::info("resumed from {} at step {}", resume, s.state.step);
  }
  const auto counts = model::count_parameters(j.model);
  spdlog::info("model {}: {:.2f}M parameters ({:.2f}M active), device {}, precision {}", j.model.model_type,
               counts.total / 1e6, counts.active / 1e6, s.device.str(), j.train.precision);
  s.dp->broadcast_parameters();  // every rank starts from rank 0's weights, whatever each loaded
  spdlog::info("optimizer state {:.1f} MB per rank (ZeRO formula {:.1f} MB), gradients {:.1f} MB (formula {:.1f} MB)",
               s.dp->state_bytes() / 1e6, s.dp->predicted_state_bytes() / 1e6, s.dp->grad_bytes() / 1e6,
               s.dp->predicted_grad_bytes() / 1e6);
  std::filesystem::create_directories(j.run.output_dir);
  if (rank == 0) s.metrics = std::make_unique<MetricsWriter>(j.run.output_dir + "/metrics.jsonl");
}

Trainer::~Trainer() = default;

model::CausalLM& Trainer::model() { return s_->model; }

TrainResult Trainer::run() {
  State& s = *s_;
  const JobConfig& j = s.job;
  const TrainOptions& t = j.train;
  const int64_t B = t.micro_batch_size, accum = t.grad_accum_steps, T = j.data.seq_len;
  ProcessGroup& group = *s.group;
  DataParallel& dp = *s.dp;
  const int world = group.size();
  const bool rank0 = group.rank() == 0;
  ScheduleOptions sched{t.schedule, t.lr, t.min_lr, t.warmup_steps, t.max_steps, t.decay_fraction};
  const double flops_per_token = model::training_flops_per_token(j.model, T);
  double peak = t.peak_tflops * 1e12;
  if (peak == 0 && s.device.is_cuda()) peak = 989e12;  // H100/H200 dense bf16
  const CheckpointFiles files{s.resolved_config, j.tokenizer.path};

  TrainResult result;
  int64_t bad_steps = 0;
  Progress progress("train", t.max_steps, "step", 1e18);  // the log lines below carry the plain-text progress
  auto window_start = std::chrono::steady_clock::now();
  int64_t window_tokens = 0, window_steps = 0;
  double window_comm_s = 0;
  s.model->train();
  model::MoEBalancer balancer(*s.model);

  auto evaluate = [&]() -> double {
    if (!s.valid_data) return -1;
    torch::NoGradGuard no_grad;
    s.model->eval();
    data::DataCursor c;
    double ce = 0, n = 0;
    // A small validation set split over many ranks may give each fewer samples than a micro-batch; evaluate
    // it in smaller batches (equal on every rank) rather than refuse.
    const int64_t eval_batch = std::min(B, s.valid_data->samples_per_rank());
    for (int64_t i = 0; i < t.eval_steps && eval_batch > 0; ++i) {
      auto b = s.valid_data->next(c, eval_batch);
      if (c.epoch > 0) break;  // one pass at most
      std::optional<compat::AutocastScope> ac;
      s.precision->autocast(ac);
      auto out = s.model->forward({b.input_ids.to(s.device), b.labels.to(s.device), nullptr,
                                   b.position_ids.defined() ? b.position_ids.to(s.device) : torch::Tensor(),
                                   b.segment_ids.defined() ? b.segment_ids.to(s.device) : torch::Tensor()});
      ce += out.ce_sum.item<double>();
      n += out.n_targets.item<double>();
    }
    s.model->train();
    // Each rank evaluated its own part of the validation data.
    ce = group.all_reduce_sum(ce);
    n = group.all_reduce_sum(n);
    return n > 0 ? ce / n : -1;
  };

  while (s.state.step < t.max_steps) {
    const double lr = lr_at(s.state.step, sched);
    // Fetch the whole global batch first: every loss term is normalised by the global count of its own targets
    // (model/loss.h), so the step does not depend on how the batch is split over micro-batches and ranks.
    data::DataCursor cursor = s.state.cursor;
    std::vector<data::Batch> micro;
    model::LossCounts counts;
    for (int64_t k = 0; k < accum; ++k) {
      micro.push_back(s.train_data->next(cursor, B));
      counts += model::count_loss_targets(j.model, micro.back().labels, micro.back().segment_ids);
    }
    if (world > 1) {
      auto all = torch::tensor(counts.to_vector(), torch::kFloat64).to(s.device);
      group.all_reduce_sum(all).wait();
      all = all.cpu();
      counts = model::LossCounts::from_vector(std::vector<double>(all.data_ptr<double>(), all.data_ptr<double>() + all.numel()));
    }
    const double targets = counts.targets;
    if (targets == 0) throw runtime_error("data", "a global batch has no target tokens", "check the SFT data and template");

    dp.zero_grad();
    balancer.reset();
    double ce_total = 0, aux_total = 0, mtp_total = 0, z_total = 0;
    for (size_t k = 0; k < micro.size(); ++k) {
      auto& b = micro[k];
      dp.begin_micro_step(k + 1 == micro.size());
      model::ForwardOutput out;
      {
        std::optional<compat::AutocastScope> ac;
        s.precision->autocast(ac);
        out = s.model->forward({b.input_ids.to(s.device), b.labels.to(s.device), nullptr,
                                b.position_ids.defined() ? b.position_ids.to(s.device) : torch::Tensor(),
                                b.segment_ids.defined() ? b.segment_ids.to(s.device) : torch::Tensor()});
      }
      // This micro-batch's share of the global loss: its sums over the global counts. Gradients are summed over
      // micro-batches and ranks, so the shares add up to the loss of the whole batch.
      const model::Loss loss = model::compose_loss(out.sums, counts, j.model);
      auto objective = s.precision->scaling() ? loss.total * s.precision->scale() : loss.total;
      objective.backward();
      dp.end_micro_step();
      ce_total += loss.ce.item<double>();
      aux_total += loss.aux.item<double>();
      mtp_total += loss.mtp.item<double>();
      z_total += loss.z.item<double>();
      balancer.add(out.expert_load);
    }
    if (world > 1) {
      // One all-reduce for the logged losses and the expert loads (every rank must update the routing biases alike).
      auto all = torch::cat({torch::tensor({ce_total, aux_total, mtp_total, z_total}, torch::kFloat64), balancer.packed()})
                     .to(s.device);
      group.all_reduce_sum(all).wait();
      all = all.cpu();
      ce_total = all[0].item<double>();
      aux_total = all[1].item<double>();
      mtp_total = all[2].item<double>();
      z_total = all[3].item<double>();
      balancer.unpack(all.narrow(0, 4, all.numel() - 4));
    }
    if (s.precision->scaling()) dp.scale_grads(1.0 / s.precision->scale());
    double grad_norm = dp.grad_norm();
    const double loss_value = ce_total;
    const bool finite = std::isfinite(grad_norm) && std::isfinite(loss_value);
    s.precision->update(finite);
    if (!finite) {
      ++bad_steps;
      spdlog::warn("step {}: non-finite loss or gradient (loss {}, grad norm {}); step skipped ({} in a row)",
                   s.state.step + 1, loss_value, grad_norm, bad_steps);
      if (bad_steps >= t.max_bad_steps && !s.precision->scaling())
        throw runtime_error("train", std::to_string(bad_steps) + " non-finite steps in a row at step " +
                                         std::to_string(s.state.step + 1),
                            "lower train.lr or raise train.grad_clip; the last checkpoint is intact");
      s.state.cursor = cursor;  // the batch is consumed either way, so a resume sees the same data
      continue;
    }
    bad_steps = 0;
    if (t.grad_clip > 0 && grad_norm > t.grad_clip) dp.scale_grads(t.grad_clip / (grad_norm + 1e-6));
    dp.step(lr);
    if (!j.lora.enabled) balancer.update_biases(j.model.bias_update_speed);  // LoRA: the routing is base state
    s.state.step += 1;
    s.state.cursor = cursor;
    // Tokens are the positions trained on (with a target): padding and masked prompt positions do not count.
    const auto step_tokens = static_cast<int64_t>(targets);
    s.state.tokens += step_tokens;
    s.state.loss_scale = s.precision->scale();
    s.state.loss_scale_good_steps = s.precision->good_steps();
    result.losses.push_back(loss_value);
    window_tokens += step_tokens;
    ++window_steps;
    window_comm_s += dp.take_comm_wait_seconds();
    if (s.state.step == 1 || s.state.step == t.max_steps)
      spdlog::info("memory rank {}: optimizer_state_bytes={} grad_bytes={} predicted_state_bytes={:.0f} "
                   "predicted_grad_bytes={:.0f} grad_buckets_in_flight_peak_bytes={} bucket_bytes={}",
                   group.rank(), dp.state_bytes(), dp.grad_bytes(), dp.predicted_state_bytes(),
                   dp.predicted_grad_bytes(), dp.grad_scratch_peak_bytes(), dp.max_bucket_bytes());

    const bool last = s.state.step == t.max_steps;
    const bool log_now = s.state.step % j.run.log_every == 0 || last || s.state.step == 1;
    if (log_now) {
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - window_start).count();
      const double tok_s = window_tokens / secs;
      const double step_s = secs / window_steps;
      std::string extra;
      nlohmann::json rec = {{"step", s.state.step}, {"loss", loss_value}, {"lr", lr}, {"grad_norm", grad_norm},
                            {"tokens_per_s", tok_s}, {"step_time_s", step_s}, {"tokens", s.state.tokens},
                            {"peak_rss_mb", env::peak_resident_mb()}};
      if (world > 1) {
        rec["world_size"] = world;
        rec["comm_wait_s"] = window_comm_s / window_steps;  // rank 0's time blocked on collectives per step
        extra += fmt::format(" | comm {:.0f}%", 100 * window_comm_s / secs);
      }
      rec["mfu"] = peak > 0 ? nlohmann::json(tok_s * flops_per_token / peak) : nlohmann::json(nullptr);
      if (!balancer.empty()) {
        const double imb = balancer.imbalance();
        rec["moe_aux_loss"] = aux_total;
        rec["moe_imbalance"] = imb;
        nlohmann::json per_block = nlohmann::json::object();
        const auto per = balancer.imbalance_per_block();
        for (size_t i = 0; i < per.size(); ++i) per_block[balancer.name(i)] = per[i];
        rec["moe_imbalance_per_block"] = per_block;
        extra += fmt::format(" | aux {:.4f} | imbalance {:.2f}", aux_total, imb);
      }
      if (j.model.z_loss_coef > 0) {
        rec["z_loss"] = z_total;
        extra += fmt::format(" | z {:.4f}", z_total);
      }
      if (!s.model->mtp_list.empty()) {
        rec["mtp_loss"] = mtp_total;
        extra += fmt::format(" | mtp {:.4f}", mtp_total);
      }
      if (rank0) s.metrics->write(rec);
      spdlog::info("step {}/{} | loss {:.4f} | lr {:.2e} | gnorm {:.3f} | {:.0f} tok/s{} | {:.2f} s/step{} | rss {:.0f} MB | ETA {}",
                   s.state.step, t.max_steps, loss_value, lr, grad_norm, tok_s,
                   peak > 0 ? fmt::format(" | mfu {:.1f}%", 100 * tok_s * flops_per_token / peak) : "", step_s, extra,
                   env::peak_resident_mb(), Progress::format_duration(step_s * (t.max_steps - s.state.step)));
      window_tokens = window_steps = 0;
      window_comm_s = 0;
    }
    if ((t.eval_every > 0 && s.state.step % t.eval_every == 0) || last) {
      const double ev = evaluate();
      if (ev >= 0) {
        result.eval_loss = ev;
        if (rank0) s.metrics->write({{"step", s.state.step}, {"eval_loss", ev}, {"eval_ppl", std::exp(ev)}});
        spdlog::info("eval step {} | loss {:.4f} | ppl {:.2f}", s.state.step, ev, std::exp(ev));
      }
    }
    // A signal may reach only some ranks; they all stop together after the same step.
    const bool stop = world > 1 ? group.all_reduce_sum(g_stop_signal.load() != 0 ? 1.0 : 0.0) > 0 : g_stop_signal.load() != 0;
    if ((j.checkpoint.every > 0 && s.state.step % j.checkpoint.every == 0) || last || stop) {
      result.last_checkpoint =
          save_checkpoint(j.checkpoint.dir, s.model, dp.optimizer(), s.state, files, j.checkpoint.keep_last, &group);
      spdlog::info("saved {} ({:.2f} MB)", result.last_checkpoint, directory_mb(result.last_checkpoint));
    }
    // The throughput window restarts after logging, evaluation and checkpointing so they do not count as steps.
    if (log_now) window_start = std::chrono::steady_clock::now();
    if (stop) {
      spdlog::info("stopping on signal {} after step {}", g_stop_signal.load(), s.state.step);
      result.interrupted = true;
      break;
    }
  }
  result.final_step = s.state.step;
  return result;
}

}  // namespace dsopen::train
