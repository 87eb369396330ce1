// dsopen-generate: sample text from a checkpoint or HF model directory with the KV cache, streaming tokens.
//   dsopen-generate --model runs/tiny/checkpoints/step_00000300 --prompt "Life is" --max-new-tokens 64
//   dsopen-generate --model BASE --adapter runs/lora/checkpoints/step_00000150 --chat --prompt "Hello"
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "data/hf_tokenizer.h"
#include "inference/generator.h"
#include "inference/loader.h"
#include "inference/quantize.h"
#include "model/lora.h"
#include "utils/cli.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/logging.h"

using namespace dsopen;

static int run(int argc, char** argv) {
  cxxopts::Options options("dsopen-generate", "Generate text with a trained model");
  options.add_options()("model", "Checkpoint or HF model directory", cxxopts::value<std::string>())(
      "adapter", "LoRA adapter directory (PEFT layout), merged into the model", cxxopts::value<std::string>())(
      "tokenizer", "Tokenizer .model / tokenizer.json (default: the one in MODEL)", cxxopts::value<std::string>())(
      "prompt", "Prompt text; repeat it to generate for several prompts in one batch",
      cxxopts::value<std::vector<std::string>>())("prompt-file", "Read the prompt from a file",
                                                  cxxopts::value<std::string>())(
      "chat", "Wrap the prompt in the chat template (<|User|>...<|Assistant|>)")(
      "max-new-tokens", "Tokens to generate at most", cxxopts::value<int64_t>()->default_value("128"))(
      "temperature", "0: greedy", cxxopts::value<double>()->default_value("0.8"))(
      "top-k", "0: off", cxxopts::value<int64_t>()->default_value("50"))(
      "top-p", "1: off", cxxopts::value<double>()->default_value("0.95"))(
      "repetition-penalty", "1: off", cxxopts::value<double>()->default_value("1.1"))(
      "seed", "Sampling seed", cxxopts::value<uint64_t>()->default_value("0"))(
      "stop", "Stop string (repeatable)", cxxopts::value<std::vector<std::string>>())(
      "no-bos", "Do not prepend the BOS token")("threads", "CPU threads (0: all)",
                                                cxxopts::value<int>()->default_value("0"));
  cli::add_common(options);
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  if (!args.count("model")) throw usage_error("--model", "is required", "see --help");
  if ((args.count("prompt") > 0) == (args.count("prompt-file") > 0))
    throw usage_error("dsopen-generate", "give --prompt (one or more) or --prompt-file");
  logging::setup_console("warn");
  env::configure_threads(args["threads"].as<int>());
  const std::string dir = args["model"].as<std::string>();
  const std::string adapter = args.count("adapter") ? args["adapter"].as<std::string>() : "";
  // Default tokenizer: the model's, else the adapter's (LoRA checkpoints carry the run's tokenizer.model).
  std::string tok_path = args.count("tokenizer") ? args["tokenizer"].as<std::string>() : dir;
  if (!args.count("tokenizer") && !adapter.empty() && !std::filesystem::exists(std::filesystem::path(dir) / "tokenizer.model") &&
      !std::filesystem::exists(std::filesystem::path(dir) / "tokenizer.json") &&
      std::filesystem::exists(std::filesystem::path(adapter) / "tokenizer.model"))
    tok_path = adapter;
  auto tok = data::load_tokenizer(tok_path);
  auto model = inference::load_quantized_model(dir);
  if (!adapter.empty()) {
    model::load_adapter(*model, adapter);
    model::merge_lora(*model);  // one matrix per projection: the decode speed of the base
  }
  if (tok->vocab_size() > model->config().vocab_size)
    throw usage_error(tok_path, "tokenizer vocabulary (" + std::to_string(tok->vocab_size()) +
                                    ") exceeds the model's vocab_size (" + std::to_string(model->config().vocab_size) + ")",
                      "use the tokenizer the model was trained with");

  std::vector<std::string> prompts = args.count("prompt") ? args["prompt"].as<std::vector<std::string>>()
                                                          : std::vector<std::string>{env::read_file(args["prompt-file"].as<std::string>())};
  std::vector<std::vector<int32_t>> ids;
  for (auto& prompt : prompts) {
    if (args.count("chat")) prompt = "<|User|>" + prompt + "\n<|Assistant|>";
    ids.emplace_back();
    if (!args.count("no-bos") && tok->bos_id() >= 0) ids.back().push_back(tok->bos_id());
    for (int32_t t : tok->encode(prompt)) ids.back().push_back(t);
  }

  inference::SamplingOptions so;
  so.temperature = args["temperature"].as<double>();
  so.top_k = args["top-k"].as<int64_t>();
  so.top_p = args["top-p"].as<double>();
  so.repetition_penalty = args["repetition-penalty"].as<double>();
  so.seed = args["seed"].as<uint64_t>();
  inference::Sampler sampler(so);
  inference::GenerateOptions go;
  go.max_new_tokens = args["max-new-tokens"].as<int64_t>();
  if (args.count("stop")) go.stop = args["stop"].as<std::vector<std::string>>();
  if (args.count("chat")) go.stop.push_back("<|end|>");

  const bool stream = prompts.size() == 1;  // one prompt streams; a batch prints each text when done
  if (stream) std::cout << prompts[0] << std::flush;
  auto results = inference::generate_batch(model, *tok, ids, sampler, go, [&](size_t, const std::string& piece) {
    if (stream) std::cout << piece << std::flush;
  });
  int64_t prompt_tokens = 0;
  size_t generated = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    if (stream) std::cout << std::endl;
    else std::cout << "[" << i << "] " << prompts[i] << results[i].text << std::endl;
    prompt_tokens += results[i].prompt_tokens;
    generated += results[i].tokens.size();
  }
  const auto& r = results.front();
  std::fprintf(stderr, "prompt %lld tokens in %.3f s (%.1f tokens/s) | generated %zu tokens in %.3f s (%.1f tokens/s)\n",
               static_cast<long long>(prompt_tokens), r.prefill_s, prompt_tokens / std::max(r.prefill_s, 1e-9),
               generated, r.decode_s, generated / std::max(r.decode_s, 1e-9));
  return 0;
}

int main(int argc, char** argv) { return run_main("dsopen-generate", run, argc, argv); }
