// dsopen-bench-model: forward + backward time of a model config on CPU or CUDA, fp32 or bf16 autocast (auto: the
// faster of the two on this machine, as train.precision: auto decides).
// Reports ms per step, tokens/s and achieved model TFLOP/s (training FLOPs per token from model/config).
//   dsopen-bench-model --config configs/bench/dense-125m.yaml --batch 4 --seq-len 512 --precision bf16
#include <chrono>
#include <cstdio>
#include <iostream>

#include <torch/csrc/autograd/profiler_legacy.h>

#include "model/fused_ops.h"
#include "model/info.h"
#include "model/transformer.h"
#include "train/optimizer.h"
#include "train/precision.h"
#include "utils/cli.h"
#include "utils/compat.h"
#include "utils/config.h"
#include "utils/env.h"
#include "utils/errors.h"

using namespace dsopen;

namespace {

cxxopts::Options make_options() {
  cxxopts::Options options("dsopen-bench-model", "Forward+backward timing of a model config");
  options.add_options()("c,config", "Config with a model: section", cxxopts::value<std::string>())(
      "batch", "Sequences per step", cxxopts::value<int64_t>()->default_value("4"))(
      "seq-len", "Tokens per sequence (default: data.seq_len)", cxxopts::value<int64_t>())(
      "steps", "Timed steps", cxxopts::value<int>()->default_value("5"))(
      "warmup", "Untimed steps first", cxxopts::value<int>()->default_value("1"))(
      "precision", "fp32 | bf16 | auto", cxxopts::value<std::string>()->default_value("fp32"))(
      "unfused", "The unfused ATen compositions instead of the fused kernels (train.fused_ops: false)")(
      "device", "cpu | cuda", cxxopts::value<std::string>()->default_value("cpu"))(
      "threads", "CPU threads (0: all)", cxxopts::value<int>()->default_value("0"))(
      "checkpointing", "Activation checkpointing")(
      "optimizer", "Time whole training steps: forward, backward, clipping and the AdamW update")(
      "profile", "After timing, profile one step and write a Chrome trace (chrome://tracing) to this file",
      cxxopts::value<std::string>())(
      "json", "Print one JSON object");
  cli::add_common(options);
  return options;
}

// One benchmark step on random tokens: forward (under bf16 autocast when asked) and backward, plus clipping and
// the AdamW update with an optimizer; gradients are dropped otherwise.
struct BenchStep {
  model::CausalLM model{nullptr};
  torch::Tensor ids, labels;
  bool bf16 = false;
  torch::Device device{torch::kCPU};
  std::unique_ptr<train::FlatAdamW> optimizer;

  void operator()() {
    if (optimizer) optimizer->zero_grad();
    std::optional<compat::AutocastScope> autocast;
    if (bf16) autocast.emplace(device.type(), true, torch::kBFloat16);
    auto out = model->forward(ids, labels);
    autocast.reset();
    out.loss.backward();
    if (optimizer) {
      const double norm = optimizer->grad_norm();
      if (norm > 1.0) optimizer->scale_grads(1.0 / norm);
      optimizer->step(1e-4);
    } else {
      for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();
    }
    if (device.is_cuda()) torch::cuda::synchronize();
  }
};

BenchStep make_step(const model::ModelConfig& c, int64_t B, int64_t T, torch::Device device, bool bf16,
                    bool checkpointing, bool with_optimizer) {
  BenchStep step;
  torch::manual_seed(0);
  step.model = model::CausalLM(c);
  step.model->to(device);
  step.model->train();
  step.model->set_activation_checkpointing(checkpointing);
  step.ids = torch::randint(3, c.vocab_size, {B, T}, torch::TensorOptions().dtype(torch::kLong).device(device));
  step.labels = step.ids.roll(-1, 1);
  step.bf16 = bf16;
  step.device = device;
  if (with_optimizer) {
    std::vector<std::pair<std::string, torch::Tensor>> named;
    for (auto& p : step.model->named_parameters()) named.push_back({p.key(), p.value()});
    step.optimizer = std::make_unique<train::FlatAdamW>(named, train::AdamWOptions{});
  }
  return step;
}

}  // namespace

static int run(int argc, char** argv) {
  auto options = make_options();
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  if (!args.count("config")) throw usage_error("--config", "is required", "see --help");
  config::Document doc = config::Document::load(args["config"].as<std::string>());
  model::ModelConfig c = model::model_config_from_document(doc);
  int64_t T = model::seq_len_from_document(doc, 512);
  if (args.count("seq-len")) T = args["seq-len"].as<int64_t>();
  const int64_t B = args["batch"].as<int64_t>();
  if (B < 1) throw usage_error("--batch", "must be >= 1, got " + std::to_string(B));
  if (T < 1 || T > c.context_length())
    throw usage_error("--seq-len", std::to_string(T) + " is outside 1.." + std::to_string(c.context_length()),
                      "the model's max_position_embeddings bounds it");
  if (args["steps"].as<int>() < 1) throw usage_error("--steps", "must be >= 1");
  if (args["warmup"].as<int>() < 0) throw usage_error("--warmup", "must be >= 0");
  std::string precision = args["precision"].as<std::string>();
  if (precision != "fp32" && precision != "bf16" && precision != "auto")
    throw usage_error("--precision", "use fp32, bf16 or auto");
  const std::string device_name = args["device"].as<std::string>();
  if (device_name != "cpu" && device_name != "cuda") throw usage_error("--device", "'" + device_name + "': use cpu or cuda");
  if (args.count("profile")) cli::prepare_profile_output(args["profile"].as<std::string>(), {args["config"].as<std::string>()});
  const int threads = env::configure_threads(args["threads"].as<int>());
  torch::Device device(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
  if (device.is_cuda() && !torch::cuda::is_available()) throw usage_error("--device", "CUDA is not available");
  if (precision == "auto") {
    const auto choice = train::choose_precision(train::PrecisionMode::Auto, device, c.hidden_size, c.intermediate_size);
    precision = train::to_string(choice.mode);
    std::cerr << "precision auto -> " << precision << ": " << choice.reason << "\n";
  }
  if (args["unfused"].as<bool>()) model::fused::set_enabled(false);

  BenchStep step = make_step(c, B, T, device, precision == "bf16", args.count("checkpointing") > 0,
                             args.count("optimizer") > 0);
  for (int i = 0; i < args["warmup"].as<int>(); ++i) step();
  const int steps = args["steps"].as<int>();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) step();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
  if (args.count("profile")) {
    // One more step under LibTorch's profiler: every ATen op with its CPU time, for "where does the time go".
    torch::autograd::profiler::RecordProfile guard(args["profile"].as<std::string>());
    step();
  }
  const double tok_s = B * T / s;
  const double tflops = tok_s * model::training_flops_per_token(c, T) / 1e12;
  const auto counts = model::count_parameters(c);
  if (args.count("json")) {
    std::cout << nlohmann::json{{"config", args["config"].as<std::string>()}, {"params", counts.total},
                                {"batch", B}, {"seq_len", T}, {"precision", precision}, {"threads", threads},
                                {"device", device.str()}, {"optimizer", step.optimizer != nullptr},
                                {"fused_ops", model::fused::enabled()},
                                {"ms_per_step", s * 1e3}, {"tokens_per_s", tok_s}, {"model_tflops", tflops}}
                     .dump()
              << std::endl;
  } else {
    std::printf("%s  params %.1fM  B=%lld T=%lld  %s%s  %d threads: %.1f ms/step, %.0f tokens/s, %.3f TFLOP/s\n",
                args["config"].as<std::string>().c_str(), counts.total / 1e6, static_cast<long long>(B),
                static_cast<long long>(T), precision.c_str(), model::fused::enabled() ? "" : " unfused", threads,
                s * 1e3, tok_s, tflops);
  }
  return 0;
}

int main(int argc, char** argv) {
  return run_main("dsopen-bench-model", run, argc, argv);
}
