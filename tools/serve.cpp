// dsopen-serve: an OpenAI-compatible HTTP server (completions, chat completions, streaming) with continuous
// batching, Prometheus metrics and a chat WebUI at /.
//   dsopen-serve --model runs/tiny/checkpoints/step_00000300 --port 8000
//   dsopen-serve --model BASE --adapter chat=runs/lora/checkpoints/step_00000150 --adapter sql=ADAPTER2
//   dsopen-serve --model M --port 0 --api-key secret --kv-cache-mb 512 --max-num-seqs 32
#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "data/hf_tokenizer.h"
#include "data/hf_tokenizer_files.h"
#include "inference/generation_setup.h"
#include "inference/loader.h"
#include "model/generation_config.h"
#include "model/lora.h"
#include "model/model_dir.h"
#include "serve/engine.h"
#include "serve/http_server.h"
#include "utils/cli.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/logging.h"

using namespace dsopen;

namespace {

cxxopts::Options make_options() {
  cxxopts::Options options("dsopen-serve", "Serve a model over the OpenAI API, with a chat WebUI at /");
  options.add_options()("model", "Checkpoint or HF model directory (float or quantized)", cxxopts::value<std::string>())(
      "adapter", "NAME=DIR: a LoRA adapter (PEFT layout) served over the model, chosen by requests whose `model` is "
                 "NAME (repeatable; DIR alone: named after its directory)",
      cxxopts::value<std::vector<std::string>>())(
      "tokenizer", "Tokenizer .model / tokenizer.json (default: the one in MODEL)", cxxopts::value<std::string>())(
      "served-model-name", "The `model` name requests use (default: the model directory's name)",
      cxxopts::value<std::string>())(
      "host", "Address to listen on", cxxopts::value<std::string>()->default_value("127.0.0.1"))(
      "port", "Port (0: any free port, printed at start)", cxxopts::value<int>()->default_value("8000"))(
      "api-key", "Require 'Authorization: Bearer KEY' on /v1/* (default: $DSOPEN_API_KEY, else none)",
      cxxopts::value<std::string>())(
      "kv-cache-mb", "KV-cache budget in MiB: how many sequences decode at once", cxxopts::value<int64_t>()->default_value("512"))(
      "max-num-seqs", "Sequences decoding at once at most (fewer when the KV budget holds fewer)",
      cxxopts::value<int64_t>()->default_value("32"))(
      "max-model-len", "Prompt + generated tokens per sequence (default: the model's context)", cxxopts::value<int64_t>())(
      "max-waiting", "Requests waiting for a free sequence slot before new ones get 429",
      cxxopts::value<int64_t>()->default_value("256"))(
      "prefill-chunk", "Prompt tokens prefilled per scheduler step (longer prompts take several, decodes continue)",
      cxxopts::value<int64_t>()->default_value("512"))(
      "max-body-mb", "Largest request body in MiB (larger: 413)", cxxopts::value<double>()->default_value("4"))(
      "http-threads", "Connections served at once (each streaming client holds one)",
      cxxopts::value<int>()->default_value("64"))(
      "shutdown-grace", "Seconds running requests may finish after SIGINT/SIGTERM",
      cxxopts::value<double>()->default_value("10"))(
      "dtype", "fp32 | bf16: the float weights and the KV cache", cxxopts::value<std::string>()->default_value("fp32"))(
      "dequantize", "Dequantize a quantized model on load instead of keeping int4 / int8 codes")(
      "threads", "CPU threads for the model (0: all usable CPUs but one, which serves the connections)",
      cxxopts::value<int>()->default_value("0"));
  cli::add_common(options);
  return options;
}

void check_args(const cxxopts::ParseResult& args) {
  if (!args.count("model")) throw usage_error("--model", "is required", "see --help");
  const std::string dtype = args["dtype"].as<std::string>();
  if (dtype != "fp32" && dtype != "bf16") throw usage_error("--dtype", "'" + dtype + "' is not fp32 or bf16");
  const int port = args["port"].as<int>();
  if (port < 0 || port > 65535) throw usage_error("--port", std::to_string(port) + " is not in 0..65535");
  if (args["kv-cache-mb"].as<int64_t>() < 1) throw usage_error("--kv-cache-mb", "must be >= 1");
  if (args["max-num-seqs"].as<int64_t>() < 1) throw usage_error("--max-num-seqs", "must be >= 1");
  if (args["max-waiting"].as<int64_t>() < 1) throw usage_error("--max-waiting", "must be >= 1");
  if (args["prefill-chunk"].as<int64_t>() < 1) throw usage_error("--prefill-chunk", "must be >= 1");
  if (!(args["max-body-mb"].as<double>() >= 0.001 && args["max-body-mb"].as<double>() <= 4096))
    throw usage_error("--max-body-mb", "must be in 0.001..4096");
  if (args["host"].as<std::string>().empty()) throw usage_error("--host", "is empty", "give an address: 127.0.0.1, 0.0.0.0, ::1");
  // Each is a thread with its own stack, started at once: a large count exhausts the process limit.
  if (args["http-threads"].as<int>() < 1 || args["http-threads"].as<int>() > 4096)
    throw usage_error("--http-threads", "must be in 1..4096, got " + std::to_string(args["http-threads"].as<int>()));
  if (!(args["shutdown-grace"].as<double>() >= 0 && args["shutdown-grace"].as<double>() <= 86400))
    throw usage_error("--shutdown-grace", "must be in 0..86400 seconds");
  if (args["threads"].as<int>() < 0) throw usage_error("--threads", "must be >= 0 (0: all usable CPUs but one)");
  if (args.count("max-model-len") && args["max-model-len"].as<int64_t>() < 2)
    throw usage_error("--max-model-len", "must be >= 2");
}

// The name a directory is served under: its own as given (runs/tiny -> "tiny"), or for a checkpoints directory or
// its `latest` file the step's.
std::string served_name(const std::string& given) {
  auto p = std::filesystem::path(given).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();  // a trailing slash
  std::string name = p.filename().string();
  if (name.empty() || name == "." || name == ".." || name == "latest" || name == "checkpoints")
    name = std::filesystem::path(model::resolve_latest(given)).lexically_normal().filename().string();
  return name;
}

// --adapter NAME=DIR (or DIR, named after its directory) -> (name, dir); names must differ.
std::vector<std::pair<std::string, std::string>> adapter_args(const cxxopts::ParseResult& args) {
  std::vector<std::pair<std::string, std::string>> out;
  if (!args.count("adapter")) return out;
  for (const auto& a : args["adapter"].as<std::vector<std::string>>()) {
    const auto eq = a.find('=');
    std::string name = eq == std::string::npos ? "" : a.substr(0, eq);
    const std::string given = eq == std::string::npos ? a : a.substr(eq + 1);
    if (given.empty()) throw usage_error("--adapter", "'" + a + "' has no directory", "give NAME=DIR");
    const std::string dir = model::resolve_latest(given);  // a run, its checkpoints or `latest`, as for --model
    if (name.empty()) name = served_name(given);
    for (const auto& [n, d] : out)
      if (n == name) throw usage_error("--adapter", "two adapters are named '" + name + "'", "give NAME=DIR with distinct names");
    out.emplace_back(name, dir);
  }
  return out;
}

}  // namespace

static int run(int argc, char** argv) {
  auto options = make_options();
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  check_args(args);
  logging::setup_console("info");
  // SIGINT/SIGTERM are taken by one thread (sigwait below): blocked here, before any thread starts, so that no
  // pool thread receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  // The model's threads leave one CPU to the connection threads (parsing, tokenizing, streaming): measured on 2
  // vCPUs (docs/BENCHMARKS.md), 1 model thread served 2.5x the tokens/s of 2 one request at a time, 1.4x under load.
  const int threads = args["threads"].as<int>();
  env::configure_threads(threads > 0 ? threads : std::max(1, env::available_cpus() - 1));
  const std::string dir = args["model"].as<std::string>();
  const auto adapters = adapter_args(args);
  std::string tok_path = args.count("tokenizer") ? args["tokenizer"].as<std::string>()
                                                 : model::ModelDir(dir).tokenizer_path(adapters.empty() ? "" : adapters[0].second);
  if (tok_path.empty()) tok_path = dir;
  std::shared_ptr<const data::Tokenizer> tok = data::load_tokenizer(tok_path);
  // Adapters apply to float weights: a quantized model is dequantized on load when it serves any.
  auto model = inference::load_model(dir, torch::kCPU, false,
                                     adapters.empty() && !args.count("dequantize") ? inference::QuantizedLayers::Kernels
                                                                                    : inference::QuantizedLayers::Dequantized);
  for (size_t k = 0; k < adapters.size(); ++k) model::add_served_adapter(*model, adapters[k].second, static_cast<int64_t>(k) + 1);
  const bool bf16 = args["dtype"].as<std::string>() == "bf16";
  if (bf16) model->to(torch::kBFloat16);
  inference::check_tokenizer_fits(*tok, model->config(), tok_path);

  // KV budget -> sequences at once.
  const int64_t context = model->config().context_length();
  const int64_t capacity = args.count("max-model-len") ? args["max-model-len"].as<int64_t>() : context;
  if (capacity > context)
    throw usage_error("--max-model-len", std::to_string(capacity) + " is past the model's context of " +
                                             std::to_string(context) + " tokens");
  const auto cache_dtype = bf16 ? torch::kBFloat16 : torch::kFloat32;
  const int64_t row_bytes = serve::KVSlots::bytes_per_row(model->config(), capacity, cache_dtype);
  const int64_t budget = args["kv-cache-mb"].as<int64_t>() << 20;
  if (budget < row_bytes)
    throw usage_error("--kv-cache-mb", "one sequence of " + std::to_string(capacity) + " tokens needs " +
                                           std::to_string((row_bytes + (1 << 20) - 1) >> 20) + " MiB of KV cache",
                      "raise --kv-cache-mb or lower --max-model-len");
  serve::EngineOptions eo;
  eo.slots = std::min(args["max-num-seqs"].as<int64_t>(), budget / row_bytes);
  eo.capacity = capacity;
  eo.cache_dtype = cache_dtype;
  eo.max_waiting = args["max-waiting"].as<int64_t>();
  if (eo.max_waiting > 1000000) throw usage_error("--max-waiting", "must be <= 1000000");
  eo.prefill_chunk = args["prefill-chunk"].as<int64_t>();

  serve::ServedModel served;
  served.name = args.count("served-model-name")
                    ? args["served-model-name"].as<std::string>()
                    : served_name(dir);
  if (served.name.empty()) served.name = "model";
  served.tok = tok.get();
  served.chat_format = inference::chat_format_for(dir, "", tok_path, *tok, /*bos=*/true);
  for (const auto& [name, adapter_dir] : adapters) {
    if (name == served.name)
      throw usage_error("--adapter", "adapter name '" + name + "' is the model's own name", "name it NAME=DIR");
    served.adapters.push_back({name, inference::chat_format_for(dir, adapter_dir, tok_path, *tok, /*bos=*/true)});
    spdlog::info("adapter '{}': {} ({})", name, adapter_dir, served.adapters.back().chat_format.description());
  }
  served.generation = model::read_generation_config(dir);
  served.eos_ids = inference::resolve_eos_ids(served.generation, model->config());
  served.capacity = capacity;
  served.max_sequences = eo.max_waiting;
  served.created = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();

  serve::ServerOptions so;
  so.host = args["host"].as<std::string>();
  so.port = args["port"].as<int>();
  so.api_key = args.count("api-key") ? args["api-key"].as<std::string>() : env::get_string("DSOPEN_API_KEY");
  so.max_body_bytes = static_cast<size_t>(args["max-body-mb"].as<double>() * (1 << 20));
  so.http_threads = args["http-threads"].as<int>();
  so.shutdown_grace = std::chrono::milliseconds(static_cast<int64_t>(args["shutdown-grace"].as<double>() * 1000));

  serve::Engine engine(model, tok, eo);
  serve::HttpServer server(engine, served, so);
  const int port = server.bind();
  spdlog::info("chat: {}; model threads {}", served.chat_format.description(), at::get_num_threads());
  spdlog::info("serving '{}' on http://{}:{} ({} sequences at once, {} tokens each, KV cache {} MiB)", served.name, so.host,
            port, eo.slots, capacity, (eo.slots * row_bytes) >> 20);
  std::printf("listening on http://%s:%d\n", so.host.c_str(), port);
  std::fflush(stdout);

  std::atomic<bool> serving_done{false};
  std::thread shutdown_thread;
  std::thread signal_thread([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    if (serving_done) return;
    spdlog::info("{}: finishing running requests (up to {:.0f} s; a second signal stops at once)",
                 sig == SIGINT ? "SIGINT" : "SIGTERM", so.shutdown_grace.count() / 1000.0);
    shutdown_thread = std::thread([&] { server.shutdown(); });
    sigwait(&signals, &sig);
    if (serving_done) return;
    spdlog::warn("second signal: stopping now, running requests are cut off");
    std::_Exit(130);
  });
  server.serve();
  // serve() also returns when listening fails after binding; wake the signal thread so it can be joined.
  serving_done = true;
  pthread_kill(signal_thread.native_handle(), SIGTERM);
  signal_thread.join();
  if (shutdown_thread.joinable()) shutdown_thread.join();
  spdlog::info("stopped");
  return 0;
}

int main(int argc, char** argv) {
  return run_main("dsopen-serve", run, argc, argv);
}
