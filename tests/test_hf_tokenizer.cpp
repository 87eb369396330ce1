// HuggingFace tokenizer.json backend against the `tokenizers` library itself: a byte-level BPE trained on the
// fortunes corpus with DeepSeek-V3, DeepSeek-LLM, Qwen2 and GPT-2 style pre-tokenizers must give the very ids that
// `tokenizers` gives (tests/python/make_hf_tokenizer.py writes them), round-trip, batch, and fail clearly.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/hf_tokenizer.h"
#include "text_stream_check.h"
#include "utils/env.h"
#include "utils/errors.h"

using namespace dsopen;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const std::string kBos = "<｜begin▁of▁sentence｜>", kEos = "<｜end▁of▁sentence｜>", kUser = "<｜User｜>",
                  kAssistant = "<｜Assistant｜>";

// The repository root: found from the test binary (build/bin -> CMakeCache.txt's CMAKE_HOME_DIRECTORY) or cwd.
fs::path source_dir() {
  const fs::path script = "tests/python/make_hf_tokenizer.py";
  std::error_code ec;
  for (fs::path dir = fs::read_symlink("/proc/self/exe", ec).parent_path();
       !ec && !dir.empty() && dir != dir.root_path(); dir = dir.parent_path()) {
    std::ifstream cache(dir / "CMakeCache.txt");
    for (std::string line; std::getline(cache, line);)
      if (line.rfind("CMAKE_HOME_DIRECTORY:INTERNAL=", 0) == 0) {
        const fs::path home = line.substr(line.find('=') + 1);
        if (fs::exists(home / script)) return home;
      }
  }
  for (fs::path dir = fs::current_path(); !dir.empty() && dir != dir.root_path(); dir = dir.parent_path())
    if (fs::exists(dir / script)) return dir;
  FAIL("cannot find " << script << " from the test binary or the working directory");
  return {};
}

// Runs the Python generator once per process into a temporary directory (removed at exit).
const fs::path& generated_dir() {
  static const struct Dir {
    fs::path path;
    Dir() {
      path = fs::temp_directory_path() / ("dsopen_hftok_" + std::to_string(::getpid()));
      fs::create_directories(path);
      const std::string cmd =
          "python3 '" + (source_dir() / "tests/python/make_hf_tokenizer.py").string() + "' '" + path.string() + "'";
      const int rc = std::system(cmd.c_str());
      if (rc != 0) {
        fs::remove_all(path);
        throw std::runtime_error("`" + cmd + "` failed (exit status " +
                                 std::to_string(WIFEXITED(rc) ? WEXITSTATUS(rc) : rc) + ")");
      }
    }
    ~Dir() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  } dir;
  return dir.path;
}

struct Case {
  std::string text;
  std::vector<int32_t> ids;
  std::string decoded;  // what `tokenizers` decodes the ids to
};

std::vector<Case> read_expected(const fs::path& file) {
  std::vector<Case> out;
  std::ifstream in(file);
  REQUIRE(in);
  for (std::string line; std::getline(in, line);) {
    const json j = json::parse(line);
    const std::string text = j.at("text").get<std::string>();
    out.push_back({text, j.at("ids").get<std::vector<int32_t>>(), j.value("decoded", text)});
  }
  REQUIRE(!out.empty());
  return out;
}

const data::HfTokenizer& main_tokenizer() {
  static const std::unique_ptr<data::HfTokenizer> tok = data::HfTokenizer::load(generated_dir().string());
  return *tok;
}

// A scratch directory with a tokenizer.json of the given text.
struct ScratchFile {
  fs::path dir;
  explicit ScratchFile(const std::string& name, const std::string& contents) {
    dir = fs::temp_directory_path() / ("dsopen_hftok_" + name + "_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    std::ofstream(dir / "tokenizer.json", std::ios::binary) << contents;
  }
  ~ScratchFile() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string file() const { return (dir / "tokenizer.json").string(); }
};

json main_json() { return json::parse(env::read_file((generated_dir() / "tokenizer.json").string())); }

}  // namespace

TEST_CASE("HF tokenizer.json: ids identical to `tokenizers` for every pre-tokenizer style, exact round trips",
          "[data][hf_tokenizer]") {
  for (const char* variant : {"", "gpt2", "qwen2", "llm"}) {
    const fs::path dir = generated_dir() / variant;
    // load_tokenizer picks the HF backend for a directory holding tokenizer.json.
    const auto tok = data::load_tokenizer(dir.string());
    REQUIRE(dynamic_cast<const data::HfTokenizer*>(tok.get()) != nullptr);
    for (const auto& c : read_expected(dir / "expected.jsonl")) {
      INFO("variant '" << variant << "', text: " << c.text);
      CHECK(tok->encode(c.text) == c.ids);
      CHECK(tok->decode(c.ids) == c.decoded);
      if (c.text.find("<mask>") == std::string::npos) CHECK(c.decoded == c.text);  // exact round trip
    }
  }
}

TEST_CASE("HF tokenizer: a whole corpus (fortunes + held-out Chinese poems) encodes as `tokenizers` does",
          "[data][hf_tokenizer]") {
  const auto& tok = main_tokenizer();
  const auto cases = read_expected(generated_dir() / "corpus.jsonl");
  std::vector<std::string> texts;
  size_t bytes = 0, mismatches = 0;
  for (const auto& c : cases) texts.push_back(c.text), bytes += c.text.size();

  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::vector<int32_t>> got;
  for (const auto& t : texts) got.push_back(tok.encode(t));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "hf_tokenizer: encoded %zu texts, %.2f MB in %.3f s (%.1f MB/s, one thread, word cache filling as it goes)\n",
      texts.size(), bytes / 1e6, s, bytes / 1e6 / s);

  for (size_t i = 0; i < cases.size(); ++i)
    if (got[i] != cases[i].ids && ++mismatches <= 5) {
      INFO("text: " << cases[i].text);
      CHECK(got[i] == cases[i].ids);
    }
  CHECK(mismatches == 0);
  size_t roundtrip_failures = 0;
  for (size_t i = 0; i < cases.size(); ++i)
    roundtrip_failures += tok.decode(got[i]) != cases[i].decoded || cases[i].decoded != texts[i];
  CHECK(roundtrip_failures == 0);

  // encode_batch (threads share the word cache) equals encoding one by one, in order.
  for (int threads : {2, 4}) {
    const auto batch = tok.encode_batch(texts, threads);
    REQUIRE(batch.size() == texts.size());
    CHECK(batch == got);
  }
}

TEST_CASE("HF tokenizer: special tokens, ids from tokenizer_config.json, chat template, hash", "[data][hf_tokenizer]") {
  const auto& tok = main_tokenizer();
  CHECK(tok.token_id(kBos) == 0);
  CHECK(tok.token_id(kEos) == 1);
  CHECK(tok.token_id(kUser) == 2);
  CHECK(tok.token_id(kAssistant) == 3);
  CHECK(tok.token_id("<think>") == 2000);
  CHECK(tok.token_id("<|NoSuchToken|>") == -1);
  CHECK(tok.token_id("Ġthe") >= 0);  // vocabulary pieces are in byte-level form
  CHECK(tok.bos_id() == 0);
  CHECK(tok.eos_id() == 1);
  CHECK(tok.pad_id() == 1);  // {"content": ...} form
  CHECK(tok.vocab_size() == 2003);
  CHECK(tok.chat_template().find("<｜Assistant｜>") != std::string::npos);
  CHECK(tok.source() == (generated_dir() / "tokenizer.json").string());
  CHECK(tok.hash() == data::fnv1a_hex(env::read_file((generated_dir() / "tokenizer.json").string())));

  // Special tokens are never split, even glued to text, and never added by encode().
  const auto ids = tok.encode(kUser + "hi" + kAssistant);
  REQUIRE(ids.size() >= 3);
  CHECK(ids.front() == 2);
  CHECK(ids.back() == 3);
  CHECK(tok.encode("hi").front() != tok.bos_id());
  CHECK(tok.decode({0, 2}) == kBos + kUser);

  // Without tokenizer_config.json: no bos/eos/pad and no template.
  const auto bare = data::HfTokenizer::load((generated_dir() / "gpt2" / "tokenizer.json").string());
  CHECK(bare->bos_id() == -1);
  CHECK(bare->eos_id() == -1);
  CHECK(bare->pad_id() == -1);
  CHECK(bare->chat_template().empty());
  CHECK(bare->hash() != tok.hash());

  // A lone lead byte of a 4-byte character decodes to U+FFFD, as `tokenizers` does.
  const int32_t lead = tok.token_id("ð");  // byte 0xF0 in the GPT-2 byte map
  REQUIRE(lead >= 0);
  CHECK(tok.decode({lead}) == "\xEF\xBF\xBD");
}

TEST_CASE("HF tokenizer: streamed text equals whole decodes token by token (bytes split mid-character)",
          "[data][hf_tokenizer][inference]") {
  testing::check_text_stream_against_whole_decodes(main_tokenizer(), 11);
}

TEST_CASE("HF tokenizer: merges written as \"a b\" strings load the same as [a, b] pairs", "[data][hf_tokenizer]") {
  json j = main_json();
  REQUIRE(j["model"]["merges"][0].is_array());
  json merges = json::array();
  for (const auto& m : j["model"]["merges"]) merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
  j["model"]["merges"] = merges;
  ScratchFile f("strmerges", j.dump());
  const auto tok = data::HfTokenizer::load(f.file());
  for (const auto& c : read_expected(generated_dir() / "expected.jsonl")) {
    INFO(c.text);
    CHECK(tok->encode(c.text) == c.ids);
  }
}

TEST_CASE("HF tokenizer: the pre-tokenizer splits as DeepSeek-V3's does", "[data][hf_tokenizer]") {
  // `$` matches before "\n" (Oniguruma), digits go in threes, CJK runs stay whole.
  CHECK(main_tokenizer().pre_tokenize("a \n b1234567床前明月光") ==
        std::vector<std::string>{"a", " ", "\n", " b", "123", "456", "7", "床前明月光"});
}

TEST_CASE("HF tokenizer: Oniguruma \\uHHHH escapes and literal String patterns", "[data][hf_tokenizer]") {
  json j = main_json();
  auto& steps = j["pre_tokenizer"]["pretokenizers"];
  steps[1]["pattern"]["Regex"] = R"([\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+)";  // same class, escaped
  ScratchFile escaped("escapes", j.dump());
  const auto tok = data::HfTokenizer::load(escaped.file());
  for (const auto& c : read_expected(generated_dir() / "expected.jsonl")) {
    INFO(c.text);
    CHECK(tok->encode(c.text) == c.ids);
  }
  // A literal String split, then an escaped backslash followed by "u4e00" (no \u escape there).
  steps = json::array({json{{"type", "Split"}, {"pattern", {{"String", "|."}}}, {"behavior", "Isolated"}},
                       json{{"type", "Split"}, {"pattern", {{"Regex", R"(\\u4e00)"}}}, {"behavior", "Isolated"}},
                       json{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}});
  ScratchFile literal("literal", j.dump());
  CHECK(data::HfTokenizer::load(literal.file())->pre_tokenize("a|.b|c\\u4e00") ==
        std::vector<std::string>{"a", "|.", "b|c", "\\u4e00"});
}

TEST_CASE("HF tokenizer bad input: missing file, invalid JSON, unsupported parts, id out of range",
          "[data][hf_tokenizer]") {
  CHECK_THROWS_WITH(data::HfTokenizer::load("/nonexistent/dir/tokenizer.json"),
                    Catch::StartsWith("/nonexistent/dir/tokenizer.json: tokenizer.json not found"));
  CHECK_THROWS_WITH(data::load_tokenizer("/nonexistent/tok.json"), Catch::Contains("/nonexistent/tok.json"));
  // .model files and anything else go to SentencePiece, which names the file.
  CHECK_THROWS_WITH(data::load_tokenizer("/nonexistent/tok.model"),
                    Catch::StartsWith("/nonexistent/tok.model: tokenizer model not found"));
  {
    ScratchFile empty_dir("emptydir", "");
    fs::remove(empty_dir.file());
    CHECK_THROWS_WITH(data::load_tokenizer(empty_dir.dir.string()),
                      Catch::Contains("no tokenizer.json or tokenizer.model"));
  }
  {
    ScratchFile f("badjson", "{\"model\": {\"type\": \"BPE\", ");
    CHECK_THROWS_WITH(data::load_tokenizer(f.dir.string()), Catch::StartsWith(f.file() + ": invalid JSON"));
  }
  {
    ScratchFile f("wordpiece", R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})");
    CHECK_THROWS_WITH(data::load_tokenizer(f.file()),
                      Catch::StartsWith(f.file() + ": model.type 'WordPiece' is not supported"));
  }
  {
    ScratchFile f("novocab", R"({"model": {"type": "BPE", "merges": []}})");
    CHECK_THROWS_WITH(data::HfTokenizer::load(f.file()), Catch::Contains("missing field 'model.vocab'"));
  }
  {
    json j = main_json();
    j["normalizer"] = {{"type", "NFC"}};
    ScratchFile f("nfc", j.dump());
    CHECK_THROWS_WITH(data::HfTokenizer::load(f.file()),
                      Catch::StartsWith(f.file() + ": normalizer 'NFC' is not supported"));
  }
  {
    json j = main_json();
    j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed";
    ScratchFile f("removed", j.dump());
    CHECK_THROWS_WITH(data::HfTokenizer::load(f.file()), Catch::Contains("Split behavior 'Removed' is not supported"));
  }
  {
    json j = main_json();
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "([a-z";
    ScratchFile f("badregex", j.dump());
    CHECK_THROWS_WITH(data::HfTokenizer::load(f.file()), Catch::Contains("bad pre-tokenizer regex"));
  }
  {
    json j = main_json();
    j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "▁"}};
    ScratchFile f("metaspace", j.dump());
    CHECK_THROWS_WITH(data::HfTokenizer::load(f.file()),
                      Catch::Contains("pre_tokenizer type 'Metaspace' is not supported"));
  }
  {
    json j = main_json();
    j["model"]["merges"].push_back(json::array({"no-such-token", "x"}));
    ScratchFile f("badmerge", j.dump());
    CHECK_THROWS_WITH(data::HfTokenizer::load(f.file()), Catch::Contains("missing from model.vocab"));
  }
  const auto& tok = main_tokenizer();
  CHECK_THROWS_WITH(tok.decode({5, 999999}),
                    Catch::StartsWith(tok.source() + ": token id 999999 is outside the vocabulary (size 2003)"));
  CHECK_THROWS_WITH(tok.decode({-1}), Catch::Contains("token id -1 is outside the vocabulary"));
  CHECK_THROWS_WITH(tok.encode("bad \xff byte"), Catch::Contains("not valid UTF-8"));
}
