#include "train/trainer.h"

#include <optional>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <filesystem>
#include <regex>
#include <sstream>

#include "data/batch_source.h"
#include "model/info.h"
#include "model/lora.h"
#include "model/weights.h"
#include "train/checkpoint.h"
#include "train/data_parallel.h"
#include "train/evaluator.h"
#include "train/expert_parallel.h"
#include "train/plot.h"
#include "train/precision.h"
#include "model/fused_ops.h"
#include "train/schedule.h"
#include "train/step.h"
#include "train/step_log.h"
#include "utils/cpu.h"
#include "utils/env.h"
#include "utils/errors.h"

namespace dsopen::train {

namespace {

std::atomic<int> g_stop_signal{0};
std::atomic<bool> g_training{false};  // inside Trainer::run's loop: a signal there is answered by a checkpoint

// In the training loop the first signal asks for a checkpoint at the end of the step. Anywhere else (building the
// tokenizer, shards, the model, loading weights) there is nothing to save: exit at once, as on a second signal.
extern "C" void on_stop_signal(int sig) {
  if (g_training.load() && g_stop_signal.load() == 0) {
    g_stop_signal.store(sig);
    return;
  }
  static const char msg[] = "dsopen-train: stopped by signal (nothing to save outside a training step)\n";
  const ssize_t ignored = ::write(2, msg, sizeof msg - 1);
  (void)ignored;
  ::_exit(128 + sig);
}

// <output_dir>/loss.png with the curves so far; a picture never stops training (a warning at most, once).
void draw_loss_png(const std::string& output_dir) {
  static bool warned = false;
  const auto warn_once = [](const std::string& why) {
    if (!warned) spdlog::warn("no loss.png: {}", why);
    warned = true;
  };
  if (!gnuplot_available()) return warn_once("gnuplot not found (apt-get install gnuplot-nox)");
  try {
    plot_runs({output_dir}, output_dir + "/loss.png");
  } catch (const std::exception& e) {
    warn_once(e.what());
  }
}

double directory_mb(const std::string& dir) {
  int64_t bytes = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir))
    if (e.is_regular_file()) bytes += static_cast<int64_t>(e.file_size());
  return bytes / 1e6;
}

// LoRA: the base weights from model.pretrained (on every start: checkpoints hold only the adapter), then fresh
// adapters or those of lora.adapter, then the base frozen — all before the optimizer sees the parameters.
void setup_lora(model::CausalLM& m, const JobConfig& j) {
  const int64_t fresh = model::load_hf_state_dict(m, model::WeightFiles(j.model.pretrained), j.model.strict, true);
  if (fresh > 0)
    throw usage_error("model.use_mtp", j.model.pretrained + " has no MTP modules and a LoRA run does not train them",
                      "set model.use_mtp: false");
  const auto adapted = j.lora.adapter.empty() ? model::inject_lora(*m, j.lora.config)
                                               : model::load_adapter(*m, j.lora.adapter, m->expert_placement().sharded());
  const auto n = model::freeze_base(*m, j.lora.base_dtype);
  spdlog::info("LoRA on {} projections{}{}: trainable parameters {} of {} ({:.3f}%); base from {} frozen ({})",
               adapted.size(), m->expert_placement().sharded() ? " held by this rank" : "", j.lora.adapter.empty() ? "" : " from " + j.lora.adapter, n.trainable, n.total,
               100.0 * n.trainable / n.total, j.model.pretrained, j.lora.base_dtype == torch::kBFloat16 ? "bf16" : "fp32");
  // peft (0.21) under transformers >= 5 reads gate_proj / up_proj / down_proj in the adapter_config.json of an MoE
  // model (DeepSeek-V2/V3, Qwen2/3-MoE, GLM-4-MoE, ...) as the fused routed experts and drops the dense MLP's and
  // shared experts' adapters: say so before the run, not when a user loads the result.
  const bool moe = m->config().n_routed_experts > 0;
  const std::regex mlp(R"(.*\.mlp\.(shared_experts?\.)?(gate_proj|up_proj|down_proj))");
  if (moe && std::any_of(adapted.begin(), adapted.end(), [&](const std::string& p) { return std::regex_match(p, mlp); }))
    spdlog::warn("LoRA on the dense MLP or shared experts of an MoE model: peft under transformers >= 5 will not load "
                 "these adapters (it reads gate_proj/up_proj/down_proj as the fused routed experts); dsopen's tools "
                 "take them, and `dsopen-convert --adapter` merges them for transformers");
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
  ExpertGroups experts;                      // expert parallelism (size 1: off)
  std::shared_ptr<GroupExchange> exchange;   // the MoE blocks' all-to-alls
  std::unique_ptr<data::Tokenizer> tokenizer;
  data::BatchSources data;
  model::CausalLM model{nullptr};
  std::unique_ptr<Precision> precision;
  double measured_peak = 0;  // FLOP/s for MFU on the CPU when train.peak_tflops is 0
  std::unique_ptr<DataParallel> dp;
  std::unique_ptr<TrainStep> step;
  std::unique_ptr<Evaluator> evaluator;
  TrainerState state;

  void start_processes();  // needs resolved_config
  void check_same_config();
  void prepare_data();
  void build_model();
  void load_weights();  // before build_optimizer: the optimizer's flat buffers (zero3: slices) take the values
  void build_optimizer();
  int build_turns() const;  // zero3: how many turns the ranks of a machine take to build their models (1: at once)
  bool in_turns = false;
  void load_optimizer_state();

  std::string resume;  // the checkpoint this run resumes ("" for none)
};

// Ranks started with different configs would train different jobs as one (different precisions, batch sizes,
// learning rates): every rank compares its resolved config with rank 0's, line by line (hashes), and a rank that
// differs names its first differing line.
void Trainer::State::check_same_config() {
  std::vector<int64_t> mine;
  std::vector<std::string> lines;
  std::istringstream in(resolved_config);
  for (std::string line; std::getline(in, line);) {
    lines.push_back(line);
    mine.push_back(static_cast<int64_t>(std::hash<std::string>{}(line)));
  }
  auto count = torch::tensor({static_cast<int64_t>(mine.size())}, torch::kLong).to(group->device());
  group->broadcast(count, 0).wait();
  auto theirs = torch::tensor(mine, torch::kLong).to(group->device());
  if (count.item<int64_t>() != static_cast<int64_t>(mine.size()))
    theirs = torch::zeros({count.item<int64_t>()}, torch::kLong).to(group->device());
  group->broadcast(theirs, 0).wait();
  theirs = theirs.cpu();
  size_t first = 0;
  while (first < mine.size() && static_cast<int64_t>(first) < theirs.numel() && theirs[first].item<int64_t>() == mine[first]) ++first;
  const bool same = first == mine.size() && static_cast<int64_t>(first) == theirs.numel();
  if (group->all_ranks_agree(same)) return;
  throw usage_error("config", same ? "another rank was started with a different config or --set values"
                                   : "this rank's resolved config differs from rank 0's at '" +
                                         (first < lines.size() ? lines[first] : std::string("(end)")) + "'",
                    "start every rank with the same --config and --set values, as scripts/launch.sh does");
}

// Device, threads, precision and the process group (one process: a group of one).
void Trainer::State::start_processes() {
  const JobConfig& j = job;
  dist = read_dist_env();
  // Ranks sharing a machine share its cores.
  env::configure_threads(j.run.threads > 0 ? j.run.threads : std::max(1, env::available_cpus() / dist.local_world_size));
  if (j.run.device == "cuda" && !torch::cuda::is_available())
    throw usage_error("run.device", "cuda requested but no CUDA device is available", "use auto or cpu");
  const bool cuda = runs_on_cuda(j.run);
  device = cuda ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(dist.local_rank)) : torch::Device(torch::kCPU);
  group = create_process_group(dist, device, {j.parallel.backend, std::chrono::seconds(j.parallel.timeout_s)});
  if (group->size() > 1) check_same_config();
  experts = make_expert_groups(*group, j.parallel.expert_parallel);
  PrecisionChoice choice = choose_precision(j.train.precision, device, j.model.hidden_size, j.model.intermediate_size);
  // Every rank trains in one precision: bf16 only where every rank measured it faster.
  if (j.train.precision == PrecisionMode::Auto && group->size() > 1 &&
      !group->all_ranks_agree(choice.mode == PrecisionMode::Bf16) && choice.mode == PrecisionMode::Bf16) {
    choice.mode = PrecisionMode::Fp32;
    choice.reason += "; another rank measured fp32 faster";
  }
  if (!choice.reason.empty()) spdlog::info("precision auto -> {}: {}", to_string(choice.mode), choice.reason);
  precision = std::make_unique<Precision>(choice.mode, device);
  // MFU on the CPU without a configured peak: against the measured GEMM rate of the training precision.
  if (device.is_cpu() && j.train.peak_tflops <= 0) {
    measured_peak = choice.gemm_flops > 0 ? choice.gemm_flops
                                          : measured_gemm_flops(choice.mode, j.model.hidden_size, j.model.intermediate_size);
    spdlog::info("MFU is against this CPU's measured {} GEMM rate, {:.0f} GFLOP/s (train.peak_tflops sets another)",
                 to_string(choice.mode), measured_peak / 1e9);
  }
  // The fused kernels (train.fused_ops; DSOPEN_FUSED_OPS=0 also turns them off).
  model::fused::set_enabled(j.train.fused_ops && model::fused::enabled());
  if (!model::fused::enabled())
    spdlog::info("fused kernels off ({}): RMSNorm, SwiGLU, RoPE and the head's loss run as unfused ATen ops",
                 j.train.fused_ops ? "DSOPEN_FUSED_OPS=0" : "train.fused_ops: false");
  if (group->size() > 1)
    spdlog::info("rank {} of {} ({}, local rank {} of {}), backend {}, strategy {}", group->rank(), group->size(),
                 dist.source, dist.local_rank, dist.local_world_size, group->backend(), to_string(j.parallel.strategy));
  if (experts.size > 1) {
    const auto p = experts.placement();
    spdlog::info("expert parallel {}: this rank holds routed experts [{}, {}) of {}; {} rank(s) hold the same ones",
                 experts.size, p.first(j.model.n_routed_experts), p.first(j.model.n_routed_experts) + p.count(j.model.n_routed_experts),
                 j.model.n_routed_experts, experts.replicas->size());
  }
}

// Tokenizer and shards are built on first use when the config says how — by rank 0 while the others wait, then
// read by all.
void Trainer::State::prepare_data() {
  const JobConfig& j = job;
  const int rank = group->rank();
  if (rank == 0) tokenizer = data::prepare_tokenizer(j.tokenizer);
  group->barrier();
  if (rank != 0) tokenizer = data::prepare_tokenizer(j.tokenizer);
  if (tokenizer->vocab_size() < j.model.vocab_size)
    spdlog::warn("the tokenizer has {} tokens and the model {} embeddings: rows {}.. are never used (fine for a "
                 "pretrained model's padded vocabulary; otherwise set model.vocab_size)",
                 tokenizer->vocab_size(), j.model.vocab_size, tokenizer->vocab_size());
  if (tokenizer->vocab_size() > j.model.vocab_size)
    throw usage_error("model.vocab_size", "the tokenizer has " + std::to_string(tokenizer->vocab_size()) +
                                              " tokens but the model only " + std::to_string(j.model.vocab_size),
                      "set model.vocab_size >= the tokenizer's vocabulary");
  if (rank == 0) data::prepare_shards(j.data, *tokenizer);
  group->barrier();
  data = data::make_batch_sources(j.data, *tokenizer, j.model.vocab_size, static_cast<uint64_t>(j.run.seed), rank,
                                  group->size());
}

// The seed makes initialization reproducible; a resume overwrites it.
void Trainer::State::build_model() {
  torch::manual_seed(static_cast<uint64_t>(job.run.seed));
  {
    model::ExpertPlacementScope placement(experts.placement());  // only this rank's routed experts are built
    model = model::CausalLM(job.model);
  }
  if (experts.size > 1) {
    exchange = std::make_shared<GroupExchange>(experts.experts);
    model->set_expert_exchange(exchange);
  }
  if (job.lora.enabled) setup_lora(model, job);
  // zero3 moves only its slices to the device (build_optimizer), never the whole model.
  if (job.parallel.strategy != Strategy::Zero3) model->to(device);
  model->set_activation_checkpointing(job.train.activation_checkpointing);
}

void Trainer::State::build_optimizer() {
  const TrainOptions& t = job.train;
  AdamWOptions ao;
  ao.beta1 = t.betas[0];
  ao.beta2 = t.betas[1];
  ao.eps = t.eps;
  ao.weight_decay = t.weight_decay;
  ao.decay_embeddings = t.decay_embeddings;
  // Under expert parallelism the routed experts this rank holds are data-parallel over their replicas only.
  std::vector<std::pair<std::string, torch::Tensor>> named;
  ExpertShards shards;
  for (auto& p : model->named_parameters())
    (experts.size > 1 && model::is_routed_expert_name(p.key()) ? shards.params : named).push_back({p.key(), p.value()});
  if (experts.size > 1) shards.replicas = experts.replicas, shards.experts = experts.experts;
  DataParallelOptions options{job.parallel.strategy, job.parallel.bucket_mb, job.parallel.offload_optimizer, {}};
  if (job.parallel.strategy == Strategy::Zero3) {
    const model::ModelConfig config = model->config();
    options.units.unit_of = [config](const std::string& name) { return model::unit_of(name, config); };
    options.units.units = model::unit_count(config);
    options.units.layers = config.num_hidden_layers;
    options.units.compute_dtype = precision->mode() == PrecisionMode::Bf16   ? torch::kBFloat16
                                  : precision->mode() == PrecisionMode::Fp16 ? torch::kHalf
                                                                             : torch::kFloat32;
    options.units.device = device;
    options.units.broadcast = !in_turns;
    auto projections = std::make_shared<std::set<std::string>>(model::projection_weight_names(*model));
    options.units.low_precision = [projections](const std::string& name) { return projections->count(name) > 0; };
  }
  dp = std::make_unique<DataParallel>(named, ao, options, group, std::move(shards));
  if (model::UnitHooks* hooks = dp->unit_hooks()) {
    model->to(device);  // the buffers, and the parameters' (empty) gather views already there
    model->set_unit_hooks(hooks);
  }
  step = std::make_unique<TrainStep>(model, *dp, *precision, device, StepOptions{t.grad_clip, !job.lora.enabled});
  if (data.valid)
    evaluator = std::make_unique<Evaluator>(model, *data.valid, *precision, *group, device, t.micro_batch_size, t.eval_steps);
}

// This run's checkpoints go to checkpoint.dir among those already there. A fresh start there would replace the
// earlier run's checkpoints of the same steps and have pruning (which keeps the highest steps) delete its own:
// refused. A resume from an earlier step (rolling back past a loss spike, say) is what the user asked for: the
// later checkpoints stay until a save of the same step replaces them, and `latest` follows this run.
static void check_checkpoint_dir(const JobConfig& j, int64_t start_step, const std::string& resume) {
  const std::string newest = find_latest_checkpoint(j.checkpoint.dir, /*highest_step=*/true);
  if (newest.empty() || newest == resume) return;
  const int64_t step = read_trainer_state(newest).step;
  const std::string name = std::filesystem::path(newest).filename().string();
  if (resume.empty())
    throw usage_error("checkpoint.dir", j.checkpoint.dir + " holds " + name + " of another run, which a fresh start "
                                            "(checkpoint.resume: none) would replace or prune",
                      "give this run its own run.output_dir or checkpoint.dir, or continue that run (resume: auto)");
  if (step > start_step)
    spdlog::warn("{} holds {}, past step {} this run resumes from: saves of the same steps will replace those "
                 "checkpoints, and pruning counts them", j.checkpoint.dir, name, start_step);
}

// A checkpoint to resume (resume: auto takes the newest), else the pretrained weights to fine-tune, else the
// fresh initialization.
void Trainer::State::load_weights() {
  const JobConfig& j = job;
  if (j.checkpoint.resume == "auto") resume = find_latest_checkpoint(j.checkpoint.dir);
  else if (j.checkpoint.resume != "none") resume = j.checkpoint.resume;
  if (resume.empty() && !j.model.pretrained.empty() && !j.lora.enabled) {
    const int64_t fresh = model::load_hf_state_dict(model, model::WeightFiles(j.model.pretrained), j.model.strict, true);
    spdlog::info("loaded pretrained weights from {}", j.model.pretrained);
    if (fresh > 0) spdlog::warn("{} MTP tensors are not in {}; those modules start from their initialization", fresh, j.model.pretrained);
  }
  check_checkpoint_dir(j, resume.empty() ? 0 : read_trainer_state(resume).step, resume);
  if (resume.empty()) return;
  state = load_checkpoint_weights(resume, model, group.get());
  if (state.world_size != group->size())
    spdlog::warn("{} was trained on {} rank{}, this run has {}: a step now takes {} x {} x {} = {} sequences (the global "
                 "batch follows the ranks; scale train.grad_accum_steps to keep it)",
                 resume, state.world_size, state.world_size == 1 ? "" : "s", group->size(), j.train.micro_batch_size,
                 j.train.grad_accum_steps, group->size(), j.train.micro_batch_size * j.train.grad_accum_steps * group->size());
  // auto resumes in the precision the run trained in, whatever this start measured.
  if (j.train.precision == PrecisionMode::Auto && !state.precision.empty() && state.precision != to_string(precision->mode())) {
    for (const auto& [name, mode] : precision_names())
      if (name == state.precision && mode != PrecisionMode::Auto) {
        spdlog::info("precision auto -> {}: the checkpoint was trained in it (this start measured {})", name,
                     to_string(precision->mode()));
        *precision = Precision(mode, device);
      }
  }
  precision->set_state(state.loss_scale, state.loss_scale_good_steps);
}

// zero3 builds the whole fp32 model on the host before each rank keeps its slices: a machine whose memory cannot
// hold one copy per rank at once lets its ranks build one after the other (each frees the rest of its copy before
// the next starts), so startup needs one model's host memory rather than one per rank.
int Trainer::State::build_turns() const {
  const ParallelOptions& p = job.parallel;
  if (p.strategy != Strategy::Zero3 || dist.local_world_size == 1 || p.zero3_build == "together") return 1;
  if (p.zero3_build == "in_turns") return dist.local_world_size;
  const double copy = 4.0 * static_cast<double>(model::count_parameters(job.model).total);
  const double host = static_cast<double>(env::host_memory_budget().bytes);
  return host > 0 && copy * dist.local_world_size * 1.2 > host ? dist.local_world_size : 1;
}

// The resumed run's moments and RNG state; then every rank takes rank 0's weights.
void Trainer::State::load_optimizer_state() {
  const JobConfig& j = job;
  if (!resume.empty()) {
    load_optimizer_state_files(resume, model, dp->optimizer(), group.get(), dp->experts() ? &dp->experts()->optimizer() : nullptr);
    spdlog::info("resumed from {} at step {}", resume, state.step);
  }
  const auto counts = model::count_parameters(j.model);
  spdlog::info("model {}: {:.2f}M parameters ({:.2f}M active), device {}, precision {}", j.model.model_type,
               counts.total / 1e6, counts.active / 1e6, device.str(), to_string(precision->mode()));
  dp->broadcast_parameters();
  spdlog::info("optimizer state {:.1f} MB per rank (ZeRO formula {:.1f} MB), gradients {:.1f} MB (formula {:.1f} MB)",
               dp->state_bytes() / 1e6, dp->predicted_state_bytes() / 1e6, dp->grad_bytes() / 1e6,
               dp->predicted_grad_bytes() / 1e6);
  if (const DataParallel* e = dp->experts())
    spdlog::info("trainable routed-expert parameters on this rank: {} ({:.2f} MB) of {} in the model, optimizer state {:.2f} MB",
                 e->optimizer().num_params(), e->optimizer().num_params() * 4 / 1e6,
                 e->optimizer().num_params() * experts.size, e->state_bytes() / 1e6);
}

Trainer::Trainer(JobConfig job, std::string resolved_config) : s_(std::make_unique<State>()) {
  s_->job = std::move(job);
  s_->resolved_config = std::move(resolved_config);
  s_->start_processes();
  s_->prepare_data();
  const int turns = s_->build_turns();
  s_->in_turns = turns > 1;
  if (turns > 1)
    spdlog::info("zero3: the {} ranks of this machine build the model one at a time (parallel.zero3_build: {})", turns,
                 s_->job.parallel.zero3_build);
  for (int turn = 0; turn < turns; ++turn) {
    if (turns == 1 || s_->dist.local_rank == turn) {
      s_->build_model();
      s_->load_weights();
      s_->build_optimizer();
    }
    if (turns > 1) s_->group->barrier();
  }
  s_->load_optimizer_state();
  std::filesystem::create_directories(s_->job.run.output_dir);
}

Trainer::~Trainer() {
  if (s_->model) s_->model->set_unit_hooks(nullptr);  // the hooks die with the optimizer
}

model::CausalLM& Trainer::model() { return s_->model; }

TrainResult Trainer::run() {
  State& s = *s_;
  const JobConfig& j = s.job;
  const TrainOptions& t = j.train;
  ProcessGroup& group = *s.group;
  const ScheduleOptions schedule{t.schedule,       t.lr,          t.min_lr,         t.warmup_steps,
                                 t.max_steps,      t.decay_fraction, t.milestones, t.milestone_factors};
  const double peak = s.measured_peak > 0 ? s.measured_peak : peak_flops(s.device, t.peak_tflops);
  StepLogger log(j.model, j.data.seq_len, t.max_steps, j.run.log_every, peak,
                 group.rank() == 0 ? j.run.output_dir + "/metrics.jsonl" : "",
                 group.rank() == 0 && j.run.tensorboard ? j.run.output_dir + "/tb" : "",
                 s.resume.empty() ? -1 : s.state.step);
  log.config_text(s.resolved_config);
  if (s.exchange) log.track_expert_traffic(s.exchange.get(), s.group.get());
  std::optional<cpu::ThreadBackoff> backoff;  // fewer threads while other processes keep the CPUs busy
  if (s.device.is_cpu() && j.run.threads == 0) backoff.emplace("training", /*every=*/4);  // run.threads set: it stands
  TrainResult result;
  int64_t bad_steps = 0;
  s.model->train();
  g_training.store(true);
  while (s.state.step < t.max_steps) {
    data::DataCursor cursor = s.state.cursor;
    s.data.train->begin_step(cursor, t.micro_batch_size * t.grad_accum_steps);
    std::vector<data::Batch> batches;
    for (int64_t k = 0; k < t.grad_accum_steps; ++k) batches.push_back(s.data.train->next(cursor, t.micro_batch_size));
    const double lr = lr_at(s.state.step, schedule);
    const StepStats stats = s.step->run(batches, lr);
    s.state.cursor = cursor;  // the batch is consumed either way, so a resume sees the same data
    if (!stats.applied) {
      ++bad_steps;
      spdlog::warn("step {}: non-finite loss or gradient (loss {}, grad norm {}); step skipped ({} in a row)",
                   s.state.step + 1, stats.loss, stats.grad_norm, bad_steps);
      if (bad_steps >= t.max_bad_steps && !s.precision->scaling())
        throw runtime_error("train", std::to_string(bad_steps) + " non-finite steps in a row at step " +
                                         std::to_string(s.state.step + 1),
                            "lower train.lr or raise train.grad_clip; the last checkpoint is intact");
      continue;
    }
    bad_steps = 0;
    s.state.step += 1;
    // Tokens are the positions trained on (with a target): padding and masked prompt positions do not count.
    s.state.tokens += static_cast<int64_t>(stats.targets);
    s.state.loss_scale = s.precision->scale();
    s.state.precision = to_string(s.precision->mode());
    s.state.loss_scale_good_steps = s.precision->good_steps();
    result.losses.push_back(stats.loss);
    const bool logged = log.step_done(s.state.step, lr, stats, s.state.tokens, *s.dp, s.step->balancer(), j.model.mtp_depth() > 0);
    if (backoff) backoff->step();
    const bool last = s.state.step == t.max_steps;
    if (s.evaluator && ((t.eval_every > 0 && s.state.step % t.eval_every == 0) || last)) {
      const double ev = s.evaluator->run();
      if (ev >= 0) log.eval_done(s.state.step, result.eval_loss = ev);
    }
    // A signal may reach only some ranks; they all stop together after the same step.
    const bool stop = group.all_reduce_sum(g_stop_signal.load() != 0 ? 1.0 : 0.0) > 0;
    if ((j.checkpoint.every > 0 && s.state.step % j.checkpoint.every == 0) || last || stop) {
      result.last_checkpoint = save_checkpoint(j.checkpoint.dir, s.model, s.dp->optimizer(), s.state,
                                               {s.resolved_config, j.tokenizer.path}, j.checkpoint.keep_last, &group,
                                               s.dp->experts() ? &s.dp->experts()->optimizer() : nullptr,
                                               s.dp->sharded_units(),
                                               s.dp->experts() ? s.dp->experts()->sharded_units() : nullptr);
      spdlog::info("saved {} ({:.2f} MB)", result.last_checkpoint, directory_mb(result.last_checkpoint));
      if (group.rank() == 0) draw_loss_png(j.run.output_dir);
    }
    if (logged) log.restart_window();
    if (stop) {
      if (g_stop_signal.load() != 0) spdlog::info("stopping on signal {} after step {}", g_stop_signal.load(), s.state.step);
      else spdlog::info("stopping after step {}: another rank received a stop signal", s.state.step);
      result.interrupted = true;
      break;
    }
  }
  g_training.store(false);
  result.final_step = s.state.step;
  return result;
}

}  // namespace dsopen::train
