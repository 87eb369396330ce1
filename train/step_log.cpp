#include "train/step_log.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>

#include "model/info.h"
#include "utils/env.h"
#include "utils/progress.h"

#ifdef DSOPEN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace dsopen::train {

double peak_flops(torch::Device device, double configured_tflops) {
  if (configured_tflops > 0) return configured_tflops * 1e12;
#ifdef DSOPEN_WITH_CUDA
  if (device.is_cuda()) {
    const std::string name = at::cuda::getDeviceProperties(device.index())->name;
    // Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity).
    static const std::vector<std::pair<std::string, double>> peaks = {
        {"H100", 989e12}, {"H200", 989e12}, {"H800", 989e12}, {"H20", 148e12}, {"A100", 312e12},
        {"A800", 312e12}, {"L40S", 362e12}, {"L40", 181e12},  {"L4", 121e12},  {"A10", 125e12}};
    for (const auto& [model, flops] : peaks)
      if (name.find(model) != std::string::npos) return flops;
    spdlog::warn("no bf16 peak known for {}: MFU is not reported (set train.peak_tflops)", name);
  }
#else
  (void)device;
#endif
  return 0;
}

StepLogger::StepLogger(const model::ModelConfig& model, int64_t seq_len, int64_t max_steps, int64_t log_every,
                       double peak, const std::string& metrics_path, const std::string& tensorboard_dir,
                       int64_t resumed_step)
    : flops_per_token_(model::training_flops_per_token(model, seq_len)), peak_(peak), max_steps_(max_steps),
      log_every_(log_every) {
  if (!metrics_path.empty()) {
    metrics_ = std::make_unique<MetricsWriter>(metrics_path, resumed_step);
    if (model.n_routed_experts > 0)
      expert_load_ = std::make_unique<MetricsWriter>(
          (std::filesystem::path(metrics_path).parent_path() / "expert_load.jsonl").string(), resumed_step);
  }
  if (!tensorboard_dir.empty()) tensorboard_ = std::make_unique<tensorboard::EventWriter>(tensorboard_dir);
}

StepLogger::~StepLogger() = default;

void StepLogger::config_text(const std::string& yaml) {
  if (tensorboard_) tensorboard_->add_text("config", 0, "```yaml\n" + yaml + "```");
}

nlohmann::json StepLogger::record(int64_t step, double lr, const StepStats& st, int64_t tokens, DataParallel& dp,
                                  const model::MoEBalancer& balancer, bool mtp, std::string& extra) const {
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - window_start_).count();
  const double tok_s = window_tokens_ / secs;
  nlohmann::json rec = {{"step", step}, {"loss", st.loss}, {"lr", lr}, {"grad_norm", st.grad_norm},
                        {"tokens_per_s", tok_s}, {"step_time_s", secs / window_steps_}, {"tokens", tokens},
                        {"peak_rss_mb", env::peak_resident_mb()}};
  const int world = dp.group().size();
  if (world > 1) {
    rec["world_size"] = world;
    rec["comm_wait_s"] = window_comm_s_ / window_steps_;  // rank 0's time blocked on collectives per step
    extra += fmt::format(" | comm {:.0f}%", 100 * window_comm_s_ / secs);
  }
  // The global batch's tokens over every rank's peak: a device's share of the work against its own peak.
  rec["mfu"] = peak_ > 0 ? nlohmann::json(tok_s * flops_per_token_ / (peak_ * world)) : nlohmann::json(nullptr);
  if (!balancer.empty()) {
    rec["moe_aux_loss"] = st.aux_loss;
    rec["moe_imbalance"] = balancer.imbalance();
    nlohmann::json per_block = nlohmann::json::object();
    const auto per = balancer.imbalance_per_block();
    for (size_t i = 0; i < per.size(); ++i) per_block[balancer.name(i)] = per[i];
    rec["moe_imbalance_per_block"] = per_block;
    extra += fmt::format(" | aux {:.4f} | imbalance {:.2f}", st.aux_loss, balancer.imbalance());
  }
  if (st.moe_routed > 0) {  // model.capacity_factor: what the capacity dropped
    rec["moe_dropped_fraction"] = st.moe_dropped / st.moe_routed;
    extra += fmt::format(" | dropped {:.1f}%", 100 * st.moe_dropped / st.moe_routed);
  }
  if (st.z_loss != 0) {
    rec["z_loss"] = st.z_loss;
    extra += fmt::format(" | z {:.4f}", st.z_loss);
  }
  if (mtp) {
    rec["mtp_loss"] = st.mtp_loss;
    extra += fmt::format(" | mtp {:.4f}", st.mtp_loss);
  }
  return rec;
}

bool StepLogger::step_done(int64_t step, double lr, const StepStats& st, int64_t tokens, DataParallel& dp,
                           const model::MoEBalancer& balancer, bool mtp) {
  window_tokens_ += static_cast<int64_t>(st.targets);
  ++window_steps_;
  const auto now = std::chrono::steady_clock::now();
  if (run_start_step_ < 0) run_start_step_ = step, run_start_ = now;
  window_comm_s_ += dp.take_comm_wait_seconds();
  if (exchange_) {
    const auto t = exchange_->take_totals();
    window_a2a_s_ += t.seconds;
    window_a2a_rows_ += static_cast<double>(t.rows_received);
  }
  if ((first_step_ || step == max_steps_) && dp.experts())
    spdlog::debug("memory rank {}: routed experts expert_param_bytes={} expert_state_bytes={} expert_grad_bytes={}",
                  dp.group().rank(), dp.experts()->optimizer().num_params() * 4, dp.experts()->state_bytes(),
                  dp.experts()->grad_bytes());
  if (first_step_ || step == max_steps_)
    spdlog::debug("memory rank {}: optimizer_state_bytes={} grad_bytes={} predicted_state_bytes={:.0f} "
                 "predicted_grad_bytes={:.0f} grad_buckets_in_flight_peak_bytes={} bucket_bytes={} param_bytes={} "
                 "gathered_param_peak_bytes={}",
                 dp.group().rank(), dp.state_bytes(), dp.grad_bytes(), dp.predicted_state_bytes(),
                 dp.predicted_grad_bytes(), dp.grad_scratch_peak_bytes(), dp.max_bucket_bytes(), dp.param_bytes(),
                 dp.gathered_param_peak_bytes());
  if (first_step_ && dp.strategy() == Strategy::Zero3)
    spdlog::info("zero3 rank {}: parameter slices {:.2f} MB, gathered parameters peak {:.2f} MB (largest unit {:.2f} MB), "
                 "optimizer state {:.2f} MB{}, gradient slices {:.2f} MB + peak {:.2f} MB in reduce-scatters",
                 dp.group().rank(), dp.param_bytes() / 1e6, dp.gathered_param_peak_bytes() / 1e6,
                 dp.max_bucket_bytes() / 1e6, dp.state_bytes() / 1e6,
                 dp.optimizer().sharding().offload ? " (host memory)" : "",
                 (dp.grad_bytes() - dp.grad_scratch_peak_bytes()) / 1e6, dp.grad_scratch_peak_bytes() / 1e6);
  first_step_ = false;
  if (step % log_every_ != 0 && step != max_steps_ && step != 1) return false;
  std::string extra;
  nlohmann::json rec = record(step, lr, st, tokens, dp, balancer, mtp, extra);
  if (exchange_) record_expert_traffic(rec, extra);
  if (metrics_) metrics_->write(rec);
  if (expert_load_ && !balancer.empty()) {
    // Tokens routed to each expert of each MoE block in this step: dsopen-plot's layer x expert map.
    nlohmann::json loads = nlohmann::json::object();
    for (size_t b = 0; b < balancer.size(); ++b) {
      const torch::Tensor load = balancer.load(b).to(torch::kFloat64).contiguous();
      const double* p = load.data_ptr<double>();
      loads[balancer.name(b)] = std::vector<double>(p, p + load.numel());
    }
    expert_load_->write({{"step", step}, {"expert_load", loads}});
  }
  if (tensorboard_) {
    for (const auto& [key, value] : rec.items()) {
      if (key == "step") continue;
      if (value.is_number()) tensorboard_->add_scalar("train/" + key, step, value.get<double>());
      if (value.is_object())  // per MoE block
        for (const auto& [block, v] : value.items())
          if (v.is_number()) tensorboard_->add_scalar("moe/imbalance/" + block, step, v.get<double>());
    }
    for (size_t b = 0; b < balancer.size(); ++b) {
      const torch::Tensor load = balancer.load(b).to(torch::kFloat64).contiguous();
      const double* p = load.data_ptr<double>();
      tensorboard_->add_histogram("moe/expert_load/" + balancer.name(b), step, std::vector<double>(p, p + load.numel()));
    }
  }
  const double tok_s = rec["tokens_per_s"].get<double>(), step_s = rec["step_time_s"].get<double>();
  const double run_step_s = step > run_start_step_
                                ? std::chrono::duration<double>(now - run_start_).count() / (step - run_start_step_)
                                : step_s;
  spdlog::info("step {}/{} | loss {:.4f} | lr {:.2e} | gnorm {:.3f} | {:.0f} tok/s{} | {:.2f} s/step{} | rss {:.0f} MB | ETA {}",
               step, max_steps_, st.loss, lr, st.grad_norm, tok_s,
               rec["mfu"].is_number() ? fmt::format(" | mfu {:.1f}%", 100 * rec["mfu"].get<double>()) : "", step_s, extra,
               env::peak_resident_mb(), Progress::format_duration(run_step_s * (max_steps_ - step)));
  window_tokens_ = window_steps_ = 0;
  window_comm_s_ = window_a2a_s_ = window_a2a_rows_ = 0;
  return true;
}

void StepLogger::record_expert_traffic(nlohmann::json& rec, std::string& extra) {
  const int n = world_->size(), r = world_->rank();
  auto all = torch::zeros({2 * n}, torch::kFloat64);
  all[r] = window_a2a_rows_ / window_steps_;
  all[n + r] = window_a2a_s_ / window_steps_;
  all = all.to(world_->device());
  world_->all_reduce_sum(all).wait();
  all = all.cpu();
  const double step_s = rec["step_time_s"].get<double>();
  std::vector<double> tokens(static_cast<size_t>(n));
  for (int q = 0; q < n; ++q) tokens[static_cast<size_t>(q)] = all[q].item<double>();
  const double share = step_s > 0 ? all.narrow(0, n, n).mean().item<double>() / step_s : 0;
  rec["ep_tokens_per_rank"] = tokens;
  rec["all_to_all_share"] = share;
  extra += fmt::format(" | a2a {:.0f}%", 100 * share);
}

void StepLogger::eval_done(int64_t step, double eval_loss) {
  if (metrics_) metrics_->write({{"step", step}, {"eval_loss", eval_loss}, {"eval_ppl", std::exp(eval_loss)}});
  if (tensorboard_) {
    tensorboard_->add_scalar("eval/loss", step, eval_loss);
    tensorboard_->add_scalar("eval/ppl", step, std::exp(eval_loss));
  }
  spdlog::info("eval step {} | loss {:.4f} | ppl {:.2f}", step, eval_loss, std::exp(eval_loss));
}

}  // namespace dsopen::train
