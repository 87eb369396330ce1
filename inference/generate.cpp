// dsopen-generate: sample text from a checkpoint or HF model directory with the KV cache, streaming tokens.
//   dsopen-generate --model runs/tiny/checkpoints/step_00000300 --prompt "Life is" --max-new-tokens 64
//   dsopen-generate --model BASE --adapter runs/lora/checkpoints/step_00000150 --chat --prompt "Hello"
//   dsopen-generate --model BASE --adapter ADAPTER --chat          (a conversation: one user turn per stdin line)
//   dsopen-generate --model M --prompt-ids 1,5,9 --max-new-tokens 64 --ignore-eos --temperature 0 --json
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include <torch/csrc/autograd/profiler_legacy.h>

#include "data/hf_tokenizer.h"
#include "inference/chat.h"
#include "inference/generator.h"
#include "inference/loader.h"
#include "inference/quantize.h"
#include "model/generation_config.h"
#include "model/model_dir.h"
#include "model/lora.h"
#include "utils/cli.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/logging.h"

using namespace dsopen;

namespace {
// "1,5,9" or "1 5 9" -> token ids.
std::vector<int32_t> parse_ids(const std::string& text) {
  std::string spaced = text;
  std::replace(spaced.begin(), spaced.end(), ',', ' ');
  std::istringstream in(spaced);
  std::vector<int32_t> ids;
  std::string word;
  while (in >> word) {
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(word, &used);
    } catch (const std::exception&) {
    }
    if (used != word.size() || v < 0 || v > INT32_MAX)
      throw usage_error("--prompt-ids", "'" + word + "' is not a token id", "give ids as 1,5,9");
    ids.push_back(static_cast<int32_t>(v));
  }
  if (ids.empty()) throw usage_error("--prompt-ids", "no token ids in '" + text + "'");
  return ids;
}

// Every value of a repeatable option as written: cxxopts would split a vector value at commas, which turned
// --prompt "Hello, world" into two prompts.
std::vector<std::string> values_of(int argc, char** argv, const std::string& name) {
  std::vector<std::string> out;
  const std::string flag = "--" + name;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--") break;
    if (a == flag && i + 1 < argc) out.push_back(argv[++i]);
    else if (a.rfind(flag + "=", 0) == 0) out.push_back(a.substr(flag.size() + 1));
  }
  return out;
}
}  // namespace

static int run(int argc, char** argv) {
  cxxopts::Options options("dsopen-generate", "Generate text with a trained model");
  options.add_options()("model", "Checkpoint or HF model directory", cxxopts::value<std::string>())(
      "adapter", "LoRA adapter directory (PEFT layout), merged into the model", cxxopts::value<std::string>())(
      "tokenizer", "Tokenizer .model / tokenizer.json (default: the one in MODEL)", cxxopts::value<std::string>())(
      "prompt", "Prompt text; repeat it to generate for several prompts in one batch",
      cxxopts::value<std::vector<std::string>>())("prompt-file", "Read the prompt from a file",
                                                  cxxopts::value<std::string>())(
      "prompt-ids", "Prompt as token ids ('1 5 9' or 1,5,9; repeatable for a batch): the output is token ids, not text",
      cxxopts::value<std::vector<std::string>>())(
      "chat", "Wrap the prompt in the chat template (<|User|>...<|Assistant|>); without a prompt, chat: one user "
              "turn per line of stdin, the conversation kept (/reset starts over, /exit or EOF ends)")(
      "system", "System message of --chat", cxxopts::value<std::string>())(
      "max-new-tokens", "Tokens to generate at most (default: generation_config.json's max_new_tokens, else 128)",
      cxxopts::value<int64_t>()->default_value("128"))(
      "temperature", "0: greedy (default: generation_config.json's, else 0.8)", cxxopts::value<double>()->default_value("0.8"))(
      "top-k", "0: off (default: generation_config.json's, else 50)", cxxopts::value<int64_t>()->default_value("50"))(
      "top-p", "1: off (default: generation_config.json's, else 0.95)", cxxopts::value<double>()->default_value("0.95"))(
      "repetition-penalty", "1: off (default: generation_config.json's, else 1.1)",
      cxxopts::value<double>()->default_value("1.1"))(
      "seed", "Sampling seed", cxxopts::value<uint64_t>()->default_value("0"))(
      "stop", "Stop string (repeatable)", cxxopts::value<std::vector<std::string>>())(
      "no-bos", "Do not prepend the BOS token")("ignore-eos", "Keep generating after EOS (fixed-length benchmarks)")(
      "dtype", "fp32 | bf16: the float weights and the KV cache", cxxopts::value<std::string>()->default_value("fp32"))(
      "json", "Print one JSON object (tokens, texts, timings) instead of the text")(
      "dequantize", "Dequantize a quantized model on load (float matmuls) instead of keeping int4 / per-channel int8 codes "
                     "for the weight-only kernels")(
      "warmup", "Untimed generations before the timed ones", cxxopts::value<int>()->default_value("0"))(
      "repeat", "Timed generations; the fastest prefill and decode are reported", cxxopts::value<int>()->default_value("1"))(
      "profile", "After timing, profile one more generation into a Chrome trace (bench/top_ops.py summarises it)",
      cxxopts::value<std::string>())(
      "threads", "CPU threads (0: all)", cxxopts::value<int>()->default_value("0"));
  cli::add_common(options);
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  if (!args.count("model")) throw usage_error("--model", "is required", "see --help");
  const int sources = (args.count("prompt") > 0) + (args.count("prompt-file") > 0) + (args.count("prompt-ids") > 0);
  const bool interactive = args.count("chat") && sources == 0;
  if (!interactive && sources != 1)
    throw usage_error("dsopen-generate", "give --prompt (one or more), --prompt-file or --prompt-ids",
                      "or --chat alone to chat on stdin");
  const bool as_ids = args.count("prompt-ids") > 0, json = args.count("json") > 0;
  if (interactive && (json || args.count("profile")))
    throw usage_error("--chat", "--json and --profile need a prompt");
  if (as_ids && (args.count("chat") || args.count("stop")))
    throw usage_error("--prompt-ids", "--chat and --stop work on text", "give the prompt as --prompt");
  const std::string dtype_name = args["dtype"].as<std::string>();
  if (dtype_name != "fp32" && dtype_name != "bf16")
    throw usage_error("--dtype", "'" + dtype_name + "' is not fp32 or bf16");
  const int warmup = args["warmup"].as<int>(), repeat = args["repeat"].as<int>();
  if (warmup < 0 || repeat < 1) throw usage_error("--warmup/--repeat", "need --warmup >= 0 and --repeat >= 1");
  logging::setup_console("warn");
  const int threads = env::configure_threads(args["threads"].as<int>());
  const std::string dir = args["model"].as<std::string>();
  const std::string adapter = args.count("adapter") ? args["adapter"].as<std::string>() : "";
  // Default tokenizer: the model's, else the adapter's (LoRA checkpoints carry the run's tokenizer.model).
  std::string tok_path = args.count("tokenizer") ? args["tokenizer"].as<std::string>() : model::ModelDir(dir).tokenizer_path(adapter);
  if (tok_path.empty()) tok_path = dir;  // load_tokenizer names what is missing
  auto tok = data::load_tokenizer(tok_path);
  // Quantized files keep their codes (int4; int8 with --group-size -1) unless an adapter is merged into them (which
  // needs float weights).
  auto model = inference::load_quantized_model(dir, torch::kCPU,
                                              adapter.empty() && !args.count("dequantize")
                                                  ? inference::QuantizedLayers::Kernels
                                                  : inference::QuantizedLayers::Dequantized);
  if (!adapter.empty()) {
    model::load_adapter(*model, adapter);
    model::merge_lora(*model);  // one matrix per projection: the decode speed of the base
  }
  if (dtype_name == "bf16") model->to(torch::kBFloat16);
  if (tok->vocab_size() > model->config().vocab_size)
    throw usage_error(tok_path, "tokenizer vocabulary (" + std::to_string(tok->vocab_size()) +
                                    ") exceeds the model's vocab_size (" + std::to_string(model->config().vocab_size) + ")",
                      "use the tokenizer the model was trained with");

  std::vector<std::string> prompts = args.count("prompt")        ? values_of(argc, argv, "prompt")
                                     : args.count("prompt-ids") ? values_of(argc, argv, "prompt-ids")
                                     : args.count("prompt-file") ? std::vector<std::string>{env::read_file(args["prompt-file"].as<std::string>())}
                                                                 : std::vector<std::string>{};
  data::ChatTemplate chat_template;  // the SFT default, as configs/lora.yaml trains with
  chat_template.add_bos = !args.count("no-bos") && tok->bos_id() >= 0;
  const std::string system = args.count("system") ? args["system"].as<std::string>() : "";
  std::vector<std::vector<int32_t>> ids;
  for (auto& prompt : prompts) {
    if (as_ids) {
      ids.push_back(parse_ids(prompt));
      for (int32_t t : ids.back())
        if (t >= model->config().vocab_size)
          throw usage_error("--prompt-ids", "token id " + std::to_string(t) + " >= vocab_size " +
                                                std::to_string(model->config().vocab_size));
      continue;
    }
    if (args.count("chat")) {  // rendered and tokenized piece by piece, as SFT data is
      data::Conversation conv;
      if (!system.empty()) conv.messages.push_back({"system", system});
      conv.messages.push_back({"user", prompt});
      ids.push_back(inference::chat_prompt(conv, *tok, chat_template));
      continue;
    }
    ids.emplace_back();
    if (!args.count("no-bos") && tok->bos_id() >= 0) ids.back().push_back(tok->bos_id());
    for (int32_t t : tok->encode(prompt)) ids.back().push_back(t);
  }

  // Defaults: the model directory's generation_config.json (as transformers reads it), else dsopen's; flags win.
  const auto gen = model::read_generation_config(dir);
  inference::SamplingOptions so;
  so.temperature = args["temperature"].as<double>();
  so.top_k = args["top-k"].as<int64_t>();
  so.top_p = args["top-p"].as<double>();
  so.repetition_penalty = args["repetition-penalty"].as<double>();
  if (gen) {
    if (!args.count("temperature")) so.temperature = gen->do_sample ? gen->temperature : 0.0;
    if (!args.count("top-k")) so.top_k = gen->top_k;
    if (!args.count("top-p")) so.top_p = gen->top_p;
    if (!args.count("repetition-penalty")) so.repetition_penalty = gen->repetition_penalty;
  }
  so.seed = args["seed"].as<uint64_t>();
  inference::Sampler sampler(so);
  inference::GenerateOptions go;
  go.max_new_tokens = args["max-new-tokens"].as<int64_t>();
  if (gen && gen->max_new_tokens && !args.count("max-new-tokens")) go.max_new_tokens = *gen->max_new_tokens;
  // End-of-text ids: generation_config.json's, else config.json's (one id or a list), else the tokenizer's.
  const std::vector<int64_t> eos = gen && gen->eos_token_id ? *gen->eos_token_id : model->config().eos_token_id;
  for (int64_t id : eos) go.eos_ids.push_back(static_cast<int32_t>(id));
  if (args.count("stop")) go.stop = values_of(argc, argv, "stop");
  go.stop_at_eos = !args.count("ignore-eos");
  go.decode_text = !as_ids;
  if (interactive) {
    inference::ChatOptions co;
    co.tmpl = chat_template;
    co.system = system;
    co.generate = go;
    co.show_prompt = ::isatty(STDIN_FILENO);
    inference::chat_loop(model, *tok, sampler, co, std::cin, std::cout);
    return 0;
  }
  if (args.count("chat")) go.stop.push_back(inference::chat_stop(chat_template));

  // Warm-up and repeated runs give the same tokens (greedy) or other samples; the last run's output is printed.
  for (int i = 0; i < warmup; ++i) inference::generate_batch(model, *tok, ids, sampler, go);
  double prefill_s = 1e300, decode_s = 1e300;
  std::vector<inference::GenerateResult> results;
  for (int i = 0; i < repeat; ++i) {
    const bool stream = !json && as_ids == false && prompts.size() == 1 && i + 1 == repeat;  // one prompt streams
    if (stream) std::cout << prompts[0] << std::flush;
    results = inference::generate_batch(model, *tok, ids, sampler, go, [&](size_t, const std::string& piece) {
      if (stream) std::cout << piece << std::flush;
    });
    if (stream) std::cout << std::endl;
    prefill_s = std::min(prefill_s, results.front().prefill_s);
    decode_s = std::min(decode_s, results.front().decode_s);
  }
  if (args.count("profile")) {
    torch::autograd::profiler::RecordProfile guard(args["profile"].as<std::string>());
    inference::generate_batch(model, *tok, ids, sampler, go);
  }
  // A sequence that ran into the context ends early; say so rather than leave a short answer unexplained.
  const int64_t ctx = model->config().max_position_embeddings;
  for (const auto& r : results)
    if (static_cast<int64_t>(r.tokens.size()) < go.max_new_tokens &&
        r.prompt_tokens + static_cast<int64_t>(r.tokens.size()) >= ctx) {
      std::fprintf(stderr, "note: generation stopped at the model's context of %lld tokens (shorten the prompt for more)\n",
                   static_cast<long long>(ctx));
      break;
    }
  int64_t prompt_tokens = 0;
  size_t generated = 0;
  for (const auto& r : results) prompt_tokens += r.prompt_tokens, generated += r.tokens.size();
  const int64_t B = static_cast<int64_t>(results.size()), forwards = results.front().decode_forwards;
  if (json) {
    nlohmann::json out = {{"impl", "dsopen"}, {"model", dir}, {"dtype", dtype_name}, {"threads", threads},
                          {"batch", B}, {"prompt_tokens", prompt_tokens}, {"generated_tokens", generated},
                          {"decode_forwards", forwards}, {"prefill_s", prefill_s}, {"decode_s", decode_s},
                          {"prefill_tokens_per_s", prompt_tokens / std::max(prefill_s, 1e-9)},
                          // tokens the decode forwards produced: one per sequence and forward
                          {"decode_tokens_per_s", B * forwards / std::max(decode_s, 1e-9)},
                          {"rss_mb", env::resident_mb()}};
    out["sampling"] = {{"temperature", so.temperature}, {"top_k", so.top_k}, {"top_p", so.top_p},
                       {"repetition_penalty", so.repetition_penalty}, {"seed", so.seed},
                       {"eos_token_ids", go.eos_ids}, {"defaults_from", gen ? gen->source : "dsopen"}};
    out["prompt_ids"] = ids;
    out["tokens"] = nlohmann::json::array();
    for (const auto& r : results) out["tokens"].push_back(r.tokens);
    if (!as_ids) {
      out["texts"] = nlohmann::json::array();
      for (const auto& r : results) out["texts"].push_back(r.text);
    }
    std::cout << out.dump() << std::endl;
    return 0;
  }
  for (size_t i = 0; i < results.size(); ++i) {
    if (as_ids) {
      std::cout << "[" << i << "]";
      for (int32_t t : results[i].tokens) std::cout << " " << t;
      std::cout << std::endl;
    } else if (results.size() > 1) {
      std::cout << "[" << i << "] " << prompts[i] << results[i].text << std::endl;
    }
  }
  std::fprintf(stderr, "prompt %lld tokens in %.3f s (%.1f tokens/s) | generated %zu tokens in %.3f s (%.1f tokens/s)\n",
               static_cast<long long>(prompt_tokens), prefill_s, prompt_tokens / std::max(prefill_s, 1e-9),
               generated, decode_s, generated / std::max(decode_s, 1e-9));
  return 0;
}

int main(int argc, char** argv) { return run_main("dsopen-generate", run, argc, argv); }
