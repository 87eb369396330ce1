#include "inference/evaluation.h"

#include <cmath>
#include <fstream>
#include <numeric>
#include <sstream>

#include "data/dataset.h"
#include "data/hf_tokenizer.h"
#include "model/model_dir.h"
#include "utils/errors.h"
#include "utils/progress.h"

namespace dsopen::inference {

namespace {
std::vector<int64_t> parse_row(const std::string& line, int64_t vocab, const std::string& where) {
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
      throw runtime_error(where, "'" + word + "' is not a token id in [0, " + std::to_string(vocab) + ")");
    row.push_back(id);
  }
  return row;
}
}  // namespace

torch::Tensor read_token_file(const std::string& path, int64_t vocab) {
  std::ifstream in(path);
  if (!in) throw runtime_error(path, "token file not found");
  std::vector<std::vector<int64_t>> rows;
  std::string line;
  for (int64_t line_no = 1; std::getline(in, line); ++line_no) {
    const std::string where = path + ":" + std::to_string(line_no);
    auto row = parse_row(line, vocab, where);
    if (row.empty()) continue;
    if (!rows.empty() && row.size() != rows.front().size())
      throw runtime_error(where, "has " + std::to_string(row.size()) + " tokens, the first line " +
                                     std::to_string(rows.front().size()),
                          "all sequences must have the same length");
    rows.push_back(std::move(row));
  }
  if (rows.empty()) throw runtime_error(path, "no token sequences");
  auto t = torch::empty({static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows.front().size())}, torch::kLong);
  for (size_t i = 0; i < rows.size(); ++i)
    std::copy(rows[i].begin(), rows[i].end(), t[static_cast<int64_t>(i)].data_ptr<int64_t>());
  return t;
}

std::string model_tokenizer_hash(const std::string& model_dir) {
  const std::string path = model::ModelDir(model_dir).tokenizer_path();
  return path.empty() ? "" : data::load_tokenizer(path)->hash();
}

Perplexity perplexity(model::CausalLM& m, const std::vector<std::string>& shards, int64_t seq_len, int64_t max_batches,
                      const std::string& tokenizer_hash) {
  data::TokenDatasetOptions o;
  o.tokenizer_hash = tokenizer_hash;
  o.tokenizer_of = "model's tokenizer";
  o.shards = shards;
  o.seq_len = seq_len;
  o.shards_name = "--data";
  o.seq_len_name = "--seq-len";
  o.model_vocab_size = m->config().vocab_size;
  data::TokenDataset ds(o, data::Split::All);
  torch::NoGradGuard no_grad;
  double ce = 0, n = 0;
  const int64_t batches = max_batches == 0 ? ds.num_samples() / 8 : std::min(max_batches, ds.num_samples() / 8);
  Progress progress("perplexity", batches, "batches");
  for (int64_t start = 0, b = 0; start + 8 <= ds.num_samples() && (max_batches == 0 || b < max_batches); start += 8, ++b) {
    std::vector<int64_t> samples(8);
    std::iota(samples.begin(), samples.end(), start);
    auto batch = ds.make_batch(samples);
    auto out = m->forward(batch.input_ids, batch.labels);
    ce += out.ce_sum.item<double>();
    n += out.n_targets.item<double>();
    progress.update(b + 1);
  }
  progress.finish();
  if (n == 0) throw runtime_error("--data", "fewer than 8 sequences of --seq-len tokens");
  return {n, ce / n, std::exp(ce / n)};
}

}  // namespace dsopen::inference
