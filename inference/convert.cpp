// dsopen-convert: rewrite a model directory (dsopen checkpoint or HF directory) as an HF directory, optionally in
// another dtype and split into shards — the output loads in transformers.
//   dsopen-convert --model runs/tiny/checkpoints/step_00000300 --out exported/tiny --dtype bf16
#include <filesystem>
#include <iostream>

#include "inference/loader.h"
#include "model/weights.h"
#include "utils/cli.h"
#include "utils/env.h"
#include "utils/errors.h"

using namespace dsopen;

static int run(int argc, char** argv) {
  cxxopts::Options options("dsopen-convert", "Export a checkpoint or HF directory as an HF model directory");
  options.add_options()("model", "Input directory", cxxopts::value<std::string>())(
      "out", "Output directory", cxxopts::value<std::string>())(
      "dtype", "fp32 | bf16 | fp16", cxxopts::value<std::string>()->default_value("fp32"))(
      "max-shard-mb", "Split into shards of at most this many MB", cxxopts::value<double>()->default_value("5000"));
  cli::add_common(options);
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  if (!args.count("model") || !args.count("out")) throw usage_error("dsopen-convert", "--model and --out are required");
  const std::string d = args["dtype"].as<std::string>();
  if (d != "fp32" && d != "bf16" && d != "fp16") throw usage_error("--dtype", "'" + d + "' is not fp32, bf16 or fp16");
  const auto dtype = d == "bf16" ? torch::kBFloat16 : d == "fp16" ? torch::kFloat16 : torch::kFloat32;
  const double shard_mb = args["max-shard-mb"].as<double>();
  if (!(shard_mb > 0)) throw usage_error("--max-shard-mb", "must be > 0");
  auto m = inference::load_model(args["model"].as<std::string>(), torch::kCPU, /*keep_mtp=*/true);
  const std::string out = args["out"].as<std::string>();
  model::save_hf_model(m, out, dtype, static_cast<int64_t>(shard_mb * (1 << 20)));
  // The tokenizer travels with the weights, whichever kind it is.
  for (const char* name : {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"}) {
    const auto src = std::filesystem::path(args["model"].as<std::string>()) / name;
    if (std::filesystem::exists(src)) env::write_file_atomic((std::filesystem::path(out) / name).string(), env::read_file(src.string()));
  }
  std::cout << "wrote " << out << std::endl;
  return 0;
}

int main(int argc, char** argv) { return run_main("dsopen-convert", run, argc, argv); }
