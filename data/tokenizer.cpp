#include "data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <nlohmann/json.hpp>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>
#include <unordered_map>

#include "data/text.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/progress.h"

namespace dsopen::data {

std::string fnv1a_hex(const std::string& bytes) {
  uint64_t h = 14695981039346656037ULL;
  for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ULL;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(const std::vector<std::string>& texts, int threads) const {
  std::vector<std::vector<int32_t>> out(texts.size());
  const int n = std::max(1, std::min<int>(threads > 0 ? threads : env::available_cpus(), static_cast<int>(texts.size())));
  std::vector<std::thread> pool;
  for (int t = 0; t < n; ++t)
    pool.emplace_back([&, t] {
      for (size_t i = t; i < texts.size(); i += n) out[i] = encode(texts[i]);
    });
  for (auto& th : pool) th.join();
  return out;
}

// SentencePiece writes spaces as U+2581 ("▁") internally, so a literal ▁ in the text would come back as a space.
// With byte fallback it can be kept: the text's ▁ is swapped for a private-use character no piece contains (which
// byte fallback then spells as its three UTF-8 bytes) and those three byte ids are swapped for the bytes of ▁,
// which decode to ▁ itself. Everything else about the segmentation is unchanged.
struct MetaSymbolEscape {
  static constexpr const char* kMeta = "\xE2\x96\x81";  // U+2581
  std::vector<std::string> sentinels;                     // candidate private-use characters (UTF-8)
  std::vector<std::array<int, 3>> sentinel_ids;           // their byte-piece ids
  std::array<int, 3> meta_ids{};                          // byte-piece ids of E2 96 81
  bool enabled = false;
};

struct SentencePieceTokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  MetaSymbolEscape escape;
};

namespace {

int byte_piece(const sentencepiece::SentencePieceProcessor& sp, unsigned char byte) {
  char name[8];
  std::snprintf(name, sizeof name, "<0x%02X>", byte);
  const int id = sp.PieceToId(name);
  return sp.IsByte(id) ? id : -1;
}

std::array<int, 3> byte_pieces(const sentencepiece::SentencePieceProcessor& sp, const std::string& utf8) {
  return {byte_piece(sp, utf8[0]), byte_piece(sp, utf8[1]), byte_piece(sp, utf8[2])};
}

MetaSymbolEscape make_escape(const sentencepiece::SentencePieceProcessor& sp) {
  MetaSymbolEscape e;
  e.meta_ids = byte_pieces(sp, MetaSymbolEscape::kMeta);
  if (e.meta_ids[0] < 0 || e.meta_ids[1] < 0 || e.meta_ids[2] < 0) return e;  // no byte fallback: ▁ reads as a space
  // Private-use characters U+F8FF downwards that no piece contains (so they can only come out as bytes).
  for (uint32_t cp = 0xF8FF; cp > 0xF800 && e.sentinels.size() < 8; --cp) {
    const std::string utf8{static_cast<char>(0xE0 | (cp >> 12)), static_cast<char>(0x80 | ((cp >> 6) & 0x3F)),
                           static_cast<char>(0x80 | (cp & 0x3F))};
    bool used = false;
    for (int id = 0; id < sp.GetPieceSize() && !used; ++id) used = sp.IdToPiece(id).find(utf8) != std::string::npos;
    if (used) continue;
    e.sentinels.push_back(utf8);
    e.sentinel_ids.push_back(byte_pieces(sp, utf8));
  }
  e.enabled = !e.sentinels.empty();
  return e;
}

}  // namespace

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

namespace {
// SentencePiece statuses start with the failing check: "./src/x.cc(232) [expression] Human text". Keep the text.
std::string spm_reason(const sentencepiece::util::Status& status) {
  std::string why = status.message();
  if (why.find(".cc(") != std::string::npos) {
    const auto close = why.find("] ");
    why = close == std::string::npos ? "" : why.substr(close + 2);
  }
  while (!why.empty() && (why.back() == ' ' || why.back() == '\n')) why.pop_back();
  return why;
}
}  // namespace

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::load(const std::string& path) {
  std::ifstream probe(path, std::ios::binary);
  if (!probe) throw runtime_error(path, "tokenizer model not found", "train one with dsopen-tokenizer train or fix tokenizer.path");
  const std::string bytes = env::read_file(path);
  std::unique_ptr<SentencePieceTokenizer> tok(new SentencePieceTokenizer());
  tok->impl_ = std::make_unique<Impl>();
  const auto status = tok->impl_->sp.LoadFromSerializedProto(bytes);
  if (!status.ok()) {
    const std::string why = spm_reason(status);
    throw runtime_error(path, "not a SentencePiece model" + (why.empty() ? std::string(" (corrupt or another format)") : " (" + why + ")"),
                        "point tokenizer.path at a .model file");
  }
  tok->impl_->escape = make_escape(tok->impl_->sp);
  tok->path_ = path;
  tok->hash_ = fnv1a_hex(bytes);
  return tok;
}

namespace {
// Feeds cleaned, non-empty lines of the input files to the trainer.
class LineIterator : public sentencepiece::SentenceIterator {
public:
  // `progress` (optional) hears the bytes read so far; `at_end` (optional) the number of lines, once, at the end.
  LineIterator(const std::vector<std::string>& files, bool strip, Progress* progress = nullptr,
               std::function<void(int64_t lines)> at_end = {})
      : files_(files), strip_(strip), progress_(progress), at_end_(std::move(at_end)) {
    advance();
  }
  bool done() const override { return done_; }
  void Next() override { advance(); }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return {}; }
  int64_t lines() const { return count_; }

private:
  void advance() {
    while (true) {
      if (in_.is_open() && std::getline(in_, line_)) {
        bytes_ += static_cast<int64_t>(line_.size()) + 1;
        if (progress_) progress_->update(bytes_);
      } else {
        if (in_.is_open()) in_.close();
        if (next_file_ >= files_.size()) {
          if (!done_ && at_end_ && count_ > 0) at_end_(count_);
          done_ = true;
          return;
        }
        in_.open(files_[next_file_++], std::ios::binary);
        continue;
      }
      if (strip_) line_ = strip_ansi(line_);
      if (line_.empty() || !is_valid_utf8(line_)) continue;
      ++count_;
      return;
    }
  }
  std::vector<std::string> files_;
  size_t next_file_ = 0;
  bool strip_, done_ = false;
  std::ifstream in_;
  std::string line_;
  int64_t count_ = 0, bytes_ = 0;
  Progress* progress_;
  std::function<void(int64_t)> at_end_;
};
}  // namespace

void SentencePieceTokenizer::train(const SentencePieceTrainOptions& o) {
  if (o.inputs.empty()) throw usage_error("--input", "no input files", "give one or more text files");
  for (const auto& f : o.inputs)
    if (!std::ifstream(f)) throw runtime_error(f, "input file not found or unreadable");
  env::check_output_path(o.output, env::OutputKind::File, o.inputs, o.output_name);
  if (o.model_type != "bpe" && o.model_type != "unigram")
    throw usage_error("--model-type", "'" + o.model_type + "' is not bpe or unigram");
  if (o.vocab_size < 260) throw usage_error("--vocab-size", "must be >= 260 (256 byte-fallback pieces + specials)");
  for (size_t i = 0; i < o.user_symbols.size(); ++i) {
    const std::string& s = o.user_symbols[i];
    if (s.empty() || s == "<pad>" || s == "<s>" || s == "</s>" || s == "<unk>" ||
        std::find(o.user_symbols.begin(), o.user_symbols.begin() + static_cast<std::ptrdiff_t>(i), s) !=
            o.user_symbols.begin() + static_cast<std::ptrdiff_t>(i))
      throw usage_error("--user-symbols", "'" + s + "' is empty, repeated or one of <pad> <s> </s> <unk>",
                        "give each extra token once");
  }
  if (o.output.empty()) throw usage_error(o.output_name, "missing output path");
  if (!(o.character_coverage > 0.9 && o.character_coverage <= 1.0))
    throw usage_error("--character-coverage", "must be in (0.9, 1]");

  std::string symbols;
  for (const auto& s : o.user_symbols) symbols += (symbols.empty() ? "" : ",") + s;
  const int threads = o.threads > 0 ? o.threads : env::available_cpus();
  std::unordered_map<std::string, std::string> args = {
      {"model_type", o.model_type},
      {"vocab_size", std::to_string(o.vocab_size)},
      {"byte_fallback", "true"},
      {"character_coverage", std::to_string(o.character_coverage)},
      {"split_digits", "true"},
      {"normalization_rule_name", "identity"},  // no NFKC: decode(encode(x)) must give x back
      {"add_dummy_prefix", "false"},
      {"remove_extra_whitespaces", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"max_sentence_length", "16384"},
      {"input_sentence_size", std::to_string(o.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"pad_id", "0"}, {"bos_id", "1"}, {"eos_id", "2"}, {"unk_id", "3"},
      {"num_threads", std::to_string(threads)},
      {"minloglevel", "1"},
  };
  if (!symbols.empty()) args["user_defined_symbols"] = symbols;
  // Phases: reading the text (bytes, with progress), learning the pieces (SentencePiece reports nothing inside),
  // writing the model.
  int64_t input_bytes = 0;
  for (const auto& f : o.inputs) {
    std::error_code ec;
    const auto n = std::filesystem::file_size(f, ec);
    if (!ec) input_bytes += static_cast<int64_t>(n);
  }
  Progress reading("tokenizer 1/3: reading text", input_bytes, "B");
  auto learn_start = std::chrono::steady_clock::now();
  LineIterator lines(o.inputs, o.strip_ansi, &reading, [&](int64_t n_lines) {
    reading.finish();
    spdlog::info("tokenizer 2/3: learning {} {} pieces from {} lines (SentencePiece reports no progress here)",
                 o.vocab_size, o.model_type, n_lines);
    learn_start = std::chrono::steady_clock::now();
  });
  if (lines.done()) throw runtime_error(o.inputs.front(), "no usable text in the input files (all empty or invalid UTF-8)");
  std::string model;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &lines, &model);
  if (!status.ok()) {
    const std::string why = spm_reason(status);
    // SentencePiece fails both when the vocabulary cannot hold every required character and when the corpus is
    // too small for it: the fix goes in opposite directions.
    const bool too_small = why.find("smaller than required_chars") != std::string::npos;
    throw runtime_error(o.output, "tokenizer training failed: " + why,
                        too_small ? "raise --vocab-size or lower --character-coverage"
                                  : "a smaller --vocab-size often helps on small corpora");
  }
  spdlog::info("tokenizer 3/3: learned in {}, writing {}",
               Progress::format_duration(std::chrono::duration<double>(std::chrono::steady_clock::now() - learn_start).count()),
               o.output);
  env::write_file_atomic(o.output, model);
}

namespace {
// SentencePiece numbers its pieces: control and unknown, user-defined symbols, byte pieces, then the learned ones.
// The headers give no "is user-defined" test, so those are the non-control pieces before the first byte piece.
int first_byte_piece(const sentencepiece::SentencePieceProcessor& sp) {
  const int n = sp.GetPieceSize();
  for (int id = 0; id < n; ++id)
    if (sp.IsByte(id)) return id;
  return n;
}
}  // namespace

std::string SentencePieceTokenizer::hf_tokenizer_json() const {
  const auto& sp = impl_->sp;
  const int n = sp.GetPieceSize();
  const int first_byte = first_byte_piece(sp);
  auto normal = [&](int id) {
    return id >= first_byte && !sp.IsControl(id) && !sp.IsUnknown(id) && !sp.IsByte(id) && !sp.IsUnused(id);
  };
  std::unordered_map<std::string, int> normal_ids;
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  nlohmann::ordered_json added = nlohmann::ordered_json::array();
  for (int id = 0; id < n; ++id) {
    const std::string piece = sp.IdToPiece(id);
    vocab[piece] = id;
    if (normal(id)) normal_ids.emplace(piece, id);
    else if (id < first_byte)
      added.push_back({{"id", id}, {"content", piece}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                       {"normalized", false}, {"special", sp.IsControl(id) || sp.IsUnknown(id)}});
  }
  // Merges by the merged piece's score, highest first (ties by id); within one piece by the ids of its halves —
  // transformers' SentencePieceExtractor.
  std::vector<int> by_score;
  for (int id = first_byte; id < n; ++id)
    if (normal(id)) by_score.push_back(id);
  std::stable_sort(by_score.begin(), by_score.end(), [&](int a, int b) { return sp.GetScore(a) > sp.GetScore(b); });
  nlohmann::ordered_json merges = nlohmann::ordered_json::array();
  for (int id : by_score) {
    const std::string piece = sp.IdToPiece(id);
    std::vector<std::pair<int, int>> splits;
    for (size_t k = 1; k < piece.size(); ++k) {
      if ((static_cast<unsigned char>(piece[k]) & 0xC0) == 0x80) continue;  // inside a UTF-8 character
      const auto l = normal_ids.find(piece.substr(0, k)), r = normal_ids.find(piece.substr(k));
      if (l != normal_ids.end() && r != normal_ids.end()) splits.emplace_back(l->second, r->second);
    }
    std::sort(splits.begin(), splits.end());
    for (const auto& [l, r] : splits) merges.push_back({sp.IdToPiece(l), sp.IdToPiece(r)});
  }
  const int bos = sp.bos_id();
  nlohmann::ordered_json post = nullptr;
  if (bos >= 0) {
    const std::string b = sp.IdToPiece(bos);
    post = {{"type", "TemplateProcessing"},
            {"single", {{{"SpecialToken", {{"id", b}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
            {"pair",
             {{{"SpecialToken", {{"id", b}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
              {{"SpecialToken", {{"id", b}, {"type_id", 1}}}}, {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
            {"special_tokens", {{b, {{"id", b}, {"ids", {bos}}, {"tokens", {b}}}}}}};
  }
  const std::string meta = "\xE2\x96\x81";  // U+2581
  const int unk = sp.unk_id();
  nlohmann::ordered_json j = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", meta}}},
      {"pre_tokenizer", nullptr},
      {"post_processor", post},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders",
         {{{"type", "Replace"}, {"pattern", {{"String", meta}}}, {"content", " "}}, {{"type", "ByteFallback"}},
          {{"type", "Fuse"}}}}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", unk >= 0 ? nlohmann::ordered_json(sp.IdToPiece(unk)) : nlohmann::ordered_json(nullptr)},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", true},
        {"byte_fallback", true},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", merges}}}};
  return j.dump(1, ' ', false) + "\n";
}

std::vector<int32_t> SentencePieceTokenizer::encode(const std::string& text) const {
  const MetaSymbolEscape& e = impl_->escape;
  if (!e.enabled || text.find(MetaSymbolEscape::kMeta) == std::string::npos) {
    const std::vector<int> ids = impl_->sp.EncodeAsIds(text);
    return {ids.begin(), ids.end()};
  }
  // A sentinel the text itself does not contain, so every sentinel in the escaped text stands for a ▁.
  size_t s = 0;
  while (s < e.sentinels.size() && text.find(e.sentinels[s]) != std::string::npos) ++s;
  if (s == e.sentinels.size()) {
    const std::vector<int> ids = impl_->sp.EncodeAsIds(text);
    return {ids.begin(), ids.end()};
  }
  std::string escaped;
  escaped.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    if (text.compare(i, 3, MetaSymbolEscape::kMeta) == 0) {
      escaped += e.sentinels[s];
      i += 3;
    } else {
      escaped += text[i++];
    }
  }
  const std::vector<int> ids = impl_->sp.EncodeAsIds(escaped);
  std::vector<int32_t> out(ids.begin(), ids.end());
  const auto& from = e.sentinel_ids[s];
  for (size_t i = 0; i + 2 < out.size(); ++i)
    if (out[i] == from[0] && out[i + 1] == from[1] && out[i + 2] == from[2]) {
      out[i] = e.meta_ids[0], out[i + 1] = e.meta_ids[1], out[i + 2] = e.meta_ids[2];
      i += 2;
    }
  return out;
}

std::string SentencePieceTokenizer::decode(const std::vector<int32_t>& ids) const {
  const int n = impl_->sp.GetPieceSize();
  for (int32_t id : ids)
    if (id < 0 || id >= n)
      throw runtime_error(path_, "token id " + std::to_string(id) + " is outside the vocabulary (size " +
                                     std::to_string(n) + ")");
  return impl_->sp.DecodeIds(std::vector<int>(ids.begin(), ids.end()));
}

int64_t SentencePieceTokenizer::vocab_size() const { return impl_->sp.GetPieceSize(); }
int32_t SentencePieceTokenizer::bos_id() const { return impl_->sp.bos_id(); }
int32_t SentencePieceTokenizer::eos_id() const { return impl_->sp.eos_id(); }
int32_t SentencePieceTokenizer::pad_id() const { return impl_->sp.pad_id(); }
int32_t SentencePieceTokenizer::unk_id() const { return impl_->sp.unk_id(); }
std::string SentencePieceTokenizer::piece(int32_t id) const { return impl_->sp.IdToPiece(id); }

std::vector<SentencePieceTokenizer::PieceInfo> SentencePieceTokenizer::pieces() const {
  const auto& sp = impl_->sp;
  const int n = sp.GetPieceSize();
  const int first_byte = first_byte_piece(sp);  // user-defined pieces come before it
  std::vector<PieceInfo> out;
  out.reserve(static_cast<size_t>(n));
  for (int id = 0; id < n; ++id) {
    int32_t type = 1;
    if (sp.IsUnknown(id)) type = 2;
    else if (sp.IsControl(id)) type = 3;
    else if (sp.IsByte(id)) type = 6;
    else if (sp.IsUnused(id)) type = 5;
    else if (id < first_byte) type = 4;
    out.push_back({sp.IdToPiece(id), sp.GetScore(id), type});
  }
  return out;
}

std::string SentencePieceTokenizer::model_type() const {
  // ModelProto.trainer_spec (field 2) . model_type (field 3; UNIGRAM 1 is the default), read from the protobuf wire
  // format directly: the sentencepiece headers do not expose the message.
  const std::string proto = impl_->sp.serialized_model_proto();
  auto varint = [](const std::string& b, size_t& i) {
    uint64_t v = 0;
    for (int shift = 0; i < b.size() && shift < 64; shift += 7) {
      const auto c = static_cast<uint8_t>(b[i++]);
      v |= static_cast<uint64_t>(c & 0x7f) << shift;
      if (!(c & 0x80)) break;
    }
    return v;
  };
  // Calls `on(field, wire_type, begin, end)` for each field of the message in b[begin, end).
  auto fields = [&](const std::string& b, size_t begin, size_t end, auto&& on) {
    size_t i = begin;
    while (i < end) {
      const uint64_t key = varint(b, i);
      const int field = static_cast<int>(key >> 3), wire = static_cast<int>(key & 7);
      size_t start = i;
      if (wire == 0) varint(b, i);
      else if (wire == 1) i += 8;
      else if (wire == 5) i += 4;
      else if (wire == 2) {
        const uint64_t len = varint(b, i);
        start = i;
        i += len;
      } else return;  // groups: not in this schema
      if (i > end) return;
      on(field, wire, start, i);
    }
  };
  uint64_t type = 1;
  fields(proto, 0, proto.size(), [&](int field, int wire, size_t b, size_t e) {
    if (field != 2 || wire != 2) return;
    fields(proto, b, e, [&](int f, int w, size_t vb, size_t) {
      if (f == 3 && w == 0) {
        size_t i = vb;
        type = varint(proto, i);
      }
    });
  });
  switch (type) {
    case 2: return "bpe";
    case 3: return "word";
    case 4: return "char";
    default: return "unigram";
  }
}
int32_t SentencePieceTokenizer::token_id(const std::string& piece) const {
  const int id = impl_->sp.PieceToId(piece);
  return (id == impl_->sp.unk_id() && piece != impl_->sp.IdToPiece(id)) ? -1 : id;
}

}  // namespace dsopen::data
