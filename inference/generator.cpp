#include "inference/generator.h"

#include <chrono>

#include "utils/errors.h"

namespace dsopen::inference {

GenerateResult generate(model::CausalLM& model, const data::Tokenizer& tok, const std::vector<int32_t>& prompt,
                        Sampler& sampler, const GenerateOptions& o,
                        const std::function<void(const std::string&)>& on_text) {
  const int64_t ctx = model->config().max_position_embeddings;
  if (prompt.empty()) throw usage_error("--prompt", "the prompt is empty");
  if (static_cast<int64_t>(prompt.size()) >= ctx)
    throw usage_error("--prompt", "the prompt has " + std::to_string(prompt.size()) +
                                      " tokens; the model's context is " + std::to_string(ctx),
                      "shorten the prompt");
  const int64_t budget = std::min<int64_t>(o.max_new_tokens, ctx - static_cast<int64_t>(prompt.size()));
  torch::NoGradGuard no_grad;
  const auto device = model->model->embed_tokens->weight.device();
  model::KVCache cache = model->make_cache(1, static_cast<int64_t>(prompt.size()) + budget);

  GenerateResult r;
  r.prompt_tokens = static_cast<int64_t>(prompt.size());
  std::vector<int32_t> context = prompt;
  auto t0 = std::chrono::steady_clock::now();
  auto ids = torch::tensor(std::vector<int64_t>(prompt.begin(), prompt.end()), torch::kLong).unsqueeze(0).to(device);
  auto logits = model->forward(ids, {}, &cache).logits[0][-1];  // prefill: [V] of the last prompt position
  r.prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  t0 = std::chrono::steady_clock::now();
  std::string emitted;
  for (int64_t i = 0; i < budget; ++i) {
    const int32_t next = static_cast<int32_t>(sampler.sample(logits, context));
    if (o.stop_at_eos && next == tok.eos_id()) break;
    r.tokens.push_back(next);
    context.push_back(next);
    // Decode everything generated so far: byte-fallback pieces only form text together.
    std::string text = tok.decode(r.tokens);
    bool stopped = false;
    for (const auto& s : o.stop) {
      const auto at = text.find(s);
      if (!s.empty() && at != std::string::npos) text = text.substr(0, at), stopped = true;
    }
    // Hold back a trailing replacement character: it is a multi-byte character whose bytes are still arriving.
    const std::string replacement = "\xEF\xBF\xBD";
    const bool final_token = stopped || i + 1 == budget;
    while (!final_token && text.size() >= 3 && text.compare(text.size() - 3, 3, replacement) == 0) text.resize(text.size() - 3);
    if (text.size() > emitted.size() && text.compare(0, emitted.size(), emitted) == 0) {
      if (on_text) on_text(text.substr(emitted.size()));
      emitted = text;
    }
    if (stopped || i + 1 == budget) break;
    auto step = torch::tensor({static_cast<int64_t>(next)}, torch::kLong).unsqueeze(0).to(device);
    logits = model->forward(step, {}, &cache).logits[0][-1];
  }
  r.decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.text = emitted;
  return r;
}

}  // namespace dsopen::inference
