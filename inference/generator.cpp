#include "inference/generator.h"

#include <optional>

#include "utils/cpu.h"

#include <algorithm>
#include <chrono>

#include "inference/text_stream.h"
#include "utils/errors.h"

namespace dsopen::inference {

namespace {

// The longest prompt; usage errors for no prompt, an empty one, or one that leaves no room in the context.
int64_t check_prompts(const std::vector<std::vector<int32_t>>& prompts, int64_t context) {
  if (prompts.empty()) throw usage_error("--prompt", "no prompts");
  int64_t longest = 0;
  for (const auto& p : prompts) {
    if (p.empty()) throw usage_error("--prompt", "a prompt is empty");
    if (static_cast<int64_t>(p.size()) >= context)
      throw usage_error("--prompt", "a prompt has " + std::to_string(p.size()) + " tokens; the model's context is " +
                                        std::to_string(context),
                        "shorten the prompt");
    longest = std::max<int64_t>(longest, static_cast<int64_t>(p.size()));
  }
  return longest;
}

// Prompts left-padded to the longest: padding keys are masked out and every sequence counts its own positions.
struct PaddedBatch {
  torch::Tensor ids, segments, positions;  // [B, longest]
  std::vector<int64_t> next_position;      // per sequence
  bool padded = false;                     // prompts of one length need no masks (the fast path of SDPA)
};

PaddedBatch left_pad(const std::vector<std::vector<int32_t>>& prompts, int64_t longest, int32_t pad) {
  const int64_t B = static_cast<int64_t>(prompts.size());
  // Filled as vectors: element-wise tensor indexing costs several dispatches per token.
  std::vector<int64_t> ids(B * longest, pad), segments(B * longest, 0), positions(B * longest, 0);
  PaddedBatch out;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = static_cast<int64_t>(prompts[b].size()), offset = longest - n;
    for (int64_t t = 0; t < n; ++t) {
      ids[b * longest + offset + t] = prompts[b][t];
      segments[b * longest + offset + t] = 1;
      positions[b * longest + offset + t] = t;
    }
    out.next_position.push_back(n);
    out.padded = out.padded || n != longest;
  }
  out.ids = torch::tensor(ids, torch::kLong).view({B, longest});
  out.segments = torch::tensor(segments, torch::kLong).view({B, longest});
  out.positions = torch::tensor(positions, torch::kLong).view({B, longest});
  return out;
}

// What each sequence has produced: its tokens, whether it ended, and the text already handed to `on_text`.
class Sequences {
public:
  Sequences(const data::Tokenizer& tok, const std::vector<std::vector<int32_t>>& prompts, const GenerateOptions& o,
            const std::function<void(size_t, const std::string&)>& on_text)
      : o_(o), on_text_(on_text), context_(prompts), results_(prompts.size()), done_(prompts.size(), false),
        emitted_(prompts.size()), eos_ids_(o.eos_ids), vocab_(o.decode_text ? tok.vocab_size() : 0) {
    for (size_t b = 0; b < prompts.size(); ++b)
      if (o.max_length > 0 && static_cast<int64_t>(prompts[b].size()) >= o.max_length) done_[b] = true;
    if (o.decode_text)
      for (const auto& p : prompts) streams_.emplace_back(tok, p);
    if (eos_ids_.empty() && tok.eos_id() >= 0) eos_ids_.push_back(tok.eos_id());
  }

  // Samples sequence b's next token from its logits [V]; returns it, or -1 when the sequence has ended.
  int64_t advance(size_t b, const torch::Tensor& logits, Sampler& sampler) {
    if (done_[b]) return -1;
    // Rows of a vocabulary padded beyond the tokenizer's (common in checkpoints) decode to nothing: never sample them.
    const int64_t usable = vocab_ > 0 ? std::min<int64_t>(vocab_, logits.size(0)) : logits.size(0);
    const int32_t token = static_cast<int32_t>(sampler.sample(logits.narrow(0, 0, usable), context_[b]));
    if (o_.stop_at_eos && std::find(eos_ids_.begin(), eos_ids_.end(), token) != eos_ids_.end()) {
      done_[b] = true;
      return -1;
    }
    results_[b].tokens.push_back(token);
    context_[b].push_back(token);
    if (o_.decode_text && emit(b, /*final=*/false)) done_[b] = true;
    if (o_.max_length > 0 && static_cast<int64_t>(context_[b].size()) >= o_.max_length) done_[b] = true;
    return token;
  }

  // Hands the newly visible text to on_text; true when a stop string ended the sequence.
  bool emit(size_t b, bool final) {
    bool stopped = false;
    const size_t shown = streams_[b].visible(results_[b].tokens, o_.stop, final, stopped);
    if (shown > emitted_[b]) {
      if (on_text_) on_text_(b, streams_[b].current().substr(emitted_[b], shown - emitted_[b]));
      emitted_[b] = shown;
    }
    return stopped;
  }

  bool all_done() const { return std::all_of(done_.begin(), done_.end(), [](bool d) { return d; }); }

  // Flushes what was held back (a trailing U+FFFD no later token completed) and returns the results.
  std::vector<GenerateResult> finish(double prefill_s, double decode_s, int64_t forwards) {
    for (size_t b = 0; b < results_.size(); ++b) {
      if (o_.decode_text) {
        emit(b, /*final=*/true);
        results_[b].text = streams_[b].current().substr(0, emitted_[b]);
      }
      results_[b].prompt_tokens = static_cast<int64_t>(context_[b].size() - results_[b].tokens.size());
      results_[b].prefill_s = prefill_s;
      results_[b].decode_s = decode_s;
      results_[b].decode_forwards = forwards;
    }
    return results_;
  }

private:
  const GenerateOptions& o_;
  const std::function<void(size_t, const std::string&)>& on_text_;
  std::vector<std::vector<int32_t>> context_;  // prompt + generated, for the repetition penalty
  std::vector<GenerateResult> results_;
  std::vector<bool> done_;
  std::vector<size_t> emitted_;  // bytes of streams_[b].current() handed out
  std::vector<TextStream> streams_;
  std::vector<int32_t> eos_ids_;
  int64_t vocab_;  // ids the tokenizer decodes (0: no limit, token-id mode)
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

std::vector<GenerateResult> generate_batch(model::CausalLM& model, const data::Tokenizer& tok,
                                           const std::vector<std::vector<int32_t>>& prompts, Sampler& sampler,
                                           const GenerateOptions& o,
                                           const std::function<void(size_t, const std::string&)>& on_text) {
  const int64_t ctx = model->config().context_length();
  if (o.max_new_tokens < 1) throw usage_error("max_new_tokens", "must be >= 1, got " + std::to_string(o.max_new_tokens));
  const int64_t longest = check_prompts(prompts, ctx), B = static_cast<int64_t>(prompts.size());
  const int64_t budget = std::min<int64_t>(o.max_new_tokens, ctx - longest);
  torch::NoGradGuard no_grad;
  const auto device = model->model->embed_tokens->weight.device();
  auto t0 = std::chrono::steady_clock::now();
  // The cache keeps the model's dtype: a bf16 model would otherwise convert every cached key at every step.
  model::KVCache cache = model->make_cache(B, longest + budget, model->model->norm->weight.scalar_type());
  const int32_t pad = tok.pad_id() >= 0 ? tok.pad_id() : 0;
  PaddedBatch batch = left_pad(prompts, longest, pad);
  Sequences seqs(tok, prompts, o, on_text);
  // Only the last position's logits: the head over the whole prompt would be wasted work.
  auto logits = (batch.padded ? model->forward({batch.ids.to(device), {}, &cache, batch.positions.to(device),
                                                batch.segments.to(device), 1})
                              : model->forward({batch.ids.to(device), {}, &cache, {}, {}, 1}))
                    .logits.select(1, 0);  // [B, V]
  const double prefill_s = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  int64_t forwards = 0;
  std::optional<cpu::ThreadBackoff> backoff;  // fewer threads when other processes keep the CPUs busy
  if (device.is_cpu() && o.adapt_threads) backoff.emplace("decoding");
  for (int64_t step = 0; step < budget; ++step) {
    if (backoff) backoff->step();
    std::vector<int64_t> next(B, pad);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t token = seqs.advance(static_cast<size_t>(b), logits[b], sampler);
      if (token >= 0) next[b] = token;
    }
    if (step + 1 == budget || seqs.all_done()) break;
    ++forwards;
    auto next_ids = torch::tensor(next, torch::kLong).view({B, 1}).to(device);
    if (batch.padded) {
      std::vector<int64_t> pos(B);
      for (int64_t b = 0; b < B; ++b) pos[b] = batch.next_position[b]++;
      logits = model->forward({next_ids, {}, &cache, torch::tensor(pos, torch::kLong).view({B, 1}).to(device),
                               torch::ones({B, 1}, torch::kLong).to(device)})
                   .logits.select(1, 0);
    } else {
      logits = model->forward({next_ids, {}, &cache}).logits.select(1, 0);
    }
  }
  return seqs.finish(prefill_s, seconds_since(t0), forwards);
}

GenerateResult generate(model::CausalLM& model, const data::Tokenizer& tok, const std::vector<int32_t>& prompt,
                        Sampler& sampler, const GenerateOptions& options,
                        const std::function<void(const std::string&)>& on_text) {
  auto callback = [&](size_t, const std::string& piece) {
    if (on_text) on_text(piece);
  };
  return generate_batch(model, tok, {prompt}, sampler, options, callback).front();
}

}  // namespace dsopen::inference
