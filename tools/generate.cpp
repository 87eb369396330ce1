// dsopen-generate: sample text from a checkpoint or HF model directory with the KV cache, streaming tokens.
//   dsopen-generate --model runs/tiny/checkpoints/step_00000300 --prompt "Life is" --max-new-tokens 64
//   dsopen-generate --model BASE --adapter runs/lora/checkpoints/step_00000150 --chat --prompt "Hello"
//   dsopen-generate --model BASE --adapter ADAPTER --chat          (a conversation: one user turn per stdin line)
//   dsopen-generate --model M --prompt-ids 1,5,9 --max-new-tokens 64 --ignore-eos --temperature 0 --json
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include <torch/csrc/autograd/profiler_legacy.h>

#include "data/hf_tokenizer.h"
#include "inference/chat.h"
#include "inference/generation_setup.h"
#include "inference/generator.h"
#include "inference/loader.h"
#include "model/lora.h"
#include "model/model_dir.h"
#include "utils/cli.h"
#include "utils/cpu.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/logging.h"

using namespace dsopen;

namespace {

cxxopts::Options make_options() {
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
      cxxopts::value<int64_t>())(
      "temperature", "0: greedy (default: generation_config.json's, else 0.8)", cxxopts::value<double>())(
      "top-k", "0: off (default: generation_config.json's, else 50)", cxxopts::value<int64_t>())(
      "top-p", "1: off (default: generation_config.json's, else 0.95)", cxxopts::value<double>())(
      "repetition-penalty", "1: off (default: generation_config.json's, else 1.1)", cxxopts::value<double>())(
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
  return options;
}

// Usage errors that need no model: how the prompt is given and which options go together.
void check_args(const cxxopts::ParseResult& args) {
  if (!args.count("model")) throw usage_error("--model", "is required", "see --help");
  const int sources = (args.count("prompt") > 0) + (args.count("prompt-file") > 0) + (args.count("prompt-ids") > 0);
  const bool interactive = args.count("chat") && sources == 0;
  if (!interactive && sources != 1)
    throw usage_error("command line", "give --prompt (one or more), --prompt-file or --prompt-ids",
                      "or --chat alone to chat on stdin");
  if (interactive && (args.count("json") || args.count("profile")))
    throw usage_error("--chat", "--json and --profile need a prompt");
  if (args.count("prompt-ids") && (args.count("chat") || args.count("stop")))
    throw usage_error("--prompt-ids", "--chat and --stop work on text", "give the prompt as --prompt");
  const std::string dtype = args["dtype"].as<std::string>();
  if (dtype != "fp32" && dtype != "bf16") throw usage_error("--dtype", "'" + dtype + "' is not fp32 or bf16");
  if (args.count("max-new-tokens") && args["max-new-tokens"].as<int64_t>() < 1)
    throw usage_error("--max-new-tokens", "must be >= 1");
  if (args["warmup"].as<int>() < 0 || args["repeat"].as<int>() < 1)
    throw usage_error("--warmup/--repeat", "need --warmup >= 0 and --repeat >= 1");
  if (args.count("profile")) {
    std::vector<std::string> inputs{model::resolve_latest(args["model"].as<std::string>())};
    for (const char* name : {"adapter", "tokenizer", "prompt-file"})
      if (args.count(name)) inputs.push_back(args[name].as<std::string>());
    cli::prepare_profile_output(args["profile"].as<std::string>(), inputs);
  }
}

template <class T>
std::optional<T> given(const cxxopts::ParseResult& args, const std::string& name) {
  return args.count(name) ? std::optional<T>(args[name].as<T>()) : std::nullopt;
}

inference::SamplingRequest sampling_request(const cxxopts::ParseResult& args) {
  inference::SamplingRequest r;
  r.temperature = given<double>(args, "temperature");
  r.top_k = given<int64_t>(args, "top-k");
  r.top_p = given<double>(args, "top-p");
  r.repetition_penalty = given<double>(args, "repetition-penalty");
  r.max_new_tokens = given<int64_t>(args, "max-new-tokens");
  r.seed = args["seed"].as<uint64_t>();
  return r;
}

// The prompt texts as given (--prompt repeated, --prompt-file, --prompt-ids repeated) and their token ids.
std::vector<std::vector<int32_t>> prompt_ids(int argc, char** argv, const cxxopts::ParseResult& args,
                                             const data::Tokenizer& tok, const data::ChatFormat& format, int64_t vocab,
                                             std::vector<std::string>& texts) {
  texts = args.count("prompt")        ? cli::values_of(argc, argv, "prompt")
          : args.count("prompt-ids") ? cli::values_of(argc, argv, "prompt-ids")
          : args.count("prompt-file") ? std::vector<std::string>{env::read_file(args["prompt-file"].as<std::string>())}
                                      : std::vector<std::string>{};
  inference::PromptOptions po;
  po.bos = !args.count("no-bos");
  po.chat = args.count("chat") > 0;
  po.system = args.count("system") ? args["system"].as<std::string>() : "";
  po.format = format;
  std::vector<std::vector<int32_t>> ids;
  for (const auto& text : texts) {
    if (args.count("prompt-ids")) {
      ids.push_back(inference::parse_token_ids(text));
      inference::check_ids_fit(ids.back(), vocab);
    } else {
      ids.push_back(inference::prompt_ids(text, tok, po));
    }
  }
  return ids;
}

struct Timed {
  std::vector<inference::GenerateResult> results;
  double prefill_s = 1e300, decode_s = 1e300;  // the fastest of the repeats
};

// Warm-up and repeated runs give the same tokens (greedy) or other samples; the last run streams one prompt's text.
Timed generate_timed(model::CausalLM& model, const data::Tokenizer& tok, const std::vector<std::vector<int32_t>>& ids,
                     inference::Sampler& sampler, const inference::GenerateOptions& go, int warmup, int repeat,
                     const std::string* stream_prompt) {
  for (int i = 0; i < warmup; ++i) inference::generate_batch(model, tok, ids, sampler, go);
  Timed t;
  for (int i = 0; i < repeat; ++i) {
    const bool stream = stream_prompt && i + 1 == repeat;
    if (stream) std::cout << *stream_prompt << std::flush;
    t.results = inference::generate_batch(model, tok, ids, sampler, go, [&](size_t, const std::string& piece) {
      if (stream) std::cout << piece << std::flush;
    });
    if (stream) std::cout << std::endl;
    t.prefill_s = std::min(t.prefill_s, t.results.front().prefill_s);
    t.decode_s = std::min(t.decode_s, t.results.front().decode_s);
  }
  return t;
}

nlohmann::json report_json(const Timed& t, const std::vector<std::vector<int32_t>>& ids, bool text,
                           const inference::SamplingOptions& so, const inference::GenerateOptions& go,
                           const std::optional<model::GenerationConfig>& gen) {
  int64_t prompt_tokens = 0;
  size_t generated = 0;
  for (const auto& r : t.results) prompt_tokens += r.prompt_tokens, generated += r.tokens.size();
  const int64_t B = static_cast<int64_t>(t.results.size()), forwards = t.results.front().decode_forwards;
  nlohmann::json out = {{"impl", "dsopen"}, {"batch", B}, {"prompt_tokens", prompt_tokens},
                        {"generated_tokens", generated}, {"decode_forwards", forwards}, {"prefill_s", t.prefill_s},
                        {"decode_s", t.decode_s}, {"prefill_tokens_per_s", prompt_tokens / std::max(t.prefill_s, 1e-9)},
                        // tokens the decode forwards produced: one per sequence and forward
                        {"decode_tokens_per_s", B * forwards / std::max(t.decode_s, 1e-9)}, {"rss_mb", env::resident_mb()}};
  out["sampling"] = {{"temperature", so.temperature}, {"top_k", so.top_k}, {"top_p", so.top_p},
                     {"repetition_penalty", so.repetition_penalty}, {"seed", so.seed},
                     {"eos_token_ids", go.eos_ids}, {"defaults_from", gen ? gen->source : "dsopen"}};
  out["prompt_ids"] = ids;
  out["tokens"] = nlohmann::json::array();
  for (const auto& r : t.results) out["tokens"].push_back(r.tokens);
  if (text) {
    out["texts"] = nlohmann::json::array();
    for (const auto& r : t.results) out["texts"].push_back(r.text);
  }
  return out;
}

// A sequence that ran into the context ends early; say so rather than leave a short answer unexplained.
void note_context_stop(const Timed& t, int64_t max_new_tokens, int64_t context) {
  for (const auto& r : t.results)
    if (static_cast<int64_t>(r.tokens.size()) < max_new_tokens && r.prompt_tokens + static_cast<int64_t>(r.tokens.size()) >= context) {
      std::fprintf(stderr, "note: generation stopped at the model's context of %lld tokens (shorten the prompt for more)\n",
                   static_cast<long long>(context));
      return;
    }
}

void report_text(const Timed& t, const std::vector<std::string>& prompts, bool as_ids) {
  int64_t prompt_tokens = 0;
  size_t generated = 0;
  for (size_t i = 0; i < t.results.size(); ++i) {
    const auto& r = t.results[i];
    prompt_tokens += r.prompt_tokens, generated += r.tokens.size();
    if (as_ids) {
      std::cout << "[" << i << "]";
      for (int32_t tok : r.tokens) std::cout << " " << tok;
      std::cout << std::endl;
    } else if (t.results.size() > 1) {
      std::cout << "[" << i << "] " << prompts[i] << r.text << std::endl;
    }
  }
  std::fprintf(stderr, "prompt %lld tokens in %.3f s (%.1f tokens/s) | generated %zu tokens in %.3f s (%.1f tokens/s)\n",
               static_cast<long long>(prompt_tokens), t.prefill_s, prompt_tokens / std::max(t.prefill_s, 1e-9),
               generated, t.decode_s, generated / std::max(t.decode_s, 1e-9));
}

}  // namespace

static int run(int argc, char** argv) {
  auto options = make_options();
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  check_args(args);
  logging::setup_console("warn");
  const int threads = env::configure_threads(args["threads"].as<int>());
  const std::string dir = args["model"].as<std::string>();
  const std::string adapter = args.count("adapter") ? model::resolve_latest(args["adapter"].as<std::string>()) : "";
  // Default tokenizer: the model's, else the adapter's (LoRA checkpoints carry the run's tokenizer.model).
  std::string tok_path = args.count("tokenizer") ? args["tokenizer"].as<std::string>() : model::ModelDir(dir).tokenizer_path(adapter);
  if (tok_path.empty()) tok_path = dir;  // load_tokenizer names what is missing
  auto tok = data::load_tokenizer(tok_path);
  // Quantized files keep their codes unless an adapter is merged into them (which needs float weights).
  auto model = inference::load_model(dir, torch::kCPU, false,
                                     adapter.empty() && !args.count("dequantize") ? inference::QuantizedLayers::Kernels
                                                                                   : inference::QuantizedLayers::Dequantized);
  if (!adapter.empty()) {
    model::load_adapter(*model, adapter);
    model::merge_lora(*model);  // one matrix per projection: the decode speed of the base
  }
  if (args["dtype"].as<std::string>() == "bf16") model->to(torch::kBFloat16);
  inference::check_tokenizer_fits(*tok, model->config(), tok_path);

  const data::ChatFormat format = inference::chat_format_for(dir, adapter, tok_path, *tok, !args.count("no-bos"));
  std::vector<std::string> prompts;
  const auto ids = prompt_ids(argc, argv, args, *tok, format, model->config().vocab_size, prompts);
  const auto gen = model::read_generation_config(dir);
  const auto request = sampling_request(args);
  const auto so = inference::resolve_sampling(gen, request);
  inference::Sampler sampler(so);
  inference::GenerateOptions go;
  go.max_new_tokens = inference::resolve_max_new_tokens(gen, request);
  go.max_length = inference::resolve_max_length(gen, request);
  go.eos_ids = inference::resolve_eos_ids(gen, model->config());
  if (gen) go.stop = gen->stop_strings;
  if (args.count("stop")) go.stop = cli::values_of(argc, argv, "stop");
  go.stop_at_eos = !args.count("ignore-eos");
  go.adapt_threads = args["threads"].as<int>() == 0;  // an explicit --threads stands
  const bool as_ids = args.count("prompt-ids") > 0, json = args.count("json") > 0;
  go.decode_text = !as_ids;
  if (args.count("chat") && ids.empty()) {  // a conversation on stdin
    inference::ChatOptions co{format, args.count("system") ? args["system"].as<std::string>() : "", go,
                              static_cast<bool>(::isatty(STDIN_FILENO))};
    inference::chat_loop(model, *tok, sampler, co, std::cin, std::cout);
    return 0;
  }
  if (args.count("chat"))
    for (const auto& stop : format.stop_strings()) go.stop.push_back(stop);
  const bool stream = !json && !as_ids && prompts.size() == 1;  // one prompt streams
  // A completion continues its prompt; a chat reply is an answer to it, so the user turn gets a line of its own.
  std::vector<std::string> echoes = prompts;
  if (args.count("chat"))
    for (auto& e : echoes) e = "> " + e + "\n";
  cpu::ContentionMeter contention;
  const Timed t = generate_timed(model, *tok, ids, sampler, go, args["warmup"].as<int>(), args["repeat"].as<int>(),
                                 stream ? &echoes[0] : nullptr);
  const double waited = contention.waited_share(threads);  // decoding backs off on its own (cpu::ThreadBackoff)
  if (args.count("profile")) {
    torch::autograd::profiler::RecordProfile guard(args["profile"].as<std::string>());
    inference::generate_batch(model, *tok, ids, sampler, go);
  }
  note_context_stop(t, go.max_new_tokens, model->config().context_length());
  if (json) {
    auto out = report_json(t, ids, !as_ids, so, go, gen);
    out["model"] = dir;
    out["dtype"] = args["dtype"].as<std::string>();
    out["threads"] = threads;
    out["threads_at_end"] = at::get_num_threads();
    out["cpu_wait_share"] = waited;  // share of the threads' time spent waiting for a CPU other processes held
    out["omp_wait_policy"] = cpu::omp_wait_policy();
    std::cout << out.dump() << std::endl;
    return 0;
  }
  report_text(t, echoes, as_ids);
  return 0;
}

int main(int argc, char** argv) {
  return run_main("dsopen-generate", run, argc, argv);
}
