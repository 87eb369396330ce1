// dsopen-quantize: weight-only int8 / int4 quantization of a model directory, written in the GPTQ checkpoint layout
// that transformers/optimum, vLLM and ExLlama read (inference/quantized_format.h).
//   dsopen-quantize --model DIR --method rtn-int8|rtn-int4|gptq-int4 [--group-size 128|-1] [--out DIR]
//   gptq-int4 also needs --calib-data SHARDS (token shards made by dsopen-preprocess).
#include <iostream>
#include <numeric>

#include "inference/evaluation.h"
#include "inference/export_files.h"
#include "inference/loader.h"
#include "inference/quantize.h"
#include "model/model_dir.h"
#include "utils/cli.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/logging.h"

using namespace dsopen;

namespace {

std::string gib(double bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

std::string mib(double bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f MiB", bytes / (1024.0 * 1024.0));
  return buf;
}

}  // namespace

static int run(int argc, char** argv) {
  cxxopts::Options options("dsopen-quantize", "Weight-only int8 / int4 quantization (RTN or GPTQ)");
  options.add_options()("model", "Checkpoint or HF model directory", cxxopts::value<std::string>())(
      "method", "rtn-int8, rtn-int4 or gptq-int4", cxxopts::value<std::string>())(
      "group-size", "Weights per scale/zero group along the input dimension; -1: one group per row (per-channel int8 runs "
                     "on dsopen-generate's int8 kernel)",
      cxxopts::value<int64_t>()->default_value("128"))(
      "out", "Output directory (without it only the sizes are reported)", cxxopts::value<std::string>())(
      "quantize-head", "Quantize lm_head too (the embedding stays in float)")(
      "scale-dtype", "Storage of the scales: fp16 (as GPTQ tools expect) or fp32", cxxopts::value<std::string>()->default_value("fp16"))(
      "calib-data", "Token shards (paths or globs) for gptq calibration", cxxopts::value<std::vector<std::string>>())(
      "calib-samples", "Calibration sequences for gptq", cxxopts::value<int64_t>()->default_value("128"))(
      "calib-seq-len", "Tokens per calibration sequence", cxxopts::value<int64_t>()->default_value("512"))(
      "no-act-order", "gptq: quantize columns in their natural order")(
      "sym", "Symmetric groups (GPTQ's sym: zero point in the middle code); default asymmetric")(
      "damp", "gptq: dampening as a fraction of the mean Hessian diagonal", cxxopts::value<double>()->default_value("0.01"))(
      "threads", "CPU threads (0: all)", cxxopts::value<int>()->default_value("0"));
  cli::add_common(options);
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  if (!args.count("model")) throw usage_error("--model", "is required", "see --help");
  if (!args.count("method")) throw usage_error("--method", "is required", "use rtn-int8, rtn-int4 or gptq-int4");
  logging::setup_console("info");
  env::configure_threads(args["threads"].as<int>());

  inference::QuantizeOptions o;
  o.method = args["method"].as<std::string>();
  const auto method = inference::parse_method(o.method);  // usage error before the model loads
  o.group_size = args["group-size"].as<int64_t>();
  o.quantize_head = args.count("quantize-head") > 0;
  const auto sd = args["scale-dtype"].as<std::string>();
  if (sd != "fp16" && sd != "fp32") throw usage_error("--scale-dtype", "'" + sd + "' is not fp16 or fp32");
  o.gptq.scale_dtype = sd == "fp16" ? torch::kFloat16 : torch::kFloat32;
  o.gptq.act_order = args.count("no-act-order") == 0;
  o.gptq.sym = args.count("sym") > 0;
  o.gptq.percdamp = args["damp"].as<double>();
  if (!(o.gptq.percdamp > 0)) throw usage_error("--damp", "must be > 0");
  if (args["calib-samples"].as<int64_t>() < 1) throw usage_error("--calib-samples", "must be >= 1");
  if (args["calib-seq-len"].as<int64_t>() < 1) throw usage_error("--calib-seq-len", "must be >= 1");
  if (method.quant_method == "gptq" && !args.count("calib-data"))
    throw usage_error("--calib-data", "gptq-int4 needs calibration token shards", "pass shards made by dsopen-preprocess");

  const std::string model_dir = args["model"].as<std::string>();
  if (args.count("out"))
    env::check_output_path(args["out"].as<std::string>(), env::OutputKind::Directory, {model::resolve_latest(model_dir)},
                           "--out");
  auto m = inference::load_model(model_dir);
  std::vector<torch::Tensor> calib;
  if (method.quant_method == "gptq")
    calib = inference::calibration_batches(args["calib-data"].as<std::vector<std::string>>(), args["calib-samples"].as<int64_t>(),
                                args["calib-seq-len"].as<int64_t>(), m->config().vocab_size,
                                inference::model_tokenizer_hash(model_dir));
  auto q = inference::quantize_model(m, o, calib);
  auto r = inference::size_report(m, q);

  if (args.count("out")) {
    const std::string out = args["out"].as<std::string>();
    const model::ModelDir source(model_dir);
    inference::save_quantized_model(m, q, out, inference::export_companion_files(source, m->config()), o);
    std::cout << "wrote " << out << std::endl;
  }
  const std::string group = o.group_size == inference::kPerChannel ? "per row" : std::to_string(o.group_size);
  std::printf("method %s | group size %s | quantized layers %zu (%lld of %lld parameters)\n", o.method.c_str(),
              group.c_str(), q.layers.size(), static_cast<long long>(r.quantized_params),
              static_cast<long long>(r.params));
  std::printf("size before %s (fp32), %s (16-bit) | after %s (rest fp32), %s (rest 16-bit)\n",
              mib(static_cast<double>(r.bytes_before)).c_str(), mib(static_cast<double>(r.bytes_before_16bit)).c_str(),
              mib(static_cast<double>(r.bytes_after)).c_str(), mib(static_cast<double>(r.bytes_after_16bit)).c_str());
  std::printf("bits per weight %.3f | projected DeepSeek-LLM 7B (6.91e9 params): %s all quantized, %s with "
              "embedding and head in 16-bit (vs %s bf16)\n",
              r.bits_per_weight, gib(r.projected_7b_bytes_all).c_str(), gib(r.projected_7b_bytes).c_str(),
              gib(6.91e9 * 2).c_str());
  return 0;
}

int main(int argc, char** argv) {
  return run_main("dsopen-quantize", run, argc, argv);
}
