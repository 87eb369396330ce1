// The `tokenizer:` and `data:` config sections (owned by the data layer) and what they build: the tokenizer
// (trained on first use when `tokenizer.train` says how) and the training/validation shards (built on first use
// when `data.build` says how), so a config can carry everything a run needs from raw text.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "data/corpus.h"
#include "data/sft.h"
#include "data/tokenizer.h"

namespace dsopen::config {
class Reader;
}

namespace dsopen::data {

struct TokenizerOptions {
  std::string path;  // SentencePiece .model, or an HF tokenizer.json (file or its directory)
  // The HuggingFace repository whose tokenizer.json belongs at `path` (named when the file is missing).
  std::string hf_repo;
  // Training recipe, used when `path` does not exist yet.
  bool has_train = false;
  SentencePieceTrainOptions train;
};
void decode(config::Reader& r, TokenizerOptions& out);

struct DataOptions {
  std::vector<std::string> train;  // shard paths/globs (pretrain) or JSONL files (sft)
  std::vector<std::string> valid;  // held-out shards / JSONL; empty: use valid_fraction of train
  double valid_fraction = 0.0;
  int64_t seq_len = 256;
  enum class Format { Pretrain, Sft };
  Format format = Format::Pretrain;  // "pretrain" | "sft"
  // sft only
  ChatTemplate chat_template;
  bool pack = false;
  Truncation truncation = Truncation::Right;  // "right" | "drop"
  // Building shards on first use (pretrain): inputs and corpus options as dsopen-preprocess takes them.
  bool has_build = false;
  std::vector<std::string> build_inputs;
  std::string build_output;  // shard prefix; data.train should match it (e.g. PREFIX_*.bin)
  CorpusOptions build_corpus;
};
void decode(config::Reader& r, DataOptions& out);

// The tokenizer of a run: loads tokenizer.path, training it first from tokenizer.train when the file is missing
// (a missing file with no recipe is an error naming the key).
std::unique_ptr<Tokenizer> prepare_tokenizer(const TokenizerOptions& options);

// Builds the shards described by data.build when data.train matches no shard yet. Returns true if it built.
bool prepare_shards(const DataOptions& options, const Tokenizer& tokenizer);

}  // namespace dsopen::data
