// SentencePiece tokenizer on the real fortunes corpus: mixed Chinese/English round trips, byte fallback,
// special tokens, batched encoding, and clear errors for bad input. Text cleaning helpers.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sentencepiece_trainer.h>

#include "data/text.h"
#include "data/tokenizer.h"
#include "text_stream_check.h"
#include "utils/env.h"
#include "utils/errors.h"

using namespace dsopen;
namespace fs = std::filesystem;

namespace {

// Trains one tokenizer per test process on the Debian fortunes corpus (English + Chinese).
const data::SentencePieceTokenizer& shared_tokenizer() {
  static std::unique_ptr<data::SentencePieceTokenizer> tok = [] {
    const fs::path dir = fs::temp_directory_path() / ("dsopen_tok_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    data::SentencePieceTrainOptions o;
    for (const char* f : {"/usr/share/games/fortunes/fortunes", "/usr/share/games/fortunes/chinese",
                          "/usr/share/games/fortunes/tang300", "/usr/share/games/fortunes/song100"})
      if (fs::exists(f)) o.inputs.push_back(f);
    o.output = (dir / "tok.model").string();
    o.vocab_size = 3000;
    o.character_coverage = 0.98;  // the poems hold thousands of distinct characters; rare ones use bytes
    o.max_sentences = 30000;
    o.user_symbols = {"<|User|>", "<|Assistant|>"};
    data::SentencePieceTokenizer::train(o);
    auto t = data::SentencePieceTokenizer::load(o.output);
    fs::remove_all(dir);
    return t;
  }();
  return *tok;
}

// A Llama-style model (SentencePiece's defaults: a dummy prefix space that decoding drops, extra whitespace
// collapsed, byte fallback), as users bring in HF checkpoints' tokenizer.model.
const data::SentencePieceTokenizer& llama_style_tokenizer() {
  static std::unique_ptr<data::SentencePieceTokenizer> tok = [] {
    const fs::path dir = fs::temp_directory_path() / ("dsopen_tok_llama_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    const auto status = sentencepiece::SentencePieceTrainer::Train(
        "--input=/usr/share/games/fortunes/fortunes,/usr/share/games/fortunes/chinese --model_prefix=" +
        (dir / "llama").string() +
        " --vocab_size=3000 --model_type=bpe --byte_fallback=true --character_coverage=0.98"
        " --input_sentence_size=20000 --shuffle_input_sentence=true --minloglevel=2");
    INFO(status.ToString());
    REQUIRE(status.ok());
    auto t = data::SentencePieceTokenizer::load((dir / "llama.model").string());
    fs::remove_all(dir);
    return t;
  }();
  return *tok;
}

}  // namespace

TEST_CASE("mixed Chinese/English text round-trips exactly, rare characters through byte fallback", "[data][tokenizer]") {
  const auto& tok = shared_tokenizer();
  CHECK(tok.vocab_size() == 3000);
  const std::vector<std::string> texts = {
      "Hello, world! 你好，世界。",
      "  leading spaces,\ttabs\tand\nnewlines\n\n",
      "床前明月光，疑是地上霜。 The moon is bright: 3.14159 and 2026-11-29.",
      "emoji 🚀🎉 and rare 𠜎𪚥 characters, Ünïcödé ©®",
      "code: for (int i = 0; i < n; ++i) { x[i] *= 2; }",
  };
  for (const auto& t : texts) {
    INFO(t);
    CHECK(tok.decode(tok.encode(t)) == t);
  }
  // A character outside the vocabulary becomes its UTF-8 bytes (4 byte tokens for U+2070E).
  auto ids = tok.encode("𠜎");
  CHECK(ids.size() == 4);
}

TEST_CASE("a literal U+2581 (SentencePiece's space symbol) survives encode -> decode", "[data][tokenizer]") {
  const auto& tok = shared_tokenizer();
  const std::string meta = "\u2581";
  const std::vector<std::string> texts = {"x" + meta + "y", meta + meta + "a b", meta, "a" + meta, meta + " " + meta,
                                          "\uf8ff" + meta + "\uf8fe", "床" + meta + "前 🚀" + meta};
  for (const auto& t : texts) {
    INFO(t);
    CHECK(tok.decode(tok.encode(t)) == t);
  }
  // A literal ▁ is not a space: the two texts get different ids.
  CHECK(tok.encode("x" + meta + "y") != tok.encode("x y"));
  CHECK(tok.encode("x y") == tok.encode("x y"));
  // Text without ▁ is encoded exactly as before (the escape only touches the ▁ itself).
  CHECK(tok.encode("a b  c") == tok.encode("a b  c"));
  // Random strings over an alphabet rich in spaces, ▁ and private-use characters.
  std::mt19937 rng(5);
  const std::vector<std::string> alphabet = {"a", "b", " ", "  ", "\t", "\n", meta, meta, "\uf8ff", "\uf8fe", "你", "🚀"};
  for (int i = 0; i < 300; ++i) {
    std::string t;
    for (int n = static_cast<int>(rng() % 20) + 1; n > 0; --n) t += alphabet[rng() % alphabet.size()];
    INFO(t);
    CHECK(tok.decode(tok.encode(t)) == t);
  }
}

TEST_CASE("streamed text equals whole decodes token by token (dummy prefix, byte fallback, special tokens)",
          "[data][tokenizer][inference]") {
  testing::check_text_stream_against_whole_decodes(shared_tokenizer(), 7);
  testing::check_text_stream_against_whole_decodes(llama_style_tokenizer(), 9);
}

TEST_CASE("special tokens have fixed ids and user symbols are never split", "[data][tokenizer]") {
  const auto& tok = shared_tokenizer();
  CHECK(tok.pad_id() == 0);
  CHECK(tok.bos_id() == 1);
  CHECK(tok.eos_id() == 2);
  const int32_t user = tok.token_id("<|User|>");
  REQUIRE(user > 3);
  auto ids = tok.encode("<|User|>hi");
  CHECK(ids.front() == user);
  CHECK(tok.token_id("<|NoSuchToken|>") == -1);
}

TEST_CASE("batched encoding equals one-by-one encoding, in order", "[data][tokenizer]") {
  const auto& tok = shared_tokenizer();
  std::vector<std::string> texts;
  for (int i = 0; i < 50; ++i) texts.push_back("line " + std::to_string(i) + " 第" + std::to_string(i) + "行");
  auto batch = tok.encode_batch(texts, 2);
  REQUIRE(batch.size() == texts.size());
  for (size_t i = 0; i < texts.size(); ++i) CHECK(batch[i] == tok.encode(texts[i]));
}

TEST_CASE("tokenizer bad input: missing file, not a model, id out of range", "[data][tokenizer]") {
  try {
    data::SentencePieceTokenizer::load("/nonexistent/tok.model");
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("/nonexistent/tok.model: tokenizer model not found") == 0);
  }
  const auto junk = (fs::temp_directory_path() / ("dsopen_junk_" + std::to_string(::getpid()))).string();
  std::ofstream(junk) << "this is not a protobuf";
  CHECK_THROWS_WITH(data::SentencePieceTokenizer::load(junk), Catch::Contains("not a SentencePiece model"));
  fs::remove(junk);
  CHECK_THROWS_WITH(shared_tokenizer().decode({5, 999999}), Catch::Contains("token id 999999 is outside the vocabulary"));
  data::SentencePieceTrainOptions o;
  o.inputs = {"/nonexistent.txt"};
  o.output = "/tmp/x.model";
  CHECK_THROWS_WITH(data::SentencePieceTokenizer::train(o), Catch::Contains("/nonexistent.txt: input file not found"));
}

TEST_CASE("the tokenizer hash identifies the model bytes", "[data][tokenizer]") {
  CHECK(shared_tokenizer().hash().size() == 16);
  CHECK(data::fnv1a_hex("a") != data::fnv1a_hex("b"));
  CHECK(data::fnv1a_hex("") == "cbf29ce484222325");  // FNV-1a 64 offset basis
}

TEST_CASE("ANSI escapes are stripped; UTF-8 is validated", "[data][text]") {
  CHECK(data::strip_ansi("\x1b[33m    -- Debian \x1b[32m《诗》\x1b[m第一\x1b[m") == "    -- Debian 《诗》第一");
  CHECK(data::strip_ansi("plain") == "plain");
  CHECK(data::is_valid_utf8("你好 🚀"));
  CHECK(!data::is_valid_utf8("\xff\xfe"));
  CHECK(!data::is_valid_utf8("\xe4\xbd"));        // truncated
  CHECK(!data::is_valid_utf8("\xc0\xaf"));        // overlong '/'
  CHECK(!data::is_valid_utf8("\xed\xa0\x80"));    // surrogate
}
