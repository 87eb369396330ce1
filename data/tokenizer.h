// data::Tokenizer: the interface every tokenizer backend implements (encode, decode, special tokens, vocab size,
// a content hash that token shards record), and its SentencePiece backend, which can also train models.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dsopen::data {

class Tokenizer {
public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  // Encodes many texts on `threads` threads (0: all CPUs); results keep the input order.
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string>& texts, int threads = 0) const;

  virtual int64_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  virtual int32_t pad_id() const = 0;  // -1: none
  // Id of a piece (special token such as "<|User|>"); -1 when the vocabulary lacks it.
  virtual int32_t token_id(const std::string& piece) const = 0;
  // Hex digest of the tokenizer's full definition: shards from different tokenizers never mix.
  virtual std::string hash() const = 0;
  // Where it was loaded from (for messages).
  virtual std::string source() const = 0;
};

struct SentencePieceTrainOptions {
  std::vector<std::string> inputs;  // text files, one sentence per line
  std::string output;               // path of the .model file to write
  std::string output_name = "--output";  // how errors name `output` (a flag, or a config key)
  int64_t vocab_size = 8000;
  std::string model_type = "bpe";   // bpe | unigram
  std::vector<std::string> user_symbols;  // extra special tokens (chat markers), never split
  // Share of characters that get pieces of their own; the rarest rest are spelled as UTF-8 bytes (byte
  // fallback), so every character stays encodable. 1.0 would give each of the thousands of CJK characters a
  // piece and leave little room for merges in a small vocabulary.
  double character_coverage = 0.9995;
  bool strip_ansi = true;           // remove terminal escape sequences from the input lines
  int64_t max_sentences = 2000000;  // sample at most this many lines
  int threads = 0;                  // 0: all CPUs
};

class SentencePieceTokenizer : public Tokenizer {
public:
  // Loads a .model file; a runtime error naming the file when it is missing or not a SentencePiece model.
  static std::unique_ptr<SentencePieceTokenizer> load(const std::string& path);
  // Trains a model (byte fallback so that any character is encodable, digits split, whitespace kept verbatim so that
  // decode(encode(x)) == x) and writes it atomically to options.output. Ids: pad 0, bos 1, eos 2, unk 3.
  static void train(const SentencePieceTrainOptions& options);

  ~SentencePieceTokenizer() override;
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override;
  int32_t bos_id() const override;
  int32_t eos_id() const override;
  int32_t pad_id() const override;
  int32_t token_id(const std::string& piece) const override;
  std::string hash() const override { return hash_; }
  std::string source() const override { return path_; }

  // The same tokenizer as a HuggingFace tokenizer.json, as transformers' LlamaConverter builds one from a
  // SentencePiece BPE model: normalizer " " -> "▁", no pre-tokenizer, a BPE model with byte fallback whose merges
  // are every split of a normal piece into two normal pieces, ranked by the merged piece's score (SentencePiece
  // merges the highest-scoring pair first), control and user-defined pieces as added tokens, and a post-processor
  // that prepends BOS (as dsopen-generate does). `tokenizers` then encodes text to the ids encode() gives, except
  // for a literal "▁" in the text (kept as itself here, read as a space there).
  std::string hf_tokenizer_json() const;
  int32_t unk_id() const;
  std::string piece(int32_t id) const;  // the vocabulary entry of `id` ("<s>", "▁the", "<0x0A>")

  // Each piece with its score and kind, numbered as llama.cpp's llama_token_type (GGUF tokenizer.ggml.token_type):
  // 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
  struct PieceInfo {
    std::string piece;
    float score;
    int32_t type;
  };
  std::vector<PieceInfo> pieces() const;
  // The trainer's model type recorded in the model: "unigram", "bpe", "word" or "char".
  std::string model_type() const;

private:
  SentencePieceTokenizer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_, hash_;
};

// 64-bit FNV-1a of `bytes` as 16 hex digits (content hashes of tokenizers and files).
std::string fnv1a_hex(const std::string& bytes);

}  // namespace dsopen::data
