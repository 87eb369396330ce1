// HuggingFace tokenizer.json loader for byte-level BPE: added-token splitting, PCRE2 pre-tokenizers, rank-based
// BPE with a shared word cache, byte-level decoding. Mirrors the `tokenizers` library (Rust) step by step.
#include "data/hf_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <queue>
#include <shared_mutex>
#include <unordered_map>
#include <utility>

#include "data/text.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/json.h"

namespace dsopen::data {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// ---- UTF-8 helpers ----

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Length of the UTF-8 sequence that starts with byte `c` (1 for stray bytes).
size_t utf8_len(unsigned char c) {
  if (c < 0xC0) return 1;
  if (c < 0xE0) return 2;
  if (c < 0xF0) return 3;
  return 4;
}

// Decodes the code point at s[i] of valid UTF-8 and advances i.
uint32_t next_code_point(std::string_view s, size_t& i) {
  const unsigned char c = s[i];
  const size_t n = std::min(utf8_len(c), s.size() - i);
  uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n;
  return cp;
}

// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes U+FFFD.
std::string utf8_lossy(const std::string& s) {
  if (is_valid_utf8(s)) return s;
  std::string out;
  out.reserve(s.size() + 8);
  const size_t n = s.size();
  size_t i = 0;
  auto in = [&](size_t k, unsigned lo, unsigned hi) {
    if (k >= n) return false;
    const unsigned char b = s[k];
    return b >= lo && b <= hi;
  };
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF)
      len = 2;
    else if (c == 0xE0)
      len = 3, lo = 0xA0;
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
      len = 3;
    else if (c == 0xED)
      len = 3, hi = 0x9F;
    else if (c == 0xF0)
      len = 4, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3)
      len = 4;
    else if (c == 0xF4)
      len = 4, hi = 0x8F;
    size_t k = 1;
    if (len > 0 && in(i + 1, lo, hi)) {
      k = 2;
      while (k < len && in(i + k, 0x80, 0xBF)) ++k;
    }
    if (len > 0 && k == len)
      out.append(s, i, len);
    else
      out += "\xEF\xBF\xBD";
    i += k;
  }
  return out;
}

// Unicode White_Space (Rust's char::is_whitespace), for added tokens' lstrip/rstrip.
bool is_unicode_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// ---- GPT-2 byte <-> printable code point map ----

struct ByteMap {
  std::array<uint32_t, 256> to_cp{};
  std::array<int16_t, 324> to_byte{};  // code points used are < 256 + 68
  ByteMap() {
    to_byte.fill(-1);
    uint32_t extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_cp[b] = printable ? static_cast<uint32_t>(b) : 256 + extra++;
      to_byte[to_cp[b]] = static_cast<int16_t>(b);
    }
  }
  std::string map(std::string_view bytes) const {
    std::string out;
    out.reserve(bytes.size() * 2);
    for (unsigned char b : bytes) append_utf8(out, to_cp[b]);
    return out;
  }
  // The ByteLevel decoder's rule for one token: its bytes when every character is a mapped byte, else the
  // token's own UTF-8 (special tokens such as "<｜User｜>").
  std::string unmap(const std::string& token) const {
    std::string out;
    size_t i = 0;
    while (i < token.size()) {
      const uint32_t cp = next_code_point(token, i);
      if (cp >= to_byte.size() || to_byte[cp] < 0) return token;
      out += static_cast<char>(to_byte[cp]);
    }
    return out;
  }
};

const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

// ---- PCRE2 regex with Oniguruma (Ruby syntax) semantics ----

// Per-thread match data and JIT stack: compiled patterns are shared, match state must not be.
struct MatchScratch {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
  MatchScratch() { pcre2_jit_stack_assign(context, nullptr, stack); }
  ~MatchScratch() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
  MatchScratch(const MatchScratch&) = delete;
  MatchScratch& operator=(const MatchScratch&) = delete;
};

MatchScratch& scratch() {
  thread_local MatchScratch s;
  return s;
}

// Translates the Oniguruma (Ruby syntax) escapes whose PCRE2 meaning differs: \uHHHH is \x{HHHH}; \s and \S are
// Unicode White_Space (PCRE2's \s also takes U+180E). Everything else is passed through.
std::string onig_to_pcre2(const std::string& p) {
  std::string out;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] != '\\' || i + 1 >= p.size()) {
      out += p[i];
      continue;
    }
    const auto hex = [&](size_t k) { return k < p.size() && std::isxdigit(static_cast<unsigned char>(p[k])); };
    if (p[i + 1] == 'u' && hex(i + 2) && hex(i + 3) && hex(i + 4) && hex(i + 5)) {
      out += "\\x{" + p.substr(i + 2, 4) + "}";
      i += 5;
    } else if (p[i + 1] == 's' || p[i + 1] == 'S') {
      out += p[i + 1] == 's' ? "\\p{White_Space}" : "\\P{White_Space}";
      ++i;
    } else {
      out += p[i];
      out += p[++i];
    }
  }
  return out;
}

class Regex {
public:
  Regex(const std::string& pattern, bool literal, const std::string& where) : where_(where) {
    pcre2_compile_context* cc = pcre2_compile_context_create(nullptr);
    pcre2_set_newline(cc, PCRE2_NEWLINE_LF);  // Oniguruma: only "\n" ends a line
    const std::string p = literal ? pattern : onig_to_pcre2(pattern);
    int err = 0;
    PCRE2_SIZE offset = 0;
    const uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP | PCRE2_MULTILINE);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(), options, &err, &offset, cc);
    pcre2_compile_context_free(cc);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw runtime_error(where, "bad pre-tokenizer regex at offset " + std::to_string(offset) + ": " +
                                     reinterpret_cast<const char*>(msg) + " in /" + pattern + "/");
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is unavailable
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Calls cut(start, end) for every match of `s` in order, as the onig crate's find_iter does (an empty match
  // right after the previous match is skipped). `s` must be valid UTF-8 and is not looked beyond.
  template <typename F>
  void for_each_match(std::string_view s, F&& cut) const {
    MatchScratch& m = scratch();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t from = 0;
    bool have_last = false;
    size_t last_match_end = 0;
    while (from <= s.size()) {
      const int rc = pcre2_match(code_, subject, s.size(), from, PCRE2_NO_UTF_CHECK, m.data, m.context);
      if (rc == PCRE2_ERROR_NOMATCH) return;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        throw runtime_error(where_,
                            std::string("pre-tokenizer regex match failed: ") + reinterpret_cast<const char*>(msg));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(m.data);
      const size_t start = ov[0], end = ov[1];
      if (start == end && have_last && last_match_end == end) {
        from += from < s.size() ? utf8_len(static_cast<unsigned char>(s[from])) : 1;
        continue;
      }
      from = end;
      have_last = true;
      last_match_end = end;
      cut(start, end);
    }
  }

private:
  pcre2_code* code_ = nullptr;
  std::string where_;
};

const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---- JSON access with file-naming errors ----

std::string json_type(const json& j) { return j.is_null() ? "null" : j.type_name(); }

const json& need(const json& j, const char* key, const std::string& ctx, const std::string& file) {
  if (!j.is_object() || !j.contains(key))
    throw runtime_error(file, "missing field '" + ctx + (ctx.empty() ? "" : ".") + key + "'",
                        "expected a HuggingFace tokenizer.json");
  return j.at(key);
}

std::string need_string(const json& j, const std::string& what, const std::string& file) {
  if (!j.is_string()) throw runtime_error(file, what + " must be a string, not " + json_type(j));
  return j.get<std::string>();
}

bool opt_bool(const json& j, const char* key, bool fallback) {
  if (!j.is_object() || !j.contains(key) || j.at(key).is_null()) return fallback;
  return j.at(key).get<bool>();
}

json parse_json_file(const std::string& path) {
  const std::string text = env::read_file(path);
  try {
    return dsopen::json::parse(text, path);
  } catch (const json::parse_error& e) {
    throw runtime_error(path, std::string("invalid JSON: ") + dsopen::json::reason(e));
  }
}

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool lstrip = false, rstrip = false, normalized = false;
};

// Leftmost-longest literal matching of a set of added tokens (HF uses Aho-Corasick, LeftmostLongest).
class AddedMatcher {
public:
  void add(const AddedToken* t) {
    if (t->content.empty()) return;
    auto& list = by_first_[static_cast<unsigned char>(t->content[0])];
    list.push_back(t);
    std::stable_sort(list.begin(), list.end(),
                     [](const AddedToken* a, const AddedToken* b) { return a->content.size() > b->content.size(); });
    empty_ = false;
  }
  bool empty() const { return empty_; }
  // The longest token matching at the leftmost position >= from, or nullptr.
  const AddedToken* find(std::string_view s, size_t from, size_t& at) const {
    for (size_t i = from; i < s.size(); ++i) {
      const auto& list = by_first_[static_cast<unsigned char>(s[i])];
      for (const AddedToken* t : list)
        if (t->content.size() <= s.size() - i && std::memcmp(s.data() + i, t->content.data(), t->content.size()) == 0) {
          at = i;
          return t;
        }
    }
    return nullptr;
  }

private:
  std::array<std::vector<const AddedToken*>, 256> by_first_;
  bool empty_ = true;
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

struct HfTokenizer::Impl {
  std::string file;
  // BPE model
  std::unordered_map<std::string, int32_t> vocab;                    // byte-level form -> id
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left id, right id) -> (rank, merged id)
  std::array<int32_t, 256> byte_id{};                                // id of each single byte, -1 if absent
  int32_t unk_id = -1;
  bool fuse_unk = false, ignore_merges = false;
  // added tokens, split in two passes as HF does: not normalized first, then normalized
  std::vector<AddedToken> added;
  std::unordered_map<std::string, int32_t> added_ids;
  AddedMatcher raw_matcher, normalized_matcher;
  // pre-tokenizer: regex splits (Isolated), applied in order to every piece
  std::vector<std::unique_ptr<Regex>> splits;
  // decode table
  std::vector<std::string> id_bytes;
  std::vector<char> has_id;
  int32_t bos = -1, eos = -1, pad = -1;
  // word cache (raw bytes of a pre-token -> ids), shared by concurrent encode() calls
  mutable std::shared_mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;
  static constexpr size_t kCacheCapacity = 100000, kCacheMaxWord = 256;

  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  void parse_model(const json& model);
  void parse_pre_tokenizer(const json& p, bool& byte_level, bool nested);
  void split_pieces(std::string_view text, std::vector<std::pair<size_t, size_t>>& pieces) const;
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  void bpe_cached(std::string_view word, std::vector<int32_t>& out) const;
  void encode_text(std::string_view text, std::vector<int32_t>& out) const;
  void split_added(std::string_view text, const AddedMatcher& m, const std::function<void(std::string_view)>& on_text,
                   std::vector<int32_t>& out) const;
};

void HfTokenizer::Impl::parse_model(const json& model) {
  const std::string type = model.contains("type") ? need_string(model.at("type"), "model.type", file)
                                                  : (model.contains("merges") ? "BPE" : "");
  if (type != "BPE")
    throw runtime_error(file, "model.type '" + type + "' is not supported (only byte-level BPE)",
                        "use a BPE tokenizer.json such as DeepSeek's or Qwen2's");
  if (model.contains("dropout") && !model.at("dropout").is_null() && model.at("dropout").get<double>() != 0.0)
    throw runtime_error(file, "model.dropout is not supported");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model.contains(key) && !model.at(key).is_null() && !model.at(key).get<std::string>().empty())
      throw runtime_error(file, std::string("model.") + key + " is not supported (not a byte-level BPE)");
  if (opt_bool(model, "byte_fallback", false))
    throw runtime_error(file, "model.byte_fallback is not supported (not a byte-level BPE)");
  fuse_unk = opt_bool(model, "fuse_unk", false);
  ignore_merges = opt_bool(model, "ignore_merges", false);

  const json& v = need(model, "vocab", "model", file);
  if (!v.is_object()) throw runtime_error(file, "model.vocab must be an object {token: id}");
  vocab.reserve(v.size());
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > INT32_MAX)
      throw runtime_error(file, "model.vocab['" + it.key() + "'] is not a valid id");
    vocab.emplace(it.key(), it.value().get<int32_t>());
  }
  if (model.contains("unk_token") && !model.at("unk_token").is_null()) {
    const std::string unk = need_string(model.at("unk_token"), "model.unk_token", file);
    auto it = vocab.find(unk);
    if (it == vocab.end()) throw runtime_error(file, "model.unk_token '" + unk + "' is not in model.vocab");
    unk_id = it->second;
  }
  for (int b = 0; b < 256; ++b) {
    std::string c;
    append_utf8(c, byte_map().to_cp[b]);
    auto it = vocab.find(c);
    byte_id[b] = it == vocab.end() ? -1 : it->second;
  }

  const json& m = need(model, "merges", "model", file);
  if (!m.is_array()) throw runtime_error(file, "model.merges must be an array");
  merges.reserve(m.size());
  for (size_t rank = 0; rank < m.size(); ++rank) {
    const json& e = m[rank];
    std::string a, b;
    if (e.is_string()) {  // "a b"
      const std::string s = e.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        throw runtime_error(file, "model.merges[" + std::to_string(rank) + "] '" + s + "' is not two tokens 'a b'");
      a = s.substr(0, sp), b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {  // ["a", "b"]
      a = e[0].get<std::string>(), b = e[1].get<std::string>();
    } else {
      throw runtime_error(file, "model.merges[" + std::to_string(rank) + "] is neither \"a b\" nor [\"a\", \"b\"]");
    }
    auto ia = vocab.find(a), ib = vocab.find(b), iab = vocab.find(a + b);
    if (ia == vocab.end() || ib == vocab.end() || iab == vocab.end())
      throw runtime_error(file, "model.merges[" + std::to_string(rank) + "] ('" + a + "', '" + b +
                                    "') uses a token missing from model.vocab");
    // A repeated pair takes its last rank, as HF's HashMap collect does.
    merges.insert_or_assign(pair_key(ia->second, ib->second), std::make_pair(static_cast<int32_t>(rank), iab->second));
  }
}

void HfTokenizer::Impl::parse_pre_tokenizer(const json& p, bool& byte_level, bool nested) {
  if (p.is_null())
    throw runtime_error(file,
                        "pre_tokenizer is null: not a byte-level BPE tokenizer (a ByteLevel pre-tokenizer is needed)");
  const std::string type = need_string(need(p, "type", "pre_tokenizer", file), "pre_tokenizer.type", file);
  if (byte_level)
    throw runtime_error(file, "pre_tokenizer " + type + " after ByteLevel is not supported (ByteLevel must be last)");
  if (type == "Sequence") {
    if (nested) throw runtime_error(file, "nested pre_tokenizer Sequence is not supported");
    const json& list = need(p, "pretokenizers", "pre_tokenizer", file);
    if (!list.is_array()) throw runtime_error(file, "pre_tokenizer.pretokenizers must be an array");
    for (const json& s : list) parse_pre_tokenizer(s, byte_level, true);
  } else if (type == "Split") {
    const std::string behavior = need_string(need(p, "behavior", "pre_tokenizer", file), "Split.behavior", file);
    if (behavior != "Isolated")
      throw runtime_error(file, "pre_tokenizer Split behavior '" + behavior + "' is not supported (only Isolated)");
    // With Isolated, matches and the text between them all become pieces: `invert` changes nothing.
    const json& pattern = need(p, "pattern", "pre_tokenizer", file);
    if (pattern.contains("Regex"))
      splits.push_back(
          std::make_unique<Regex>(need_string(pattern.at("Regex"), "Split.pattern.Regex", file), false, file));
    else if (pattern.contains("String"))
      splits.push_back(
          std::make_unique<Regex>(need_string(pattern.at("String"), "Split.pattern.String", file), true, file));
    else
      throw runtime_error(file, "pre_tokenizer Split.pattern needs 'Regex' or 'String'");
  } else if (type == "Digits") {
    splits.push_back(
        std::make_unique<Regex>(opt_bool(p, "individual_digits", false) ? "\\p{N}" : "\\p{N}+", false, file));
  } else if (type == "ByteLevel") {
    if (opt_bool(p, "add_prefix_space", false))
      throw runtime_error(file, "pre_tokenizer ByteLevel add_prefix_space=true is not supported");
    if (opt_bool(p, "use_regex", true)) splits.push_back(std::make_unique<Regex>(kGpt2Pattern, false, file));
    byte_level = true;
  } else {
    throw runtime_error(file, "pre_tokenizer type '" + type + "' is not supported",
                        "supported: Sequence, Split (Isolated), Digits, ByteLevel");
  }
}

// Applies the regex splits in order; every step re-splits each piece, never looking beyond it.
void HfTokenizer::Impl::split_pieces(std::string_view text, std::vector<std::pair<size_t, size_t>>& pieces) const {
  pieces.clear();
  if (text.empty()) return;
  pieces.emplace_back(0, text.size());
  std::vector<std::pair<size_t, size_t>> next;
  for (const auto& re : splits) {
    next.clear();
    for (const auto& [b, e] : pieces) {
      size_t prev = b;
      re->for_each_match(text.substr(b, e - b), [&](size_t s, size_t t) {
        if (b + s > prev) next.emplace_back(prev, b + s);
        if (t > s) next.emplace_back(b + s, b + t);
        prev = b + t;
      });
      if (e > prev) next.emplace_back(prev, e);
    }
    pieces.swap(next);
  }
}

// Rank-based BPE merging of one pre-token (HF's Word::merge_all): always the lowest-ranked adjacent pair first,
// the leftmost among equals.
void HfTokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    auto it = vocab.find(byte_map().map(word));
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  struct Sym {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<Sym> syms;
  syms.reserve(word.size());
  bool pending_unk = false;
  auto push = [&](int32_t id) {
    const int32_t n = static_cast<int32_t>(syms.size());
    syms.push_back({id, n - 1, n + 1, true});
  };
  for (unsigned char c : word) {
    const int32_t id = byte_id[c];
    if (id >= 0) {
      if (pending_unk) {
        push(unk_id);
        pending_unk = false;
      }
      push(id);
    } else if (unk_id >= 0) {  // without an unk token HF drops the byte
      if (pending_unk && !fuse_unk) push(unk_id);
      pending_unk = true;
    }
  }
  if (pending_unk) push(unk_id);
  if (syms.empty()) return;
  syms.back().next = -1;

  struct Cand {
    int32_t rank, pos, new_id;
    bool operator<(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }  // min-heap
  };
  std::vector<Cand> heap_storage;
  heap_storage.reserve(syms.size());
  std::priority_queue<Cand> queue(std::less<Cand>(), std::move(heap_storage));
  auto consider = [&](int32_t pos) {
    const int32_t nx = syms[pos].next;
    if (nx < 0) return;
    auto it = merges.find(pair_key(syms[pos].id, syms[nx].id));
    if (it != merges.end()) queue.push({it->second.first, pos, it->second.second});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) consider(i);
  while (!queue.empty()) {
    const Cand top = queue.top();
    queue.pop();
    Sym& left = syms[top.pos];
    if (!left.alive || left.next < 0) continue;
    Sym& right = syms[left.next];
    auto it = merges.find(pair_key(left.id, right.id));
    if (it == merges.end() || it->second.second != top.new_id) continue;  // stale entry
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) syms[right.next].prev = top.pos;
    if (left.prev >= 0) consider(left.prev);
    consider(top.pos);
  }
  for (int32_t i = 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
}

void HfTokenizer::Impl::bpe_cached(std::string_view word, std::vector<int32_t>& out) const {
  if (word.size() >= kCacheMaxWord) return bpe(word, out);
  const std::string key(word);
  {
    std::shared_lock lock(cache_mutex);
    auto it = cache.find(key);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t start = out.size();
  bpe(word, out);
  std::unique_lock lock(cache_mutex);
  if (cache.size() < kCacheCapacity) cache.emplace(key, std::vector<int32_t>(out.begin() + start, out.end()));
}

void HfTokenizer::Impl::encode_text(std::string_view text, std::vector<int32_t>& out) const {
  std::vector<std::pair<size_t, size_t>> pieces;
  split_pieces(text, pieces);
  for (const auto& [b, e] : pieces) bpe_cached(text.substr(b, e - b), out);
}

// HF's AddedVocabulary::split_with_indices: leftmost-longest matches become their ids (with lstrip/rstrip
// taking neighbouring whitespace), the text between goes to on_text.
void HfTokenizer::Impl::split_added(std::string_view text, const AddedMatcher& m,
                                    const std::function<void(std::string_view)>& on_text,
                                    std::vector<int32_t>& out) const {
  if (m.empty()) return on_text(text);
  size_t start_offset = 0, from = 0, at = 0;
  while (const AddedToken* t = m.find(text, from, at)) {
    size_t start = at, stop = at + t->content.size();
    from = stop;
    if (t->lstrip) {
      size_t s = start;
      while (s > 0) {  // step back over whitespace characters
        size_t k = s - 1;
        while (k > 0 && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
        size_t j = k;
        if (!is_unicode_space(next_code_point(text, j))) break;
        s = k;
      }
      start = std::max(s, start_offset);
    }
    if (t->rstrip) {
      while (stop < text.size()) {
        size_t j = stop;
        if (!is_unicode_space(next_code_point(text, j))) break;
        stop = j;
      }
    }
    if (start_offset < start) on_text(text.substr(start_offset, start - start_offset));
    out.push_back(t->id);
    start_offset = stop;
  }
  if (start_offset < text.size()) on_text(text.substr(start_offset));
}

// ---------------------------------------------------------------------------------------------------------------

HfTokenizer::HfTokenizer() = default;
HfTokenizer::~HfTokenizer() = default;

std::unique_ptr<HfTokenizer> HfTokenizer::load(const std::string& path_or_dir) {
  std::error_code ec;
  const bool is_dir = fs::is_directory(path_or_dir, ec);
  const std::string file = is_dir ? (fs::path(path_or_dir) / "tokenizer.json").string() : path_or_dir;
  if (!fs::is_regular_file(file, ec))
    throw runtime_error(file, "tokenizer.json not found", "give a tokenizer.json file or a directory holding one");
  const std::string bytes = env::read_file(file);
  json root;
  try {
    root = dsopen::json::parse(bytes, file);
  } catch (const json::parse_error& e) {
    throw runtime_error(file, std::string("invalid JSON: ") + dsopen::json::reason(e));
  }
  if (!root.is_object()) throw runtime_error(file, "not a tokenizer.json (top level is not an object)");

  std::unique_ptr<HfTokenizer> tok(new HfTokenizer());
  tok->path_ = file;
  tok->hash_ = fnv1a_hex(bytes);
  tok->impl_ = std::make_unique<Impl>();
  Impl& im = *tok->impl_;
  im.file = file;
  try {
    im.parse_model(need(root, "model", "", file));

    if (root.contains("normalizer") && !root.at("normalizer").is_null()) {
      const json& n = root.at("normalizer");
      const std::string type = need_string(need(n, "type", "normalizer", file), "normalizer.type", file);
      const bool empty_sequence = type == "Sequence" && n.contains("normalizers") && n.at("normalizers").is_array() &&
                                  n.at("normalizers").empty();
      if (!empty_sequence)
        throw runtime_error(file, "normalizer '" + type + "' is not supported (only none)",
                            "this loader handles byte-level BPE files without normalization");
    }

    bool byte_level = false;
    im.parse_pre_tokenizer(root.contains("pre_tokenizer") ? root.at("pre_tokenizer") : json(), byte_level, false);
    if (!byte_level) throw runtime_error(file, "pre_tokenizer has no ByteLevel step: not a byte-level BPE tokenizer");

    if (root.contains("decoder") && !root.at("decoder").is_null()) {
      const std::string type = need_string(need(root.at("decoder"), "type", "decoder", file), "decoder.type", file);
      if (type != "ByteLevel") throw runtime_error(file, "decoder '" + type + "' is not supported (only ByteLevel)");
    }

    if (root.contains("added_tokens") && !root.at("added_tokens").is_null()) {
      const json& list = root.at("added_tokens");
      if (!list.is_array()) throw runtime_error(file, "added_tokens must be an array");
      for (const json& a : list) {
        AddedToken t;
        t.content = need_string(need(a, "content", "added_tokens[]", file), "added_tokens[].content", file);
        const json& id = need(a, "id", "added_tokens[]", file);
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
          throw runtime_error(file, "added token '" + t.content + "' has an invalid id");
        t.id = id.get<int32_t>();
        t.lstrip = opt_bool(a, "lstrip", false);
        t.rstrip = opt_bool(a, "rstrip", false);
        t.normalized = opt_bool(a, "normalized", !opt_bool(a, "special", false));
        if (opt_bool(a, "single_word", false))
          throw runtime_error(file, "added token '" + t.content + "': single_word=true is not supported");
        im.added.push_back(t);
      }
      for (const AddedToken& t : im.added) {
        im.added_ids[t.content] = t.id;
        (t.normalized ? im.normalized_matcher : im.raw_matcher).add(&t);
      }
    }
  } catch (const json::exception& e) {  // a field of the wrong JSON type
    throw runtime_error(file, std::string("malformed tokenizer.json: ") + dsopen::json::reason(e));
  }

  // Decode table: vocab pieces through the byte map; added tokens override their ids.
  int64_t size = 0;
  for (const auto& [piece, id] : im.vocab) size = std::max<int64_t>(size, int64_t{id} + 1);
  for (const auto& t : im.added) size = std::max<int64_t>(size, int64_t{t.id} + 1);
  im.id_bytes.assign(size, {});
  im.has_id.assign(size, 0);
  for (const auto& [piece, id] : im.vocab) im.id_bytes[id] = byte_map().unmap(piece), im.has_id[id] = 1;
  for (const auto& t : im.added) im.id_bytes[t.id] = byte_map().unmap(t.content), im.has_id[t.id] = 1;

  // tokenizer_config.json: special token names and the chat template.
  const fs::path config = fs::path(file).parent_path() / "tokenizer_config.json";
  if (fs::is_regular_file(config, ec)) {
    try {
      const std::string cfile = config.string();
      const json c = parse_json_file(cfile);
      auto special = [&](const char* key) -> int32_t {
        if (!c.contains(key) || c.at(key).is_null()) return -1;
        const json& v = c.at(key);
        const std::string piece =
            v.is_object() ? need_string(need(v, "content", key, cfile), std::string(key) + ".content", cfile)
                          : need_string(v, key, cfile);
        const int32_t id = tok->token_id(piece);
        if (id < 0)
          throw runtime_error(cfile, std::string(key) + " '" + piece + "' is not in the vocabulary of " + file);
        return id;
      };
      im.bos = special("bos_token");
      im.eos = special("eos_token");
      im.pad = special("pad_token");
      if (c.contains("chat_template") && !c.at("chat_template").is_null()) {
        const json& t = c.at("chat_template");
        if (t.is_string()) {
          tok->chat_template_ = t.get<std::string>();
        } else if (t.is_array()) {  // [{"name": "default", "template": "..."}, ...]
          for (const json& e : t)
            if (e.is_object() && e.value("name", "") == "default" && e.contains("template"))
              tok->chat_template_ = need_string(e.at("template"), "chat_template[].template", cfile);
        } else {
          throw runtime_error(cfile, "chat_template must be a string or a list of {name, template}");
        }
      }
    } catch (const json::exception& e) {
      throw runtime_error(config.string(), std::string("malformed tokenizer_config.json: ") + dsopen::json::reason(e));
    }
  }
  return tok;
}

std::vector<int32_t> HfTokenizer::encode(const std::string& text) const {
  if (!is_valid_utf8(text))
    throw runtime_error(path_, "cannot encode text that is not valid UTF-8", "drop or replace the invalid bytes first");
  const Impl& im = *impl_;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  const std::function<void(std::string_view)> normal = [&](std::string_view s) { im.encode_text(s, out); };
  const std::function<void(std::string_view)> second = [&](std::string_view s) {
    im.split_added(s, im.normalized_matcher, normal, out);
  };
  im.split_added(text, im.raw_matcher, second, out);
  return out;
}

std::vector<std::string> HfTokenizer::pre_tokenize(const std::string& text) const {
  if (!is_valid_utf8(text)) throw runtime_error(path_, "cannot pre-tokenize text that is not valid UTF-8");
  std::vector<std::pair<size_t, size_t>> pieces;
  impl_->split_pieces(text, pieces);
  std::vector<std::string> out;
  for (const auto& [b, e] : pieces) out.push_back(text.substr(b, e - b));
  return out;
}

std::string HfTokenizer::decode(const std::vector<int32_t>& ids) const {
  const Impl& im = *impl_;
  std::string bytes;
  for (int32_t id : ids) {
    if (id < 0 || id >= static_cast<int64_t>(im.id_bytes.size()) || !im.has_id[id])
      throw runtime_error(path_, "token id " + std::to_string(id) + " is outside the vocabulary (size " +
                                     std::to_string(im.id_bytes.size()) + ")");
    bytes += im.id_bytes[id];
  }
  return utf8_lossy(bytes);
}

int64_t HfTokenizer::vocab_size() const { return static_cast<int64_t>(impl_->id_bytes.size()); }
int32_t HfTokenizer::bos_id() const { return impl_->bos; }
int32_t HfTokenizer::eos_id() const { return impl_->eos; }
int32_t HfTokenizer::pad_id() const { return impl_->pad; }

int32_t HfTokenizer::token_id(const std::string& piece) const {
  if (auto it = impl_->added_ids.find(piece); it != impl_->added_ids.end()) return it->second;
  if (auto it = impl_->vocab.find(piece); it != impl_->vocab.end()) return it->second;
  return -1;
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  std::error_code ec;
  const fs::path p(path);
  if (fs::is_directory(p, ec)) {
    // Both: a SentencePiece model with its HF conversion beside it (Llama-2, Mistral, dsopen exports); the .model
    // is the original, and SentencePiece applies its own normalization exactly.
    if (fs::is_regular_file(p / "tokenizer.model", ec))
      return SentencePieceTokenizer::load((p / "tokenizer.model").string());
    if (fs::is_regular_file(p / "tokenizer.json", ec)) return HfTokenizer::load(path);
    throw runtime_error(path, "no tokenizer.json or tokenizer.model in this directory",
                        "point tokenizer.path at a tokenizer file or a model directory");
  }
  if (p.extension() == ".json") return HfTokenizer::load(path);
  return SentencePieceTokenizer::load(path);
}

}  // namespace dsopen::data
