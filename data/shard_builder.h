// Preprocessing library code (dsopen-preprocess and the default-corpus builder): documents -> tokens -> shards.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/corpus.h"
#include "data/tokenizer.h"

namespace dsopen::data {

struct PreprocessOptions {
  std::vector<std::string> inputs;
  std::string output;                  // shard prefix: OUTPUT_00000.bin/.idx, OUTPUT_00001 ...
  std::string output_name = "--output";  // how errors name `output` (a flag, or a config key)
  int64_t shard_tokens = 100'000'000;  // tokens per shard (a document never straddles two shards)
  int threads = 0;                     // encoding threads; 0: all CPUs
  int64_t chunk_documents = 4096;      // documents encoded per parallel batch
  CorpusOptions corpus;
};

struct PreprocessStats {
  int64_t documents = 0, tokens = 0, bytes = 0, skipped_invalid_utf8 = 0, shards = 0;
  double seconds = 0;
  std::vector<std::string> shard_prefixes;
};

// Encodes every document and writes shards with EOS between documents. Existing shards at the same prefix are
// appended to (numbering continues) when they come from the same tokenizer and refused otherwise. No output file
// is visible before it is complete. Errors name the input file and line.
PreprocessStats build_shards(const PreprocessOptions& options, const Tokenizer& tokenizer);

}  // namespace dsopen::data
