// dsopen-model-info: parameter counts, FLOPs, KV-cache size and per-rank training memory of a model config.
#include <cstdio>
#include <fstream>
#include <iostream>

#include "model/info.h"
#include "utils/cli.h"
#include "utils/config.h"
#include "utils/errors.h"

using namespace dsopen;

static int run(int argc, char** argv) {
  cxxopts::Options options("dsopen-model-info", "Parameter counts, FLOPs, KV cache and training memory of a model");
  options.add_options()("c,config", "Run config (YAML with a model: section) or an HF config.json",
                        cxxopts::value<std::string>())(
      "set", "Override a config key, e.g. --set model.num_hidden_layers=8", cxxopts::value<std::vector<std::string>>())(
      "world-size", "Ranks for the memory estimate", cxxopts::value<int64_t>()->default_value("1"))(
      "seq-len", "Sequence length for the attention FLOPs (default: data.seq_len or 4096)",
      cxxopts::value<int64_t>())("json", "Print one JSON object")(
      "hf-config", "Also write the model's HuggingFace config.json to this path", cxxopts::value<std::string>());
  cli::add_common(options);
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  if (!args.count("config")) throw usage_error("dsopen-model-info", "--config is required", "see --help");
  const std::string path = args["config"].as<std::string>();
  const int64_t world = args["world-size"].as<int64_t>();
  if (world < 1) throw usage_error("--world-size", "must be >= 1");

  model::ModelConfig c;
  int64_t seq_len = 4096;
  if (path.size() > 5 && path.substr(path.size() - 5) == ".json") {
    c = model::ModelConfig::from_hf_json_file(path);
  } else {
    config::Document doc = config::Document::load(path);
    if (args.count("set"))
      for (const auto& s : args["set"].as<std::vector<std::string>>()) doc.apply_set(s);
    c = model::model_config_from_document(doc);
    seq_len = model::seq_len_from_document(doc, seq_len);
  }
  if (args.count("seq-len")) seq_len = args["seq-len"].as<int64_t>();
  if (args.count("hf-config")) {
    c.validate();
    const std::string out = args["hf-config"].as<std::string>();
    std::ofstream f(out);
    f << c.to_hf_json().dump(2) << "\n";
    if (!f.good()) throw runtime_error(out, "cannot write config.json", "check that the directory exists");
  }
  if (args.count("json")) std::cout << model::model_info_json(c, world, seq_len).dump() << std::endl;
  else std::cout << model::model_info_text(c, world, seq_len);
  return 0;
}

int main(int argc, char** argv) { return run_main("dsopen-model-info", run, argc, argv); }
