#include "inference/generator.h"

#include <algorithm>
#include <chrono>

#include "inference/text_stream.h"
#include "utils/errors.h"

namespace dsopen::inference {

namespace {

// The visible text of a sequence's new tokens, cut at a stop string; `stopped` tells whether one was found.
// Unless `final`, what may still change is held back: a trailing replacement character (a multi-byte character
// still arriving) and an end that begins a stop string.
std::string visible_text(const TextStream& stream, const std::vector<int32_t>& tokens,
                         const std::vector<std::string>& stops, bool final, bool& stopped) {
  std::string text = stream.text(tokens);
  stopped = false;
  size_t cut = std::string::npos;
  for (const auto& s : stops) {
    const auto at = s.empty() ? std::string::npos : text.find(s);
    if (at != std::string::npos) cut = std::min(cut, at), stopped = true;
  }
  if (stopped) text.resize(cut);
  if (final || stopped) return text;
  const std::string replacement = "\xEF\xBF\xBD";
  while (text.size() >= 3 && text.compare(text.size() - 3, 3, replacement) == 0) text.resize(text.size() - 3);
  // Hold back an end of the text that may be the start of a stop string: once shown it could not be taken back.
  size_t hold = 0;
  for (const auto& s : stops)
    for (size_t n = std::min(s.size() - (s.empty() ? 0 : 1), text.size()); n > hold; --n)
      if (text.compare(text.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
  text.resize(text.size() - hold);
  return text;
}

}  // namespace

std::vector<GenerateResult> generate_batch(model::CausalLM& model, const data::Tokenizer& tok,
                                           const std::vector<std::vector<int32_t>>& prompts, Sampler& sampler,
                                           const GenerateOptions& o,
                                           const std::function<void(size_t, const std::string&)>& on_text) {
  const int64_t ctx = model->config().max_position_embeddings;
  const int64_t B = static_cast<int64_t>(prompts.size());
  if (B == 0) throw usage_error("--prompt", "no prompts");
  int64_t longest = 0;
  for (const auto& p : prompts) {
    if (p.empty()) throw usage_error("--prompt", "a prompt is empty");
    if (static_cast<int64_t>(p.size()) >= ctx)
      throw usage_error("--prompt", "a prompt has " + std::to_string(p.size()) + " tokens; the model's context is " +
                                        std::to_string(ctx),
                        "shorten the prompt");
    longest = std::max<int64_t>(longest, static_cast<int64_t>(p.size()));
  }
  const int64_t budget = std::min<int64_t>(o.max_new_tokens, ctx - longest);
  torch::NoGradGuard no_grad;
  const auto device = model->model->embed_tokens->weight.device();
  auto t0 = std::chrono::steady_clock::now();
  // The cache keeps the model's dtype: a bf16 model would otherwise convert every cached key at every step.
  model::KVCache cache = model->make_cache(B, longest + budget, model->model->norm->weight.scalar_type());

  // Left-pad to the longest prompt: padding keys are masked out and every sequence counts its own positions.
  const int32_t pad = tok.pad_id() >= 0 ? tok.pad_id() : 0;
  // Filled as vectors: element-wise tensor indexing costs several dispatches per token.
  std::vector<int64_t> ids_v(B * longest, pad), segments_v(B * longest, 0), positions_v(B * longest, 0);
  std::vector<int64_t> next_position(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = static_cast<int64_t>(prompts[b].size()), offset = longest - n;
    for (int64_t t = 0; t < n; ++t) {
      ids_v[b * longest + offset + t] = prompts[b][t];
      segments_v[b * longest + offset + t] = 1;
      positions_v[b * longest + offset + t] = t;
    }
    next_position[b] = n;
  }
  auto ids = torch::tensor(ids_v, torch::kLong).view({B, longest});
  auto segments = torch::tensor(segments_v, torch::kLong).view({B, longest});
  auto positions = torch::tensor(positions_v, torch::kLong).view({B, longest});
  // Prompts of one length need no masks (the fast path of SDPA); only padding does.
  bool padded = false;
  for (const auto& p : prompts) padded = padded || static_cast<int64_t>(p.size()) != longest;
  std::vector<GenerateResult> results(B);
  std::vector<std::vector<int32_t>> context = prompts;
  std::vector<bool> done(B, false);
  std::vector<std::string> emitted(B);
  std::vector<TextStream> streams;
  if (o.decode_text)
    for (const auto& p : prompts) streams.emplace_back(tok, p);
  std::vector<int32_t> eos_ids = o.eos_ids;
  if (eos_ids.empty() && tok.eos_id() >= 0) eos_ids.push_back(tok.eos_id());

  // Only the last position's logits: the head over the whole prompt would be wasted work.
  auto logits = padded ? model->forward({ids.to(device), {}, &cache, positions.to(device), segments.to(device), 1}).logits
                       : model->forward({ids.to(device), {}, &cache, {}, {}, 1}).logits;
  logits = logits.select(1, 0);  // [B, V]
  const double prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  t0 = std::chrono::steady_clock::now();
  int64_t forwards = 0;
  for (int64_t step = 0; step < budget; ++step) {
    std::vector<int64_t> next(B, pad);
    for (int64_t b = 0; b < B; ++b) {
      if (done[b]) continue;
      const int32_t token = static_cast<int32_t>(sampler.sample(logits[b], context[b]));
      if (o.stop_at_eos && std::find(eos_ids.begin(), eos_ids.end(), token) != eos_ids.end()) {
        done[b] = true;
        continue;
      }
      results[b].tokens.push_back(token);
      context[b].push_back(token);
      next[b] = token;
      if (!o.decode_text) continue;
      bool stopped = false;
      const bool last = step + 1 == budget;
      const std::string text = visible_text(streams[b], results[b].tokens, o.stop, last, stopped);
      if (text.size() > emitted[b].size() && text.compare(0, emitted[b].size(), emitted[b]) == 0) {
        if (on_text) on_text(static_cast<size_t>(b), text.substr(emitted[b].size()));
        emitted[b] = text;
      }
      if (stopped) done[b] = true;
    }
    if (step + 1 == budget || std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
    ++forwards;
    auto next_ids = torch::tensor(next, torch::kLong).view({B, 1}).to(device);
    if (padded) {
      std::vector<int64_t> pos(B);
      for (int64_t b = 0; b < B; ++b) pos[b] = next_position[b]++;
      logits = model->forward({next_ids, {}, &cache, torch::tensor(pos, torch::kLong).view({B, 1}).to(device),
                               torch::ones({B, 1}, torch::kLong).to(device)})
                   .logits.select(1, 0);
    } else {
      logits = model->forward({next_ids, {}, &cache}).logits.select(1, 0);
    }
  }
  const double decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Flush what was held back (a trailing U+FFFD that no later token completed: a sequence ended at EOS or the limit).
  for (int64_t b = 0; b < B && o.decode_text; ++b) {
    bool stopped = false;
    const std::string text = visible_text(streams[b], results[b].tokens, o.stop, /*final=*/true, stopped);
    if (text.size() > emitted[b].size() && text.compare(0, emitted[b].size(), emitted[b]) == 0) {
      if (on_text) on_text(static_cast<size_t>(b), text.substr(emitted[b].size()));
      emitted[b] = text;
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    results[b].text = emitted[b];
    results[b].prompt_tokens = static_cast<int64_t>(prompts[b].size());
    results[b].prefill_s = prefill_s;
    results[b].decode_s = decode_s;
    results[b].decode_forwards = forwards;
  }
  return results;
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
