#include "inference/generation_setup.h"

#include <filesystem>

#include <algorithm>
#include <sstream>

#include "inference/chat.h"
#include "model/model_dir.h"
#include "utils/errors.h"

namespace dsopen::inference {

std::vector<int32_t> parse_token_ids(const std::string& text) {
  std::string spaced = text;
  std::replace(spaced.begin(), spaced.end(), ',', ' ');
  std::istringstream in(spaced);
  std::vector<int32_t> ids;
  std::string word;
  while (in >> word) {
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(word, &used);
    } catch (const std::exception&) {
    }
    if (used != word.size() || v < 0 || v > INT32_MAX)
      throw usage_error("--prompt-ids", "'" + word + "' is not a token id", "give ids as 1,5,9");
    ids.push_back(static_cast<int32_t>(v));
  }
  if (ids.empty()) throw usage_error("--prompt-ids", "no token ids in '" + text + "'");
  return ids;
}

void check_ids_fit(const std::vector<int32_t>& ids, int64_t vocab_size) {
  for (int32_t t : ids)
    if (t >= vocab_size)
      throw usage_error("--prompt-ids", "token id " + std::to_string(t) + " >= vocab_size " + std::to_string(vocab_size));
}

void check_tokenizer_fits(const data::Tokenizer& tok, const model::ModelConfig& c, const std::string& where) {
  if (tok.vocab_size() > c.vocab_size)
    throw usage_error(where, "tokenizer vocabulary (" + std::to_string(tok.vocab_size()) +
                                 ") exceeds the model's vocab_size (" + std::to_string(c.vocab_size) + ")",
                      "use the tokenizer the model was trained with");
}

std::vector<int32_t> prompt_ids(const std::string& prompt, const data::Tokenizer& tok, const PromptOptions& o) {
  if (o.chat) {
    data::Conversation conv;
    if (!o.system.empty()) conv.messages.push_back({"system", o.system});
    conv.messages.push_back({"user", prompt});
    if (o.format.is_jinja()) return o.format.prompt_ids(conv, tok);
    data::ChatTemplate tmpl = o.format.sft_template();  // rendered and tokenized piece by piece, as SFT data is
    tmpl.add_bos = o.bos && tok.bos_id() >= 0;
    return data::ChatFormat(tmpl).prompt_ids(conv, tok);
  }
  std::vector<int32_t> ids;
  if (o.bos && tok.bos_id() >= 0) ids.push_back(tok.bos_id());
  for (int32_t t : tok.encode(prompt)) ids.push_back(t);
  return ids;
}

SamplingOptions resolve_sampling(const std::optional<model::GenerationConfig>& gen, const SamplingRequest& r) {
  SamplingOptions so{0.8, 50, 0.95, 1.1, r.seed};
  if (gen) {
    so.temperature = gen->do_sample ? gen->temperature : 0.0;  // transformers: do_sample false is greedy
    so.top_k = gen->top_k;
    so.top_p = gen->top_p;
    so.repetition_penalty = gen->repetition_penalty;
  }
  if (r.temperature) so.temperature = *r.temperature;
  if (r.top_k) so.top_k = *r.top_k;
  if (r.top_p) so.top_p = *r.top_p;
  if (r.repetition_penalty) so.repetition_penalty = *r.repetition_penalty;
  return so;
}

int64_t resolve_max_new_tokens(const std::optional<model::GenerationConfig>& gen, const SamplingRequest& r) {
  if (r.max_new_tokens) return *r.max_new_tokens;
  return gen && gen->max_new_tokens ? *gen->max_new_tokens : 128;
}

int64_t resolve_max_length(const std::optional<model::GenerationConfig>& gen, const SamplingRequest& r) {
  if (r.max_new_tokens || !gen || gen->max_new_tokens || !gen->max_length) return 0;
  return *gen->max_length;
}

std::vector<int32_t> resolve_eos_ids(const std::optional<model::GenerationConfig>& gen, const model::ModelConfig& c) {
  const bool from_gen = gen && gen->eos_token_id;
  const std::vector<int64_t> eos = from_gen ? *gen->eos_token_id : c.eos_token_id;
  for (int64_t id : eos)  // config.json's were checked when it was read
    if (id >= c.vocab_size)
      throw usage_error(from_gen ? gen->source : "config.json", "eos_token_id: " + std::to_string(id) +
                                                                    " is outside the vocabulary (vocab_size " +
                                                                    std::to_string(c.vocab_size) + ")");
  return std::vector<int32_t>(eos.begin(), eos.end());
}

data::ChatFormat chat_format_for(const std::string& model_dir, const std::string& adapter_dir,
                                 const std::string& tokenizer_path, const data::Tokenizer& tok, bool bos) {
  std::error_code ec;
  const bool adapter_run = !adapter_dir.empty() && std::filesystem::exists(std::filesystem::path(adapter_dir) / "dsopen.yaml", ec);
  data::ChatFormat format = data::ChatFormat::for_model(adapter_run ? adapter_dir : model::resolve_latest(model_dir), tokenizer_path);
  if (format.is_jinja()) return format;
  data::ChatTemplate t = format.sft_template();
  t.add_bos = bos && tok.bos_id() >= 0;
  return data::ChatFormat(t);
}

}  // namespace dsopen::inference
