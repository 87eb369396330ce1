// dsopen-eval: logits and perplexity of a model (dsopen checkpoint or HF directory).
//   dsopen-eval --model DIR --tokens FILE --dump-logits OUT.safetensors
//   dsopen-eval --model DIR --data 'runs/tiny/data/fortunes_*.bin' --ppl [--seq-len 256 --batches 20]
//   dsopen-eval --model BASE --adapter ADAPTER_DIR ...   (a LoRA adapter applied unmerged)
#include <cmath>
#include <numeric>
#include <fstream>
#include <iostream>
#include <sstream>

#include "data/dataset.h"
#include "inference/loader.h"
#include "inference/quantize.h"
#include "model/lora.h"
#include "model/safetensors.h"
#include "utils/cli.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/logging.h"

using namespace dsopen;

namespace {

// One sequence of whitespace-separated ids per line, all lines the same length -> [N, T] int64.
torch::Tensor read_token_file(const std::string& path, int64_t vocab) {
  std::ifstream in(path);
  if (!in) throw runtime_error(path, "token file not found");
  std::vector<std::vector<int64_t>> rows;
  std::string line;
  int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    std::istringstream ss(line);
    std::vector<int64_t> row;
    std::string word;
    while (ss >> word) {
      size_t used = 0;
      int64_t id = -1;
      try {
        id = std::stoll(word, &used);
      } catch (const std::exception&) {
      }
      if (used != word.size() || id < 0 || id >= vocab)
        throw runtime_error(path + ":" + std::to_string(line_no),
                            "'" + word + "' is not a token id in [0, " + std::to_string(vocab) + ")");
      row.push_back(id);
    }
    if (row.empty()) continue;
    if (!rows.empty() && row.size() != rows.front().size())
      throw runtime_error(path + ":" + std::to_string(line_no), "has " + std::to_string(row.size()) +
                                                                     " tokens, the first line " + std::to_string(rows.front().size()),
                          "all sequences must have the same length");
    rows.push_back(row);
  }
  if (rows.empty()) throw runtime_error(path, "no token sequences");
  auto t = torch::empty({static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows.front().size())}, torch::kLong);
  for (size_t i = 0; i < rows.size(); ++i)
    std::copy(rows[i].begin(), rows[i].end(), t[static_cast<int64_t>(i)].data_ptr<int64_t>());
  return t;
}

}  // namespace

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
  logging::setup_console("warn");
  env::configure_threads(args["threads"].as<int>());
  // Without an adapter (which needs float weights) quantized layers keep their codes and dequantize per call:
  // float32 results while the quantized layers take 0.5 or 1 byte per weight instead of 4.
  auto m = inference::load_quantized_model(args["model"].as<std::string>(), torch::kCPU,
                                           args.count("adapter") ? inference::QuantizedLayers::Dequantized
                                                                 : inference::QuantizedLayers::FloatMath);
  if (args.count("adapter")) {
    model::load_adapter(*m, args["adapter"].as<std::string>());
    m->eval();
  }
  torch::NoGradGuard no_grad;
  if (args.count("tokens")) {
    if (!args.count("dump-logits")) throw usage_error("--tokens", "needs --dump-logits OUT.safetensors");
    auto ids = read_token_file(args["tokens"].as<std::string>(), m->config().vocab_size);
    auto logits = m->forward(ids).logits.to(torch::kFloat32);
    model::save_safetensors(args["dump-logits"].as<std::string>(), {{"logits", logits}});
    std::cout << "wrote logits " << logits.sizes() << " to " << args["dump-logits"].as<std::string>() << std::endl;
    return 0;
  }
  if (!args.count("ppl")) throw usage_error("dsopen-eval", "nothing to do", "use --tokens with --dump-logits, or --data with --ppl");
  if (!args.count("data")) throw usage_error("--ppl", "needs --data SHARDS");
  data::TokenDatasetOptions o;
  o.shards = args["data"].as<std::vector<std::string>>();
  o.seq_len = args["seq-len"].as<int64_t>();
  o.model_vocab_size = m->config().vocab_size;
  data::TokenDataset ds(o, data::Split::All);
  const int64_t max_batches = args["batches"].as<int64_t>();
  double ce = 0, n = 0;
  for (int64_t start = 0, b = 0; start + 8 <= ds.num_samples() && (max_batches == 0 || b < max_batches); start += 8, ++b) {
    std::vector<int64_t> samples(8);
    std::iota(samples.begin(), samples.end(), start);
    auto batch = ds.make_batch(samples);
    auto out = m->forward(batch.input_ids, batch.labels);
    ce += out.ce_sum.item<double>();
    n += out.n_targets.item<double>();
  }
  if (n == 0) throw runtime_error("--data", "fewer than 8 sequences of --seq-len tokens");
  std::printf("tokens %.0f | loss %.4f | perplexity %.3f\n", n, ce / n, std::exp(ce / n));
  return 0;
}

int main(int argc, char** argv) { return run_main("dsopen-eval", run, argc, argv); }
