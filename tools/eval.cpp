// dsopen-eval: logits and perplexity of a model (dsopen checkpoint or HF directory).
//   dsopen-eval --model DIR --tokens FILE --dump-logits OUT.safetensors
//   dsopen-eval --model DIR --data 'runs/tiny/data/fortunes_*.bin' --ppl [--seq-len 256 --batches 20]
//   dsopen-eval --model BASE --adapter ADAPTER_DIR ...   (a LoRA adapter applied unmerged)
#include <iostream>

#include "inference/evaluation.h"
#include "inference/loader.h"
#include "model/lora.h"
#include "model/model_dir.h"
#include "model/safetensors.h"
#include "utils/cli.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/logging.h"

using namespace dsopen;

static int run(int argc, char** argv) {
  cxxopts::Options options("dsopen-eval", "Logits and perplexity of a model");
  options.add_options()("model", "Checkpoint or HF model directory", cxxopts::value<std::string>())(
      "adapter", "LoRA adapter directory (PEFT layout) applied on top of the model", cxxopts::value<std::string>())(
      "tokens", "File with one sequence of token ids per line", cxxopts::value<std::string>())(
      "dump-logits", "Write float32 logits [sequences, length, vocab] to this safetensors file",
      cxxopts::value<std::string>())("data", "Token shards (paths or globs) for --ppl",
                                     cxxopts::value<std::vector<std::string>>())(
      "ppl", "Report perplexity over --data")("seq-len", "Sequence length for --ppl",
                                              cxxopts::value<int64_t>()->default_value("256"))(
      "batches", "Batches of 8 sequences for --ppl (0: all)", cxxopts::value<int64_t>()->default_value("0"))(
      "threads", "CPU threads (0: all)", cxxopts::value<int>()->default_value("0"));
  cli::add_common(options);
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  if (!args.count("model")) throw usage_error("--model", "is required", "see --help");
  logging::setup_console("info");  // --ppl over many shards reports its progress
  // What the flags ask is checked before the model is loaded.
  if (args.count("tokens") && !args.count("dump-logits")) throw usage_error("--tokens", "needs --dump-logits OUT.safetensors");
  if (!args.count("tokens")) {
    if (!args.count("ppl")) throw usage_error("command line", "nothing to do", "use --tokens with --dump-logits, or --data with --ppl");
    if (!args.count("data")) throw usage_error("--ppl", "needs --data SHARDS");
    if (args["seq-len"].as<int64_t>() < 1) throw usage_error("--seq-len", "must be >= 1");
    if (args["batches"].as<int64_t>() < 0) throw usage_error("--batches", "must be >= 0 (0: all)");
  }
  env::configure_threads(args["threads"].as<int>());
  if (args.count("dump-logits")) {
    std::vector<std::string> inputs{model::resolve_latest(args["model"].as<std::string>())};
    for (const char* name : {"tokens", "adapter"})
      if (args.count(name)) inputs.push_back(args[name].as<std::string>());
    env::check_output_path(args["dump-logits"].as<std::string>(), env::OutputKind::File, inputs, "--dump-logits");
  }
  // Without an adapter (which needs float weights) quantized layers keep their codes and dequantize per call:
  // float32 results while the quantized layers take 0.5 or 1 byte per weight instead of 4.
  auto m = inference::load_model(args["model"].as<std::string>(), torch::kCPU, false,
                                 args.count("adapter") ? inference::QuantizedLayers::Dequantized
                                                       : inference::QuantizedLayers::FloatMath);
  if (args.count("adapter")) {
    model::load_adapter(*m, model::resolve_latest(args["adapter"].as<std::string>()));
    m->eval();
  }
  torch::NoGradGuard no_grad;
  if (args.count("tokens")) {
    auto ids = inference::read_token_file(args["tokens"].as<std::string>(), m->config().vocab_size);
    auto logits = m->forward(ids).logits.to(torch::kFloat32);
    model::save_safetensors(args["dump-logits"].as<std::string>(), {{"logits", logits}});
    std::cout << "wrote logits " << logits.sizes() << " to " << args["dump-logits"].as<std::string>() << std::endl;
    return 0;
  }
  const auto p = inference::perplexity(m, args["data"].as<std::vector<std::string>>(), args["seq-len"].as<int64_t>(),
                                       args["batches"].as<int64_t>(),
                                       inference::model_tokenizer_hash(args["model"].as<std::string>()));
  std::printf("tokens %.0f | loss %.4f | perplexity %.3f\n", p.tokens, p.loss, p.ppl);
  return 0;
}

int main(int argc, char** argv) {
  return run_main("dsopen-eval", run, argc, argv);
}
