// dsopen-model-info: parameter counts, FLOPs, KV-cache size and per-rank training memory of a model config; with
// --safetensors, the checked header of a weights file (what every dsopen loader accepts).
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <optional>

#include "model/info.h"
#include "model/safetensors.h"
#include "train/data_parallel.h"
#include "utils/cli.h"
#include "utils/config.h"
#include "utils/env.h"
#include "utils/errors.h"

using namespace dsopen;

namespace {

// One file's header as JSON ({"file", "tensors", "metadata"}), or {"file", "error"} when it is refused.
nlohmann::json safetensors_json(const std::string& path) {
  try {
    const model::SafetensorsFile file(path);
    nlohmann::json tensors = nlohmann::json::object();
    for (const auto& name : file.names())
      tensors[name] = {{"dtype", file.dtype(name)}, {"shape", file.shape(name)}, {"bytes", file.byte_size(name)}};
    return {{"file", path}, {"tensors", tensors}, {"metadata", file.metadata()}};
  } catch (const Error& e) {
    return {{"file", path}, {"error", e.what()}};
  }
}

// Checks every file; prints a table (or one JSON object per line) and throws the first file's error, if any.
void print_safetensors(const std::vector<std::string>& paths, bool json) {
  std::string first_error;
  for (const auto& path : paths) {
    const nlohmann::json j = safetensors_json(path);
    if (json) {
      std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
    } else if (!j.contains("error")) {
      int64_t bytes = 0;
      for (const auto& [name, t] : j["tensors"].items()) {
        std::printf("%-60s %-8s %-20s %lld bytes\n", name.c_str(), t["dtype"].get<std::string>().c_str(),
                    t["shape"].dump().c_str(), static_cast<long long>(t["bytes"].get<int64_t>()));
        bytes += t["bytes"].get<int64_t>();
      }
      for (const auto& [k, v] : j["metadata"].items()) std::printf("metadata %s = %s\n", k.c_str(), v.get<std::string>().c_str());
      std::printf("%s: %zu tensors, %.2f MB of data\n", path.c_str(), j["tensors"].size(), bytes / 1e6);
    }
    if (j.contains("error") && first_error.empty()) first_error = j["error"].get<std::string>();
  }
  if (!first_error.empty()) throw runtime_error("", first_error);
}

}  // namespace

static int run(int argc, char** argv) {
  cxxopts::Options options("dsopen-model-info", "Parameter counts, FLOPs, KV cache and training memory of a model");
  options.add_options()("c,config", "Run config (YAML with a model: section) or an HF config.json",
                        cxxopts::value<std::string>())(
      "set", "Override a config key, e.g. --set model.num_hidden_layers=8", cxxopts::value<std::vector<std::string>>())(
      "world-size", "Ranks for the memory estimate", cxxopts::value<int64_t>()->default_value("1"))(
      "expert-parallel", "Expert-parallel ranks E (routed experts split E ways; divides --world-size)",
      cxxopts::value<int64_t>())(
      "seq-len", "Sequence length for the attention FLOPs (default: data.seq_len or 4096)",
      cxxopts::value<int64_t>())(
      "strategy", "Also plan one rank's training memory under none|ddp|zero1|zero2|zero3 (weights, gradients, "
                  "moments, the largest gathered unit, activations)", cxxopts::value<std::string>())(
      "micro-batch", "Sequences per micro-batch for --strategy's activations", cxxopts::value<int64_t>()->default_value("1"))(
      "precision", "fp32 or bf16 (autocast) for --strategy's activations and gathered units",
      cxxopts::value<std::string>()->default_value("bf16"))(
      "activation-checkpointing", "Plan --strategy with activation checkpointing")(
      "offload-optimizer", "Plan --strategy with the AdamW moments in host memory")("json", "Print one JSON object")(
      "hf-config", "Also write the model's HuggingFace config.json to this path", cxxopts::value<std::string>())(
      "safetensors", "Check .safetensors files (repeatable) and list their tensors (name, dtype, shape, bytes) instead; "
                     "with --json one object per file, {\"file\", \"error\"} for a refused one",
      cxxopts::value<std::vector<std::string>>());
  options.parse_positional({"safetensors"});  // --safetensors A B C: every file after the flag
  options.positional_help("[FILE.safetensors ...]");
  cli::add_common(options);
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  if (args.count("safetensors")) {
    if (args.count("config")) throw usage_error("--safetensors", "give --config or --safetensors, not both");
    print_safetensors(args["safetensors"].as<std::vector<std::string>>(), args.count("json") > 0);
    return 0;
  }
  if (!args.count("config")) throw usage_error("--config", "is required", "or --safetensors FILE...; see --help");
  const std::string path = args["config"].as<std::string>();
  const int64_t world = args["world-size"].as<int64_t>();
  if (world < 1) throw usage_error("--world-size", "must be >= 1");

  model::ModelConfig c;
  int64_t seq_len = 4096, config_expert_parallel = 1;
  if (path.size() > 5 && path.substr(path.size() - 5) == ".json") {
    if (args.count("set"))
      throw usage_error("--set", "applies to dsopen YAML configs only", "edit " + path + " instead");
    c = model::ModelConfig::from_hf_json_file(path);
  } else {
    config::Document doc = config::Document::load(path);
    if (args.count("set"))
      for (const auto& s : cli::values_of(argc, argv, "set")) doc.apply_set(s);  // unsplit: {a: 1, b: 2} has commas
    c = model::model_config_from_document(doc);
    seq_len = model::seq_len_from_document(doc, seq_len);
    if (doc.root()["parallel"] && doc.root()["parallel"]["expert_parallel"])
      config_expert_parallel = doc.root()["parallel"]["expert_parallel"].as<int64_t>(1);
  }
  if (args.count("seq-len")) {
    seq_len = args["seq-len"].as<int64_t>();
    if (seq_len < 1 || seq_len > (int64_t{1} << 24)) throw usage_error("--seq-len", "must be in 1..16777216");
  }
  if (args.count("hf-config")) {
    const std::string out = args["hf-config"].as<std::string>();
    env::check_output_path(out, env::OutputKind::File, {path}, "--hf-config");
    // Into a directory that holds weights it would replace that model's own config.json.
    const auto dir = std::filesystem::absolute(out).parent_path();
    if (std::filesystem::exists(dir / "model.safetensors") || std::filesystem::exists(dir / "model.safetensors.index.json"))
      throw usage_error("--hf-config", out + " is in the model directory " + dir.string(), "write it somewhere else");
    c.validate();
    env::write_file_atomic(args["hf-config"].as<std::string>(), c.to_hf_json().dump(2) + "\n");
  }
  // --expert-parallel, else the config's parallel.expert_parallel.
  int64_t expert_parallel = config_expert_parallel;
  std::string source = "parallel.expert_parallel (in " + path + ")";
  if (args.count("expert-parallel")) expert_parallel = args["expert-parallel"].as<int64_t>(), source = "--expert-parallel";
  if (expert_parallel < 1) throw usage_error(source, "must be >= 1, got " + std::to_string(expert_parallel));
  if (world % expert_parallel != 0)
    throw usage_error(source, std::to_string(expert_parallel) + " does not divide --world-size " + std::to_string(world),
                      "give --world-size a multiple of " + std::to_string(expert_parallel));
  if (expert_parallel > 1 && c.n_routed_experts == 0)
    throw usage_error(source, "the model has no routed experts", "leave expert parallelism at 1");
  if (c.n_routed_experts % expert_parallel != 0)
    throw usage_error(source, std::to_string(expert_parallel) + " does not divide the model's " +
                                  std::to_string(c.n_routed_experts) + " routed experts",
                      "give a divisor of n_routed_experts");
  nlohmann::json plan_json;
  std::string plan_text;
  if (args.count("strategy")) {
    const std::string name = args["strategy"].as<std::string>();
    std::optional<train::Strategy> found;
    std::vector<std::string> names;
    for (const auto& [n, v] : train::strategy_names()) {
      names.push_back(n);
      if (n == name) found = v;
    }
    if (!found) {
      const std::string near = config::closest_match(name, names);
      throw usage_error("--strategy", "unknown strategy '" + name + "'" + (near.empty() ? "" : " (did you mean " + near + "?)"),
                        "use none, ddp, zero1, zero2 or zero3");
    }
    const train::Strategy strategy = *found;
    const std::string precision = args["precision"].as<std::string>();
    if (precision != "fp32" && precision != "bf16") throw usage_error("--precision", "must be fp32 or bf16, got " + precision);
    model::TrainingPlanInput in;
    in.world_size = world;
    in.zero_stage = strategy == train::Strategy::Zero3 ? 3 : strategy == train::Strategy::Zero2 ? 2
                    : strategy == train::Strategy::Zero1 ? 1 : 0;
    if (world == 1 && strategy != train::Strategy::Zero3) in.zero_stage = 0;
    in.offload_optimizer = args.count("offload-optimizer") > 0;
    in.micro_batch_size = args["micro-batch"].as<int64_t>();
    if (in.micro_batch_size < 1 || in.micro_batch_size > (int64_t{1} << 20)) throw usage_error("--micro-batch", "must be in 1..1048576");
    in.seq_len = seq_len;
    in.activation_checkpointing = args.count("activation-checkpointing") > 0;
    in.activation_bytes = precision == "fp32" ? 4 : 2;
    in.expert_parallel = expert_parallel;
    const model::TrainingPlan p = model::plan_training(c, in);
    plan_json = {{"strategy", name},        {"micro_batch", in.micro_batch_size}, {"precision", precision},
                 {"activation_checkpointing", in.activation_checkpointing}, {"offload_optimizer", in.offload_optimizer},
                 {"weights", p.weights},    {"gathered_unit", p.gathered_unit},   {"grads", p.grads},
                 {"optimizer", p.optimizer}, {"optimizer_host", p.optimizer_host}, {"activations", p.activations},
                 {"total", p.device_total()}};
    const auto gib = [](double b) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.2f GiB", b / (1024.0 * 1024.0 * 1024.0));
      return std::string(buf);
    };
    plan_text = "plan per rank (" + name + ", " + std::to_string(world) + " rank" + (world > 1 ? "s" : "") + ", " +
                precision + ", micro-batch " + std::to_string(in.micro_batch_size) + " x " + std::to_string(seq_len) +
                " tokens" + (in.activation_checkpointing ? ", activation checkpointing" : "") +
                (in.offload_optimizer ? ", optimizer offload" : "") + ")\n" +
                "  weights             " + gib(p.weights) +
                (p.gathered_unit > 0 ? " (of which 2 gathered units of " + gib(p.gathered_unit) + ")" : "") + "\n" +
                "  gradients           " + gib(p.grads) +
                (p.gathered_unit > 0 ? " (slices + 2 units in their reduce-scatters)" : "") + "\n" +
                "  AdamW moments       " + gib(p.optimizer) +
                (p.optimizer_host > 0 ? " (+ " + gib(p.optimizer_host) + " in host memory: moments and an fp32 master copy)" : "") + "\n" +
                "  activations         ~" + gib(p.activations) + "\n" +
                "  total on the device " + gib(p.device_total()) + "\n";
  }
  if (args.count("json")) {
    auto j = model::model_info_json(c, world, seq_len, expert_parallel);
    if (!plan_json.is_null()) j["plan"] = plan_json;
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << model::model_info_text(c, world, seq_len, expert_parallel) << plan_text;
  }
  return 0;
}

int main(int argc, char** argv) { return run_main("dsopen-model-info", run, argc, argv); }
