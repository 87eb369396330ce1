// dsopen-preprocess: text corpora -> token shards (.bin + .idx) with a given tokenizer.
//   dsopen-preprocess --tokenizer tok.model --input /usr/share/games/fortunes --doc-separator %
//                     --strip-ansi --output runs/tiny/data/train
#include <iostream>

#include "data/hf_tokenizer.h"
#include "data/shard_builder.h"
#include "utils/cli.h"
#include "utils/errors.h"
#include "utils/logging.h"

using namespace dsopen;

static int run(int argc, char** argv) {
  cxxopts::Options options("dsopen-preprocess", "Tokenize text corpora into token shards");
  options.add_options()("tokenizer", "Tokenizer: SentencePiece .model, HF tokenizer.json, or a directory holding one",
                                   cxxopts::value<std::string>())(
      "input", "Input files or directories (.txt, .jsonl, optionally .gz)", cxxopts::value<std::vector<std::string>>())(
      "output", "Shard prefix; shards are PREFIX_00000.bin/.idx, ...", cxxopts::value<std::string>())(
      "doc-separator", "line (one document per line) | blank (blank lines) | TEXT (a line equal to TEXT)",
      cxxopts::value<std::string>()->default_value("line"))(
      "jsonl-field", "Field holding the text in .jsonl inputs", cxxopts::value<std::string>()->default_value("text"))(
      "strip-ansi", "Remove terminal escape sequences")(
      "invalid-utf8", "skip (count and drop the line) | fail", cxxopts::value<std::string>()->default_value("skip"))(
      "exclude-ext", "File extensions skipped inside directories",
      cxxopts::value<std::vector<std::string>>()->default_value(".dat"))(
      "shard-tokens", "Tokens per shard", cxxopts::value<int64_t>()->default_value("100000000"))(
      "threads", "Encoding threads (0: all CPUs)", cxxopts::value<int>()->default_value("0"));
  cli::add_common(options);
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  for (const char* required : {"tokenizer", "input", "output"})
    if (!args.count(required)) throw usage_error(std::string("--") + required, "is required", "see --help");
  logging::setup_console("info");

  data::PreprocessOptions o;
  o.inputs = args["input"].as<std::vector<std::string>>();
  o.output = args["output"].as<std::string>();
  o.shard_tokens = args["shard-tokens"].as<int64_t>();
  o.threads = args["threads"].as<int>();
  o.corpus.doc_separator = args["doc-separator"].as<std::string>();
  o.corpus.jsonl_field = args["jsonl-field"].as<std::string>();
  if (o.corpus.jsonl_field.empty()) throw usage_error("--jsonl-field", "must not be empty", "name the field holding the text");
  o.corpus.strip_ansi = args.count("strip-ansi") > 0;
  o.corpus.invalid_utf8 = args["invalid-utf8"].as<std::string>();
  o.corpus.exclude_ext = args["exclude-ext"].as<std::vector<std::string>>();
  auto tok = data::load_tokenizer(args["tokenizer"].as<std::string>());
  const auto s = data::build_shards(o, *tok);
  spdlog::info("{} documents, {} tokens, {} shard(s), {:.1f} MB in {:.2f} s: {:.2f} MB/s, {:.0f} tokens/s{}", s.documents,
               s.tokens, s.shards, s.bytes / 1e6, s.seconds, s.bytes / 1e6 / s.seconds, s.tokens / s.seconds,
               s.skipped_invalid_utf8 ? ", skipped " + std::to_string(s.skipped_invalid_utf8) + " invalid UTF-8 lines" : "");
  for (const auto& p : s.shard_prefixes) std::cout << p << "\n";
  return 0;
}

int main(int argc, char** argv) { return run_main("dsopen-preprocess", run, argc, argv); }
