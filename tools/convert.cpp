// dsopen-convert: rewrite a model directory (dsopen checkpoint or HF directory) as an HF directory, optionally in
// another dtype and split into shards — the output loads in transformers — or as one GGUF file for llama.cpp and
// Ollama (inference/gguf_export.h). With --adapter, a LoRA adapter (PEFT layout) is merged into the weights first.
//   dsopen-convert --model runs/tiny/checkpoints/step_00000300 --out exported/tiny --dtype bf16
//   dsopen-convert --model runs/tiny/checkpoints/step_00000300 --adapter runs/lora/checkpoints/step_00000150 --out merged
//   dsopen-convert --model runs/tiny --format gguf --type q8_0 --out tiny-q8_0.gguf
#include <filesystem>
#include <fstream>
#include <iostream>

#include "data/hf_tokenizer.h"
#include "inference/export_files.h"
#include "inference/generation_setup.h"
#include "inference/gguf_export.h"
#include "inference/loader.h"
#include "model/generation_config.h"
#include "model/lora.h"
#include "model/model_dir.h"
#include "model/weights.h"
#include "utils/cli.h"
#include "utils/env.h"
#include "utils/errors.h"

using namespace dsopen;
namespace fs = std::filesystem;

namespace {

// A GGUF output: a .gguf name, a family llama.cpp runs, and never a file that is not an earlier GGUF export.
void check_gguf_output(const std::string& out, const model::ModelDir& source) {
  if (fs::path(out).extension() != ".gguf")
    throw usage_error("--out", "'" + out + "' is not a .gguf file name",
                      "--format gguf writes one file: give its name, e.g. --out exported/model.gguf");
  inference::check_gguf_exportable(source.config());
  std::ifstream existing(out, std::ios::binary);
  char magic[4] = {};
  if (existing && (!existing.read(magic, 4) || std::string(magic, 4) != "GGUF"))
    throw usage_error("--out", out + " exists and is not a GGUF file",
                      "give a new file name; an earlier GGUF export there is replaced");
}

// The tokenizer that travels with the weights must fit the model. `required` (GGUF needs the vocabulary): one dsopen
// cannot read is an error; otherwise (an HF export copies tokenizer files as they are) it is not checked.
void check_tokenizer(const model::ModelDir& source, const std::string& adapter, bool required) {
  const std::string dir = source.tokenizer_path(adapter);
  if (dir.empty()) return;
  std::unique_ptr<data::Tokenizer> tok;
  try {
    tok = data::load_tokenizer(dir);
  } catch (const Error&) {
    if (required) throw;
    return;
  }
  inference::check_tokenizer_fits(*tok, source.config(), dir);
}

}  // namespace

static int run(int argc, char** argv) {
  cxxopts::Options options("dsopen-convert", "Export a checkpoint or HF directory as an HF model directory or a GGUF file");
  options.add_options()("model", "Input directory", cxxopts::value<std::string>())(
      "out", "Output directory (--format hf) or file (--format gguf)", cxxopts::value<std::string>())(
      "format", "hf (a transformers directory) | gguf (one file for llama.cpp / Ollama)",
      cxxopts::value<std::string>()->default_value("hf"))(
      "type", "gguf: f32 | f16 | bf16 | q8_0 | q4_0 (default f16)", cxxopts::value<std::string>())(
      "adapter", "LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to merge into the weights",
      cxxopts::value<std::string>())(
      "dtype", "fp32 | bf16 | fp16", cxxopts::value<std::string>()->default_value("fp32"))(
      "max-shard-mb", "Split into shards of at most this many MB", cxxopts::value<double>()->default_value("5000"))(
      "keep-mtp", "Keep the multi-token-prediction module as model.layers.{num_hidden_layers}.* (as DeepSeek-V3's "
                  "files); transformers does not use it");
  cli::add_common(options);
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  if (!args.count("model") || !args.count("out")) throw usage_error("--model/--out", "both are required", "see --help");
  const std::string format = args["format"].as<std::string>();
  if (format != "hf" && format != "gguf") throw usage_error("--format", "'" + format + "' is not hf or gguf");
  const bool gguf = format == "gguf";
  if (!gguf && args.count("type")) throw usage_error("--type", "is for --format gguf", "use --dtype for HF directories");
  if (gguf && args.count("dtype"))
    throw usage_error("--dtype", "is for --format hf", "use --type f32|f16|bf16|q8_0|q4_0 for GGUF");
  const auto gguf_type = inference::gguf_type(args.count("type") ? args["type"].as<std::string>() : "f16");
  if (gguf && args.count("max-shard-mb"))
    throw usage_error("--max-shard-mb", "is for --format hf", "a GGUF file is written whole");
  if (gguf && args.count("keep-mtp")) throw usage_error("--keep-mtp", "is for --format hf", "llama.cpp decodes without MTP");
  const std::string d = args["dtype"].as<std::string>();
  if (d != "fp32" && d != "bf16" && d != "fp16") throw usage_error("--dtype", "'" + d + "' is not fp32, bf16 or fp16");
  const auto dtype = d == "bf16" ? torch::kBFloat16 : d == "fp16" ? torch::kFloat16 : torch::kFloat32;
  const double shard_mb = args["max-shard-mb"].as<double>();
  if (!(shard_mb > 0)) throw usage_error("--max-shard-mb", "must be > 0");
  const model::ModelDir source(args["model"].as<std::string>());
  const std::string out = args["out"].as<std::string>();
  const std::string adapter = args.count("adapter") ? model::resolve_latest(args["adapter"].as<std::string>()) : "";
  env::check_output_path(out, gguf ? env::OutputKind::File : env::OutputKind::Directory, {source.path(), adapter},
                         "--out");
  if (gguf) check_gguf_output(out, source);
  check_tokenizer(source, adapter, /*required=*/gguf);
  auto m = inference::load_model(source.path(), torch::kCPU, /*keep_mtp=*/true);
  if (!adapter.empty()) {
    const auto adapted = model::load_adapter(*m, adapter);
    model::merge_lora(*m);
    std::cout << "merged the adapter of " << adapted.size() << " projections from " << adapter << std::endl;
  }
  if (gguf) {
    const auto parent = fs::absolute(out).parent_path();
    if (!fs::exists(parent)) fs::create_directories(parent);  // as an HF export creates its directory
    inference::export_gguf(m, source, adapter, out, gguf_type);
    std::cout << "wrote " << out << std::endl;
    return 0;
  }
  model::HfExportOptions o;
  o.dtype = dtype;
  o.max_shard_bytes = static_cast<int64_t>(shard_mb * (1 << 20));
  o.keep_mtp = args.count("keep-mtp") > 0;
  // Tokenizer files (with their HF configs and chat template) and generation defaults go in with the weights.
  o.files = inference::export_companion_files(source, m->config(), adapter);
  model::save_hf_model(m, out, o);
  std::cout << "wrote " << out << std::endl;
  return 0;
}

int main(int argc, char** argv) { return run_main("dsopen-convert", run, argc, argv); }
