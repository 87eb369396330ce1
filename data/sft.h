// Supervised fine-tuning data: chat JSONL reading, the chat template, tokenization with a loss mask (only the
// assistant's tokens are targets), truncation, optional packing, and deterministic rank-sharded batches.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/batch.h"
#include "data/tokenizer.h"
#include "utils/config.h"

namespace dsopen::data {

// How a conversation is rendered: [bos] then, per message, prefix + content + suffix, then [eos]. Or, with
// `jinja` set, a HuggingFace Jinja chat template (data/chat_format.h) — a chat_template.jinja file, a
// tokenizer_config.json, or a model directory holding either — which then replaces every other field.
struct ChatTemplate {
  std::string system_prefix = "<|System|>", system_suffix = "\n";
  std::string user_prefix = "<|User|>", user_suffix = "\n";
  std::string assistant_prefix = "<|Assistant|>", assistant_suffix = "<|end|>\n";
  bool add_bos = true;
  bool add_eos = true;
  std::string jinja;
};
void decode(config::Reader& r, ChatTemplate& out);

struct Message {
  std::string role;  // system | user | assistant
  std::string content;
};
struct Conversation {
  std::vector<Message> messages;
};

// Reads chat JSONL: one `{"messages":[{"role":..,"content":..}, ...]}` or `{"prompt":..,"response":..}` per line.
// Blank lines are skipped and counted in *skipped (may be null). Any bad line is a runtime error naming path:line;
// a missing or empty file is one naming the file.
std::vector<Conversation> read_sft_jsonl(const std::string& path, int64_t* skipped = nullptr);

struct TokenizedConversation {
  std::vector<int32_t> ids;     // [n]
  std::vector<int32_t> labels;  // [n] labels[i] = ids[i+1] when token i+1 is assistant output, else -100; last -100
};
// Each text piece is encoded on its own and the pieces concatenated. Targets: assistant content and
// assistant_suffix, and the final eos when the conversation ends with an assistant message.
TokenizedConversation tokenize_conversation(const Conversation& conv, const Tokenizer& tok, const ChatTemplate& tmpl);

// A conversation longer than seq_len + 1 tokens (a row holds seq_len inputs plus the last target):
// Right keeps its first seq_len + 1 tokens, Drop skips it.
enum class Truncation { Right, Drop };

// Samples are rows of seq_len tokens: one conversation padded on the right (pack = false), or whole conversations
// packed greedily, in an order shuffled from `seed`, with segment_ids / position_ids restarting per conversation.
// Each epoch shuffles the samples from (seed, epoch); rank r takes samples r, r + world_size, ... of that order,
// the same count on every rank (the remainder of an uneven split is left out).
class SftDataset {
public:
  // `source` names the data in errors (the config key and its files).
  SftDataset(const std::vector<Conversation>& conversations, const Tokenizer& tok, ChatTemplate tmpl, int64_t seq_len,
             Truncation truncation, bool pack, uint64_t seed, int rank, int world_size,
             const std::string& source = "SFT data");

  int64_t num_samples() const { return static_cast<int64_t>(rows_.size()); }  // per epoch, all ranks together
  int64_t samples_per_rank() const { return num_samples() / world_size_; }
  int64_t batches_per_epoch(int64_t micro_batch_size) const;  // full micro batches of this rank
  // The index-th micro batch of this rank in `epoch`: input_ids / labels [B, T] (plus segment_ids and
  // position_ids [B, T] when packing), int64 on the CPU.
  Batch batch(int64_t epoch, int64_t index, int64_t micro_batch_size) const;
  // Conversations left out: too long under Truncation::Drop, or without any target token (an empty answer, or
  // Right truncation that cut every answer token away).
  int64_t dropped() const { return dropped_; }
  // Tokens that are targets (labels != -100), all samples together.
  int64_t trained_tokens() const { return trained_tokens_; }

private:
  std::vector<int64_t> epoch_order(int64_t epoch) const;  // this rank's sample indices in `epoch`

  std::vector<TokenizedConversation> convs_;  // kept conversations, at most seq_len + 1 tokens each
  std::vector<std::vector<int32_t>> rows_;    // sample -> indices into convs_ (one unless packing)
  int64_t seq_len_;
  bool pack_;
  int32_t pad_id_;
  uint64_t seed_;
  int rank_, world_size_;
  int64_t dropped_ = 0, trained_tokens_ = 0;
};

}  // namespace dsopen::data
