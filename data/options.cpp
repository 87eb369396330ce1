#include "data/options.h"

#include <spdlog/spdlog.h>

#include <filesystem>

#include "data/hf_tokenizer.h"
#include "data/shard_builder.h"
#include "data/shards.h"
#include "utils/config.h"
#include "utils/env.h"
#include "utils/errors.h"

namespace dsopen::data {

void decode(config::Reader& r, TokenizerOptions& o) {
  r.required("path", o.path);
  r.optional("hf_repo", o.hf_repo);
  if (r.has("train")) {
    o.has_train = true;
    config::Reader t = r.child("train");
    t.optional("inputs", o.train.inputs);
    if (o.train.inputs.empty()) t.error("inputs", "missing required key");
    long long vocab = o.train.vocab_size;
    t.optional("vocab_size", vocab, config::at_least(260));
    o.train.vocab_size = vocab;
    t.choice("model_type", o.train.model_type, {"bpe", "unigram"});
    t.optional("character_coverage", o.train.character_coverage, config::in_range(0.9, 1.0));
    t.optional("user_symbols", o.train.user_symbols);
    t.optional("strip_ansi", o.train.strip_ansi);
    long long max_sentences = o.train.max_sentences;
    t.optional("max_sentences", max_sentences, config::at_least(1));
    o.train.max_sentences = max_sentences;
    t.finish();
  }
  r.finish();
  o.train.output = o.path;
}

void decode(config::Reader& r, DataOptions& o) {
  r.optional("train", o.train);
  if (o.train.empty()) r.error("train", "missing required key (shard paths or globs, or JSONL files for sft)");
  for (const auto& path : o.train)
    if (path.empty()) r.error("train", "an empty path in the list");
  r.optional("valid", o.valid);
  r.optional("valid_fraction", o.valid_fraction, config::in_range(0.0, 0.5));
  long long seq_len = o.seq_len;
  r.optional("seq_len", seq_len, config::at_least(1));
  o.seq_len = seq_len;
  r.choice<DataOptions::Format>("format", o.format, {{"pretrain", DataOptions::Format::Pretrain}, {"sft", DataOptions::Format::Sft}});
  if (r.has("chat_template")) {
    config::Reader t = r.child("chat_template");
    decode(t, o.chat_template);
  }
  r.optional("pack", o.pack);
  r.choice<Truncation>("truncation", o.truncation, {{"right", Truncation::Right}, {"drop", Truncation::Drop}});
  if (r.has("build")) {
    o.has_build = true;
    config::Reader b = r.child("build");
    b.optional("inputs", o.build_inputs);
    if (o.build_inputs.empty()) b.error("inputs", "missing required key");
    b.required("output", o.build_output);
    b.optional("doc_separator", o.build_corpus.doc_separator);
    b.optional("jsonl_field", o.build_corpus.jsonl_field);
    if (o.build_corpus.jsonl_field.empty()) b.error("jsonl_field", "must not be empty");
    b.optional("strip_ansi", o.build_corpus.strip_ansi);
    b.choice("invalid_utf8", o.build_corpus.invalid_utf8, {"skip", "fail"});
    b.optional("exclude_ext", o.build_corpus.exclude_ext);
    b.finish();
  }
  r.finish();
}

std::unique_ptr<Tokenizer> prepare_tokenizer(const TokenizerOptions& o) {
  if (!std::filesystem::exists(o.path)) {
    if (!o.has_train && !o.hf_repo.empty())
      throw runtime_error(o.path, "tokenizer not found",
                          "put the model's tokenizer.json there: it is in the HuggingFace repository " + o.hf_repo);
    if (!o.has_train)
      throw runtime_error(o.path, "tokenizer model not found",
                          "set tokenizer.path to an existing .model or add tokenizer.train to build one");
    env::check_output_path(o.path, env::OutputKind::File, o.train.inputs, "tokenizer.path");
    const auto dir = std::filesystem::path(o.path).parent_path();
    if (!dir.empty()) std::filesystem::create_directories(dir);
    spdlog::info("training tokenizer {} (vocab {}, {}) from {} input file(s)", o.path, o.train.vocab_size,
                 o.train.model_type, o.train.inputs.size());
    SentencePieceTrainOptions recipe = o.train;
    recipe.output_name = "tokenizer.path";
    CorpusOptions corpus;  // directories expand as for preprocessing (index files skipped, links read once)
    recipe.inputs = expand_inputs(o.train.inputs, corpus);
    SentencePieceTokenizer::train(recipe);
  }
  auto tok = load_tokenizer(o.path);  // SentencePiece .model or HF tokenizer.json (file or directory)
  spdlog::info("tokenizer {}: vocab {}, hash {}", o.path, tok->vocab_size(), tok->hash());
  return tok;
}

bool prepare_shards(const DataOptions& o, const Tokenizer& tok) {
  if (o.format != DataOptions::Format::Pretrain || !o.has_build) return false;
  for (const auto& pattern : o.train)
    for (const auto& prefix : expand_shards(pattern))
      if (std::filesystem::exists(prefix + ".idx")) return false;  // already built
  PreprocessOptions p;
  p.inputs = o.build_inputs;
  p.output = o.build_output;
  p.output_name = "data.build.output";
  p.corpus = o.build_corpus;
  spdlog::info("building shards {} from {} input(s)", p.output, p.inputs.size());
  const auto s = build_shards(p, tok);
  spdlog::info("{} documents, {} tokens in {} shard(s), {:.1f} MB/s", s.documents, s.tokens, s.shards,
               s.bytes / 1e6 / std::max(s.seconds, 1e-9));
  return true;
}

}  // namespace dsopen::data
