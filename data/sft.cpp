// SFT data: chat JSONL parsing, masked tokenization, truncation, best-fit packing and rank-sharded epoch order.
#include "data/sft.h"

#include <filesystem>

#include "data/chat_format.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <map>
#include <random>

#include "utils/errors.h"
#include "utils/json.h"

namespace dsopen::data {

namespace {
constexpr int32_t kIgnore = -100;

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Fisher-Yates with std::mt19937_64 (std::shuffle's algorithm is library-specific; this order is not).
void shuffle(std::vector<int64_t>& v, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng() % i]);
}

std::vector<int64_t> iota(size_t n) {
  std::vector<int64_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<int64_t>(i);
  return v;
}

Conversation parse_line(const std::string& line, const std::string& where) {
  nlohmann::json j;
  try {
    j = json::parse(line, where);
  } catch (const nlohmann::json::exception& e) {
    throw runtime_error(where, "not valid JSON (" + json::reason(e) + ")");
  }
  if (!j.is_object()) throw runtime_error(where, "expected a JSON object, got " + std::string(j.type_name()));
  Conversation c;
  if (j.contains("messages")) {
    const auto& msgs = j["messages"];
    if (!msgs.is_array()) throw runtime_error(where, "\"messages\" must be an array of {\"role\",\"content\"} objects");
    for (size_t k = 0; k < msgs.size(); ++k) {
      const auto& m = msgs[k];
      const std::string which = "message " + std::to_string(k + 1);
      if (!m.is_object() || !m.contains("role") || !m.contains("content") || !m["role"].is_string() ||
          !m["content"].is_string())
        throw runtime_error(where, which + " needs string fields \"role\" and \"content\"");
      const std::string role = m["role"].get<std::string>();
      if (role != "system" && role != "user" && role != "assistant")
        throw runtime_error(where, which + " has unknown role '" + role + "'", "use system, user or assistant");
      c.messages.push_back({role, m["content"].get<std::string>()});
    }
  } else if (j.contains("prompt") && j.contains("response")) {
    if (!j["prompt"].is_string() || !j["response"].is_string())
      throw runtime_error(where, "\"prompt\" and \"response\" must be strings");
    c.messages.push_back({"user", j["prompt"].get<std::string>()});
    c.messages.push_back({"assistant", j["response"].get<std::string>()});
  } else {
    throw runtime_error(where, "missing \"messages\" or \"prompt\"/\"response\"");
  }
  bool has_assistant = false;
  for (const auto& m : c.messages) has_assistant |= m.role == "assistant";
  if (!has_assistant) throw runtime_error(where, "no assistant message (nothing to train on)");
  return c;
}
}  // namespace

void decode(config::Reader& r, ChatTemplate& t) {
  r.optional("system_prefix", t.system_prefix);
  r.optional("system_suffix", t.system_suffix);
  r.optional("user_prefix", t.user_prefix);
  r.optional("user_suffix", t.user_suffix);
  r.optional("assistant_prefix", t.assistant_prefix);
  r.optional("assistant_suffix", t.assistant_suffix);
  r.optional("add_bos", t.add_bos);
  r.optional("add_eos", t.add_eos);
  r.optional("jinja", t.jinja);
  if (!t.jinja.empty() && !std::filesystem::exists(t.jinja))
    r.error("jinja", "'" + t.jinja + "' does not exist (a chat_template.jinja, tokenizer_config.json or model directory)");
  r.finish();
}

std::vector<Conversation> read_sft_jsonl(const std::string& path, int64_t* skipped) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw runtime_error(path, "SFT data file not found or unreadable", "check data.train / data.valid");
  std::vector<Conversation> out;
  int64_t blank = 0, line_no = 0;
  std::string line;
  while (std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) {
      ++blank;
      continue;
    }
    out.push_back(parse_line(line, path + ":" + std::to_string(line_no)));
  }
  if (in.bad()) throw runtime_error(path, "read error");
  if (out.empty()) throw runtime_error(path, "no conversations (the file is empty)", "one JSON object per line");
  if (skipped) *skipped = blank;
  return out;
}

TokenizedConversation tokenize_conversation(const Conversation& conv, const Tokenizer& tok, const ChatTemplate& t) {
  std::vector<int32_t> ids;
  std::vector<char> target;  // [n] whether token i is assistant output (a loss target)
  auto add = [&](const std::vector<int32_t>& piece, bool trained) {
    ids.insert(ids.end(), piece.begin(), piece.end());
    target.insert(target.end(), piece.size(), trained ? 1 : 0);
  };
  auto add_text = [&](const std::string& text, bool trained) {
    if (!text.empty()) add(tok.encode(text), trained);
  };
  if (t.add_bos) {
    if (tok.bos_id() < 0) throw usage_error(tok.source(), "tokenizer has no bos token", "set add_bos: false");
    add({tok.bos_id()}, false);
  }
  for (const auto& m : conv.messages) {
    if (m.role == "system") {
      add_text(t.system_prefix, false);
      add_text(m.content, false);
      add_text(t.system_suffix, false);
    } else if (m.role == "user") {
      add_text(t.user_prefix, false);
      add_text(m.content, false);
      add_text(t.user_suffix, false);
    } else if (m.role == "assistant") {
      add_text(t.assistant_prefix, false);
      add_text(m.content, true);
      add_text(t.assistant_suffix, true);
    } else {
      throw runtime_error("conversation", "unknown role '" + m.role + "'", "use system, user or assistant");
    }
  }
  if (t.add_eos) {
    if (tok.eos_id() < 0) throw usage_error(tok.source(), "tokenizer has no eos token", "set add_eos: false");
    add({tok.eos_id()}, !conv.messages.empty() && conv.messages.back().role == "assistant");
  }
  TokenizedConversation out;
  out.labels.assign(ids.size(), kIgnore);
  for (size_t i = 0; i + 1 < ids.size(); ++i)
    if (target[i + 1]) out.labels[i] = ids[i + 1];
  out.ids = std::move(ids);
  return out;
}

SftDataset::SftDataset(const std::vector<Conversation>& conversations, const Tokenizer& tok, ChatTemplate tmpl,
                       int64_t seq_len, Truncation truncation, bool pack, uint64_t seed, int rank, int world_size,
                       const std::string& source)
    : seq_len_(seq_len), pack_(pack), pad_id_(tok.pad_id()), seed_(seed), rank_(rank), world_size_(world_size) {
  if (seq_len < 1) throw usage_error("data.seq_len", "must be >= 1");
  if (world_size < 1 || rank < 0 || rank >= world_size)
    throw usage_error("SftDataset", "rank " + std::to_string(rank) + " is outside world size " + std::to_string(world_size));
  if (pad_id_ < 0) throw usage_error(tok.source(), "tokenizer has no pad token; SFT rows need one for padding");

  int64_t too_long = 0, no_target = 0;
  const ChatFormat format = ChatFormat::for_template(tmpl);  // the one renderer generation and serving use too
  for (const auto& conv : conversations) {
    TokenizedConversation tc = format.tokenize(conv, tok);
    if (static_cast<int64_t>(tc.ids.size()) > seq_len + 1) {
      if (truncation == Truncation::Drop) {
        ++too_long;
        ++dropped_;
        continue;
      }
      tc.ids.resize(seq_len + 1);
      tc.labels.resize(seq_len + 1);
      tc.labels.back() = kIgnore;  // its target was cut off
    }
    // A row holds the first min(n, seq_len) positions; labels past them are -100 by construction.
    int64_t trained = 0;
    for (int32_t l : tc.labels) trained += l != kIgnore;
    if (trained == 0) {  // an empty answer, or Right truncation cut the answer away: nothing to learn
      ++no_target;
      ++dropped_;
      continue;
    }
    trained_tokens_ += trained;
    convs_.push_back(std::move(tc));
  }
  if (convs_.empty()) {
    std::string why, fix;
    if (too_long > 0) {
      why = std::to_string(too_long) + " longer than data.seq_len + 1 = " + std::to_string(seq_len + 1) +
            " tokens (truncation: drop)";
      fix = "raise data.seq_len or set data.truncation: right";
    }
    if (no_target > 0) {
      why += (why.empty() ? "" : ", ") + std::to_string(no_target) + " without an assistant token to train on" +
             (truncation == Truncation::Right ? " in their first " + std::to_string(seq_len) + " tokens" : "");
      fix += (fix.empty() ? "" : "; ") + std::string("give them non-empty assistant turns") +
             (truncation == Truncation::Right ? " or raise data.seq_len (long prompts leave no room for the answer)" : "");
    }
    if (conversations.empty()) why = "no conversations at all", fix = "check the files";
    throw runtime_error(source, "no conversations left to train on: " + why, fix);
  }

  if (!pack) {
    for (size_t i = 0; i < convs_.size(); ++i) rows_.push_back({static_cast<int32_t>(i)});
  } else {
    // Best fit: each conversation, in shuffled order, goes to the open row with the least room that still holds it.
    std::vector<int64_t> order = iota(convs_.size());
    shuffle(order, splitmix64(seed ^ 0x5F3759DFULL));
    std::multimap<int64_t, size_t> room;  // free positions -> row
    for (int64_t c : order) {
      const int64_t len = std::min<int64_t>(static_cast<int64_t>(convs_[c].ids.size()), seq_len);
      auto it = room.lower_bound(len);
      size_t row;
      int64_t left;
      if (it == room.end()) {
        row = rows_.size();
        rows_.emplace_back();
        left = seq_len;
      } else {
        row = it->second;
        left = it->first;
        room.erase(it);
      }
      rows_[row].push_back(static_cast<int32_t>(c));
      if (left - len > 0) room.emplace(left - len, row);
    }
  }
  if (num_samples() < world_size)
    throw runtime_error("SFT data", std::to_string(num_samples()) + " samples cannot feed " +
                                        std::to_string(world_size) + " ranks", "add data or use fewer ranks");
}

int64_t SftDataset::batches_per_epoch(int64_t micro_batch_size) const {
  if (micro_batch_size < 1) throw usage_error("train.micro_batch_size", "must be >= 1");
  return samples_per_rank() / micro_batch_size;
}

std::vector<int64_t> SftDataset::epoch_order(int64_t epoch) const {
  std::vector<int64_t> all = iota(rows_.size());
  shuffle(all, splitmix64(seed_ ^ splitmix64(static_cast<uint64_t>(epoch))));
  std::vector<int64_t> mine;
  for (int64_t k = 0; k < samples_per_rank(); ++k) mine.push_back(all[rank_ + k * world_size_]);
  return mine;
}

Batch SftDataset::batch(int64_t epoch, int64_t index, int64_t micro_batch_size) const {
  const int64_t n = batches_per_epoch(micro_batch_size);
  if (index < 0 || index >= n)
    throw runtime_error("SftDataset", "batch " + std::to_string(index) + " is outside this epoch's " +
                                          std::to_string(n) + " batches");
  const std::vector<int64_t> order = epoch_order(epoch);
  const int64_t B = micro_batch_size, T = seq_len_;
  auto opts = torch::TensorOptions().dtype(torch::kInt64);
  Batch b;
  b.input_ids = torch::full({B, T}, pad_id_, opts);  // [B, T]
  b.labels = torch::full({B, T}, kIgnore, opts);     // [B, T]
  if (pack_) {
    b.segment_ids = torch::zeros({B, T}, opts);   // [B, T]
    b.position_ids = torch::zeros({B, T}, opts);  // [B, T]
  }
  for (int64_t r = 0; r < B; ++r) {
    int64_t* ids = b.input_ids.data_ptr<int64_t>() + r * T;
    int64_t* labels = b.labels.data_ptr<int64_t>() + r * T;
    int64_t pos = 0, segment = 0;
    for (int32_t c : rows_[order[index * B + r]]) {
      const TokenizedConversation& tc = convs_[c];
      const int64_t len = std::min<int64_t>(static_cast<int64_t>(tc.ids.size()), T);
      ++segment;
      for (int64_t i = 0; i < len; ++i, ++pos) {
        ids[pos] = tc.ids[i];
        labels[pos] = tc.labels[i];
        if (pack_) {
          b.segment_ids.data_ptr<int64_t>()[r * T + pos] = segment;
          b.position_ids.data_ptr<int64_t>()[r * T + pos] = i;
        }
      }
    }
  }
  return b;
}

}  // namespace dsopen::data
