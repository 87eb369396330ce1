#include "serve/openai_api.h"

#include <chrono>
#include <cmath>
#include <random>

#include "data/text.h"
#include "utils/errors.h"
#include "utils/config.h"
#include "utils/json.h"

namespace dsopen::serve {

using nlohmann::json;
using nlohmann::ordered_json;

namespace {
const char* type_of_status(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}
}  // namespace

namespace {
std::string capped(const std::string& s, size_t limit = 1000) {
  if (s.size() <= limit) return s;
  size_t cut = limit;
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;  // a character boundary
  return s.substr(0, cut) + "... (" + std::to_string(s.size() - cut) + " more bytes)";
}
}  // namespace

ApiError::ApiError(int s, const std::string& m, std::string p, std::string c)
    : std::runtime_error(capped(m)), status(s), message(capped(m)), type(type_of_status(s)), param(capped(p, 200)),
      code(std::move(c)) {}

ordered_json error_body(const ApiError& e) {
  ordered_json err;
  err["message"] = e.message;
  err["type"] = e.type;
  err["param"] = e.param.empty() ? ordered_json() : ordered_json(e.param);
  err["code"] = e.code.empty() ? ordered_json() : ordered_json(e.code);
  return {{"error", err}};
}

namespace {

// Fields of a request object, read by name with their OpenAI types and ranges; every wrong one is a 400 naming it.
class Fields {
public:
  Fields(const json& j, std::vector<std::string> known) : j_(j) {
    for (const auto& [key, value] : j.items())
      if (std::find(known.begin(), known.end(), key) == known.end()) {
        const std::string near = config::closest_match(key, known);
        throw ApiError(400, "unrecognized request argument '" + key + "'" +
                                (near.empty() ? "" : " (did you mean '" + near + "'?)"),
                       key, "unknown_parameter");
      }
  }
  // Present and not null.
  bool has(const std::string& k) const { return j_.contains(k) && !j_.at(k).is_null(); }
  const json& at(const std::string& k) const { return j_.at(k); }

  std::optional<double> number(const std::string& k, double lo, double hi) const {
    if (!has(k)) return std::nullopt;
    if (!at(k).is_number()) throw wrong(k, "a number");
    const double v = at(k).get<double>();
    if (!(v >= lo && v <= hi)) throw range(k, std::to_string(lo), std::to_string(hi), at(k).dump());
    return v;
  }
  std::optional<int64_t> integer(const std::string& k, int64_t lo, int64_t hi) const {
    if (!has(k)) return std::nullopt;
    const json& v = at(k);
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw range(k, std::to_string(lo), std::to_string(hi), v.dump());
    if (v.is_number_integer()) {
      const int64_t i = v.get<int64_t>();
      if (i < lo || i > hi) throw range(k, std::to_string(lo), std::to_string(hi), v.dump());
      return i;
    }
    if (!v.is_number_float() || std::floor(v.get<double>()) != v.get<double>()) throw wrong(k, "an integer");
    const double d = v.get<double>();  // 2.0 is 2; beyond int64 (or the range) is out of range, not "not an integer"
    if (!(d >= static_cast<double>(lo) && d <= static_cast<double>(hi)) || std::fabs(d) >= 9.2e18)
      throw range(k, std::to_string(lo), std::to_string(hi), v.dump());
    return static_cast<int64_t>(d);
  }
  std::optional<bool> boolean(const std::string& k) const {
    if (!has(k)) return std::nullopt;
    if (!at(k).is_boolean()) throw wrong(k, "a boolean");
    return at(k).get<bool>();
  }
  std::optional<std::string> string(const std::string& k) const {
    if (!has(k)) return std::nullopt;
    if (!at(k).is_string()) throw wrong(k, "a string");
    return at(k).get<std::string>();
  }

  static ApiError wrong(const std::string& k, const std::string& expected) {
    return ApiError(400, "'" + k + "' must be " + expected, k, "invalid_type");
  }
  static ApiError range(const std::string& k, const std::string& lo, const std::string& hi, const std::string& got) {
    auto trim = [](std::string s) {  // "2.000000" -> "2"
      if (s.find('.') != std::string::npos) {
        while (!s.empty() && s.back() == '0') s.pop_back();
        if (!s.empty() && s.back() == '.') s.pop_back();
      }
      return s;
    };
    return ApiError(400, "'" + k + "' must be in [" + trim(lo) + ", " + trim(hi) + "], got " + got, k, "invalid_value");
  }

private:
  const json& j_;
};

// Token ids of a completions prompt given as ids; each must be in the vocabulary.
std::vector<int32_t> prompt_ids_of(const json& a, const ServedModel& m) {
  std::vector<int32_t> ids;
  for (const auto& v : a) {
    if (!v.is_number_integer()) throw Fields::wrong("prompt", "a string, an array of strings or of token ids");
    const bool fits = v.is_number_unsigned() ? v.get<uint64_t>() < static_cast<uint64_t>(m.tok->vocab_size())
                                             : v.get<int64_t>() >= 0 && v.get<int64_t>() < m.tok->vocab_size();
    if (!fits)
      throw ApiError(400, "prompt token id " + v.dump() + " is outside the vocabulary [0, " +
                              std::to_string(m.tok->vocab_size()) + ")", "prompt", "invalid_value");
    const int64_t id = v.get<int64_t>();
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

std::vector<int32_t> encode_text(const std::string& text, const ServedModel& m) {
  std::vector<int32_t> ids;
  if (m.tok->bos_id() >= 0) ids.push_back(m.tok->bos_id());
  for (int32_t id : m.tok->encode(text)) ids.push_back(id);
  return ids;
}

// Completions' `prompt`: a string, an array of strings, an array of token ids, or an array of such arrays.
void read_prompts(const Fields& f, const ServedModel& m, ApiRequest& r) {
  if (!f.has("prompt")) throw ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter");
  const json& p = f.at("prompt");
  if (p.is_string()) {
    r.prompt_texts.push_back(p.get<std::string>());
    r.prompts.push_back(encode_text(r.prompt_texts.back(), m));
  } else if (p.is_array() && !p.empty() && p.front().is_number()) {
    r.prompts.push_back(prompt_ids_of(p, m));
    r.prompt_texts.push_back(m.tok->decode(r.prompts.back()));
  } else if (p.is_array() && !p.empty()) {
    for (const auto& e : p) {
      if (e.is_string()) {
        r.prompt_texts.push_back(e.get<std::string>());
        r.prompts.push_back(encode_text(r.prompt_texts.back(), m));
      } else if (e.is_array()) {
        r.prompts.push_back(prompt_ids_of(e, m));
        r.prompt_texts.push_back(m.tok->decode(r.prompts.back()));
      } else {
        throw Fields::wrong("prompt", "a string, an array of strings or of token ids");
      }
    }
  } else {
    throw Fields::wrong("prompt", "a non-empty string, an array of strings or of token ids");
  }
}

// Chat `messages` (data/chat_format.h): the field at fault in a 400.
data::Conversation read_messages(const Fields& f) {
  if (!f.has("messages")) throw ApiError(400, "'messages' is required", "messages", "missing_required_parameter");
  try {
    return data::conversation_from_messages(f.at("messages"));
  } catch (const data::MessageError& e) {
    throw ApiError(400, e.what(), e.field, "invalid_value");
  }
}

std::vector<std::string> read_stop(const Fields& f) {
  if (!f.has("stop")) return {};
  const json& s = f.at("stop");
  std::vector<std::string> out;
  if (s.is_string()) {
    out.push_back(s.get<std::string>());
  } else if (s.is_array() && s.size() <= 4) {
    for (const auto& e : s) {
      if (!e.is_string()) throw Fields::wrong("stop", "a string or an array of up to 4 strings");
      out.push_back(e.get<std::string>());
    }
  } else {
    throw Fields::wrong("stop", "a string or an array of up to 4 strings");
  }
  for (const auto& e : out)
    if (e.empty()) throw ApiError(400, "'stop' strings must not be empty", "stop", "invalid_value");
  return out;
}

}  // namespace

namespace {
ApiRequest parse_object(Endpoint endpoint, const json& j, const ServedModel& m);
}  // namespace

ApiRequest parse_request(Endpoint endpoint, const std::string& body, const ServedModel& m) {
  if (!data::is_valid_utf8(body))
    throw ApiError(400, "the body is not valid UTF-8 (JSON text must be)", "", "invalid_json");
  json j;
  // Requests nest a few levels: deeper input is refused while it is read, before it is built (deep values cost
  // recursion to copy, compare or print).
  constexpr int kMaxDepth = 32;
  bool too_deep = false;
  try {
    j = json::parse(body, [&](int depth, json::parse_event_t, json&) {
      if (depth > kMaxDepth) too_deep = true;
      return !too_deep;
    });
  } catch (const std::exception& e) {
    throw ApiError(400, "the body is not valid JSON: " + dsopen::json::reason(e), "", "invalid_json");
  }
  if (too_deep) throw ApiError(400, "the body nests deeper than " + std::to_string(kMaxDepth) + " levels", "", "invalid_json");
  if (!j.is_object()) throw ApiError(400, "the body must be a JSON object", "", "invalid_json");
  try {
    return parse_object(endpoint, j, m);
  } catch (const json::exception& e) {  // a value of a shape no check above foresaw: still the client's mistake
    throw ApiError(400, "invalid request: " + dsopen::json::reason(e), "", "invalid_value");
  }
}

namespace {
ApiRequest parse_object(Endpoint endpoint, const json& j, const ServedModel& m) {
  const bool chat = endpoint == Endpoint::ChatCompletions;
  std::vector<std::string> known{"model",  "max_tokens", "temperature", "top_p",  "n",
                                 "stop",   "seed",       "stream",      "stream_options", "frequency_penalty",
                                 "presence_penalty", "logprobs", "user", "logit_bias",
                                 // OpenAI's fields that do not change the text (accepted, ignored)
                                 "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier",
                                 // vLLM's extensions, which front ends for local models send
                                 "top_k", "repetition_penalty", "ignore_eos", "min_p", "min_tokens",
                                 "skip_special_tokens", "include_stop_str_in_output"};
  for (const char* k : chat ? std::vector<const char*>{"messages", "top_logprobs", "max_completion_tokens",
                                                       "response_format", "tools", "tool_choice",
                                                       "parallel_tool_calls", "functions", "function_call", "audio",
                                                       "prediction", "modalities", "web_search_options",
                                                       "reasoning_effort", "chat_template_kwargs",
                                                       "add_generation_prompt"}
                            : std::vector<const char*>{"prompt", "echo", "suffix", "best_of"})
    known.push_back(k);
  const Fields f(j, known);
  // Fields whose features we lack: fine when null (or at their neutral value), refused otherwise.
  for (const char* k : {"functions", "function_call", "audio", "prediction", "web_search_options", "reasoning_effort"})
    if (f.has(k)) throw ApiError(400, std::string("'") + k + "' is not supported", k, "unsupported_parameter");
  if (f.has("modalities") && f.at("modalities") != json::array({"text"}))
    throw ApiError(400, "'modalities' supports only [\"text\"]", "modalities", "unsupported_parameter");
  if (f.has("skip_special_tokens") && !f.boolean("skip_special_tokens").value())
    throw ApiError(400, "'skip_special_tokens': false is not supported", "skip_special_tokens", "unsupported_parameter");
  if (f.has("include_stop_str_in_output") && f.boolean("include_stop_str_in_output").value())
    throw ApiError(400, "'include_stop_str_in_output': true is not supported", "include_stop_str_in_output",
                   "unsupported_parameter");
  if (f.has("add_generation_prompt") && !f.boolean("add_generation_prompt").value())
    throw ApiError(400, "'add_generation_prompt': false is not supported (the reply starts a new assistant turn)",
                   "add_generation_prompt", "unsupported_parameter");
  f.boolean("store");
  f.string("service_tier");
  f.string("prompt_cache_key");
  f.string("safety_identifier");
  if (f.has("metadata") && !f.at("metadata").is_object()) throw Fields::wrong("metadata", "an object");
  if (f.has("chat_template_kwargs") && !f.at("chat_template_kwargs").is_object())
    throw Fields::wrong("chat_template_kwargs", "an object");

  ApiRequest r;
  r.endpoint = endpoint;
  const auto model_name = f.string("model");
  if (!model_name) throw ApiError(400, "'model' is required", "model", "missing_required_parameter");
  r.model = *model_name;
  const data::ChatFormat* chat_format = &m.chat_format;
  if (*model_name != m.name) {
    std::string names = "'" + m.name + "'";
    for (size_t k = 0; k < m.adapters.size(); ++k) {
      names += ", '" + m.adapters[k].name + "'";
      if (m.adapters[k].name == *model_name) r.params.adapter = static_cast<int64_t>(k) + 1, chat_format = &m.adapters[k].chat_format;
    }
    if (r.params.adapter == 0)
      throw ApiError(404, "the model '" + *model_name + "' does not exist; this server serves " + names, "model",
                     "model_not_found");
  }

  // Fields we do not implement are refused rather than silently ignored.
  if (f.has("logit_bias") && !(f.at("logit_bias").is_object() && f.at("logit_bias").empty()))
    throw ApiError(400, "'logit_bias' is not supported", "logit_bias", "unsupported_parameter");
  if (chat) {
    if (f.has("tools") && !(f.at("tools").is_array() && f.at("tools").empty()))
      throw ApiError(400, "'tools' (function calling) is not supported", "tools", "unsupported_parameter");
    if (f.has("tool_choice") && f.at("tool_choice") != "none")
      throw ApiError(400, "'tool_choice' is not supported", "tool_choice", "unsupported_parameter");
    if (f.has("response_format") && !(f.at("response_format").is_object() && f.at("response_format").contains("type") &&
                                      f.at("response_format").at("type") == "text"))
      throw ApiError(400, "'response_format' supports only {\"type\": \"text\"}", "response_format",
                     "unsupported_parameter");
  } else {
    if (f.has("suffix")) throw ApiError(400, "'suffix' is not supported", "suffix", "unsupported_parameter");
  }
  f.string("user");
  f.boolean("parallel_tool_calls");

  r.stream = f.boolean("stream").value_or(false);
  if (f.has("stream_options")) {
    const json& so = f.at("stream_options");
    if (!so.is_object()) throw Fields::wrong("stream_options", "an object");
    if (!r.stream) throw ApiError(400, "'stream_options' needs 'stream': true", "stream_options", "invalid_value");
    if (so.contains("include_usage")) {
      if (!so["include_usage"].is_boolean()) throw Fields::wrong("stream_options.include_usage", "a boolean");
      r.include_usage = so["include_usage"].get<bool>();
    }
  }
  r.n = f.integer("n", 1, 16).value_or(1);
  if (r.n > m.max_sequences)
    throw ApiError(400, "n = " + std::to_string(r.n) + " is more sequences than this server takes per request (" +
                            std::to_string(m.max_sequences) + ")", "n", "invalid_value");
  if (!chat) {
    if (const auto best_of = f.integer("best_of", 1, 16); best_of && *best_of != r.n)
      throw ApiError(400, "'best_of' other than n is not supported", "best_of", "unsupported_parameter");
    r.echo = f.boolean("echo").value_or(false);
  }

  // Sampling: the request's values, else the model directory's generation_config.json (when it samples), else
  // OpenAI's defaults (temperature 1, top_p 1, no penalties).
  const auto& gen = m.generation;
  const bool gen_samples = gen && gen->do_sample;
  auto& s = r.params.sampling;
  s.temperature = f.number("temperature", 0, 2).value_or(gen ? (gen_samples ? gen->temperature : 0.0) : 1.0);
  s.top_p = f.number("top_p", 0, 1).value_or(gen_samples ? gen->top_p : 1.0);
  if (s.top_p == 0) throw ApiError(400, "'top_p' must be in (0, 1], got 0", "top_p", "invalid_value");
  s.top_k = f.integer("top_k", -1, 1 << 30).value_or(gen_samples ? gen->top_k : 0);
  if (s.top_k < 0) s.top_k = 0;  // vLLM's -1: off
  s.repetition_penalty = f.number("repetition_penalty", 0, 10).value_or(gen_samples ? gen->repetition_penalty : 1.0);
  if (s.repetition_penalty == 0)
    throw ApiError(400, "'repetition_penalty' must be > 0", "repetition_penalty", "invalid_value");
  s.min_p = f.number("min_p", 0, 1).value_or(0.0);
  r.params.min_tokens = f.integer("min_tokens", 0, std::numeric_limits<int32_t>::max()).value_or(0);
  s.frequency_penalty = f.number("frequency_penalty", -2, 2).value_or(0.0);
  s.presence_penalty = f.number("presence_penalty", -2, 2).value_or(0.0);
  if (const auto seed = f.integer("seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()))
    r.seed = static_cast<uint64_t>(*seed);

  if (chat) {
    const bool want = f.boolean("logprobs").value_or(false);
    const auto top = f.integer("top_logprobs", 0, 20);
    if (top && !want) throw ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value");
    r.logprobs = want ? static_cast<int>(top.value_or(0)) : -1;
  } else if (const auto lp = f.integer("logprobs", 0, 5)) {
    r.logprobs = static_cast<int>(*lp);
  }
  r.params.top_logprobs = r.logprobs;

  r.params.stop = read_stop(f);
  if (gen)
    for (const auto& st : gen->stop_strings) r.params.stop.push_back(st);
  if (!f.boolean("ignore_eos").value_or(false)) r.params.eos_ids = m.eos_ids;

  if (chat) {
    const data::Conversation conv = read_messages(f);
    if (conv.messages.back().role == "assistant")
      throw ApiError(400, "the last message must not be the assistant's (continuing a reply is not supported)",
                     "messages", "invalid_value");
    try {
      r.prompts.push_back(chat_format->prompt_ids(conv, *m.tok, f.has("chat_template_kwargs") ? f.at("chat_template_kwargs")
                                                                                          : json::object()));
    } catch (const Error& e) {  // the template's raise_exception: a conversation it does not take
      throw ApiError(400, e.what(), "messages", "invalid_value");
    }
    r.prompt_texts.push_back("");
    for (const auto& marker : chat_format->stop_strings()) r.params.stop.push_back(marker);
  } else {
    // Every prompt x n choices is a sequence: more than the server queues can never run, so refuse before tokenizing.
    const json& p = f.has("prompt") ? f.at("prompt") : json();
    const int64_t prompts = p.is_array() && !p.empty() && !p.front().is_number() ? static_cast<int64_t>(p.size()) : 1;
    if (prompts * r.n > m.max_sequences)
      throw ApiError(400, std::to_string(prompts) + " prompts x n = " + std::to_string(r.n) + " asks for " +
                              std::to_string(prompts * r.n) + " sequences; this server takes at most " +
                              std::to_string(m.max_sequences) + " per request", "prompt", "invalid_value");
    read_prompts(f, m, r);
  }

  // Lengths: every prompt must leave room for one token; max_tokens must fit beside the longest.
  size_t longest = 0;
  for (const auto& p : r.prompts) {
    if (p.empty()) throw ApiError(400, "a prompt is empty", chat ? "messages" : "prompt", "invalid_value");
    longest = std::max(longest, p.size());
  }
  const int64_t room = m.capacity - static_cast<int64_t>(longest);
  if (room < 1)
    throw ApiError(400, "this model's maximum context length is " + std::to_string(m.capacity) +
                            " tokens; the prompt has " + std::to_string(longest),
                   chat ? "messages" : "prompt", "context_length_exceeded");
  const char* max_key = chat && f.has("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  const auto max_tokens = f.integer(max_key, 1, std::numeric_limits<int32_t>::max());
  if (chat && f.has("max_tokens") && f.has("max_completion_tokens"))
    throw ApiError(400, "give 'max_completion_tokens' or 'max_tokens', not both", "max_tokens", "invalid_value");
  if (max_tokens && *max_tokens > room)
    throw ApiError(400, "this model's maximum context length is " + std::to_string(m.capacity) + " tokens; the prompt has " +
                            std::to_string(longest) + " and " + max_key + " asks for " + std::to_string(*max_tokens) +
                            " more",
                   max_key, "context_length_exceeded");
  // Unset: completions 16 (OpenAI's default), chat until the context ends; generation_config.json's max_new_tokens
  // first where given.
  const int64_t fallback = gen && gen->max_new_tokens ? *gen->max_new_tokens : chat ? room : 16;
  r.params.max_tokens = max_tokens.value_or(std::min(fallback, room));
  return r;
}

}  // namespace

std::vector<GenerationParams> sequences_of(const ApiRequest& r, std::vector<size_t>& indices) {
  std::vector<GenerationParams> out;
  indices.clear();
  std::random_device rd;
  for (size_t p = 0; p < r.prompts.size(); ++p)
    for (int64_t j = 0; j < r.n; ++j) {
      GenerationParams g = r.params;
      g.prompt = r.prompts[p];
      const size_t i = p * static_cast<size_t>(r.n) + static_cast<size_t>(j);
      g.sampling.seed = r.seed ? *r.seed + i : (static_cast<uint64_t>(rd()) << 32) ^ rd();
      out.push_back(std::move(g));
      indices.push_back(i);
    }
  return out;
}

namespace {
std::string random_id(const char* prefix) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  static const char* hex = "0123456789abcdef";
  std::string id = prefix;
  for (int i = 0; i < 24; ++i) id += hex[rng() % 16];
  return id;
}

std::string sse(const ordered_json& j) { return "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n"; }
}  // namespace

ResponseWriter::ResponseWriter(const ApiRequest& r, const ServedModel& m)
    : r_(r), m_(m), id_(random_id(r.endpoint == Endpoint::ChatCompletions ? "chatcmpl-" : "cmpl-")),
      created_(std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count()),
      choices_(r.prompts.size() * static_cast<size_t>(r.n)) {
  for (const auto& p : r.prompts) prompt_tokens_ += static_cast<int64_t>(p.size());
  if (r.echo)
    for (size_t i = 0; i < choices_.size(); ++i) {
      choices_[i].text = r.prompt_texts[i / static_cast<size_t>(r.n)];
      choices_[i].streamed_offset = choices_[i].text.size();
    }
}

ordered_json ResponseWriter::head(const char* object) const {
  return {{"id", id_}, {"object", object}, {"created", created_}, {"model", m_.name}};
}

ordered_json ResponseWriter::logprobs_json(const std::vector<TokenLogprob>& lps, size_t& text_offset) const {
  auto piece = [&](int32_t id) { return m_.tok->decode({id}); };
  auto bytes = [](const std::string& s) {
    ordered_json b = ordered_json::array();
    for (unsigned char c : s) b.push_back(static_cast<int>(c));
    return b;
  };
  if (r_.endpoint == Endpoint::ChatCompletions) {
    ordered_json content = ordered_json::array();
    for (const auto& t : lps) {
      ordered_json top = ordered_json::array();
      for (const auto& [id, lp] : t.top)
        top.push_back({{"token", piece(id)}, {"logprob", lp}, {"bytes", bytes(piece(id))}});
      const std::string p = piece(t.token);
      content.push_back({{"token", p}, {"logprob", t.logprob}, {"bytes", bytes(p)}, {"top_logprobs", top}});
    }
    return {{"content", content}};
  }
  ordered_json tokens = ordered_json::array(), values = ordered_json::array(), tops = ordered_json::array(),
               offsets = ordered_json::array();
  for (const auto& t : lps) {
    const std::string p = piece(t.token);
    tokens.push_back(p);
    values.push_back(t.logprob);
    ordered_json top = ordered_json::object();
    for (const auto& [id, lp] : t.top) top[piece(id)] = lp;
    tops.push_back(top);
    offsets.push_back(text_offset);
    text_offset += p.size();
  }
  return {{"tokens", tokens}, {"token_logprobs", values}, {"top_logprobs", tops}, {"text_offset", offsets}};
}

ordered_json ResponseWriter::usage() const {
  int64_t completion = 0;
  for (const auto& c : choices_) completion += c.completion_tokens;
  return {{"prompt_tokens", prompt_tokens_}, {"completion_tokens", completion},
          {"total_tokens", prompt_tokens_ + completion}};
}

void ResponseWriter::note(const Event& e) {
  Choice& c = choices_.at(e.index);
  if (e.finish != FinishReason::None && c.finish == FinishReason::None) {
    c.finish = e.finish;
    c.completion_tokens = e.completion_tokens;
    ++finished_;
  }
}

std::string ResponseWriter::stream_start() const {
  if (r_.endpoint != Endpoint::ChatCompletions) return "";
  std::string out;
  for (size_t i = 0; i < choices_.size(); ++i) {
    ordered_json chunk = head("chat.completion.chunk");
    chunk["choices"] = {{{"index", i}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr},
                         {"finish_reason", nullptr}}};
    out += sse(chunk);
  }
  return out;
}

std::string ResponseWriter::stream_event(const Event& e) {
  note(e);
  const bool chat = r_.endpoint == Endpoint::ChatCompletions;
  Choice& c = choices_.at(e.index);
  std::string out;
  // Completions with echo: the prompt's text comes first, in the choice's first chunk.
  std::string text = e.text;
  if (!chat && r_.echo && !c.text.empty()) text = std::move(c.text) + text, c.text.clear();
  const bool finished = e.finish != FinishReason::None;
  if (text.empty() && e.logprobs.empty() && !finished) return out;
  ordered_json choice = {{"index", e.index}};
  if (chat) {
    choice["delta"] = text.empty() && finished ? ordered_json::object() : ordered_json{{"content", text}};
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = r_.logprobs >= 0 && !e.logprobs.empty() ? logprobs_json(e.logprobs, c.streamed_offset) : ordered_json();
  choice["finish_reason"] = finished ? ordered_json(finish_reason_name(e.finish)) : ordered_json();
  ordered_json chunk = head(chat ? "chat.completion.chunk" : "text_completion");
  chunk["choices"] = ordered_json::array({choice});
  if (r_.include_usage) chunk["usage"] = nullptr;
  out += sse(chunk);
  return out;
}

std::string ResponseWriter::stream_end() const {
  std::string out;
  if (r_.include_usage) {
    ordered_json chunk = head(r_.endpoint == Endpoint::ChatCompletions ? "chat.completion.chunk" : "text_completion");
    chunk["choices"] = ordered_json::array();
    chunk["usage"] = usage();
    out += sse(chunk);
  }
  return out + "data: [DONE]\n\n";
}

std::string ResponseWriter::stream_error(const ApiError& e) { return sse(error_body(e)); }

void ResponseWriter::collect(const Event& e) {
  Choice& c = choices_.at(e.index);
  c.text += e.text;
  c.logprobs.insert(c.logprobs.end(), e.logprobs.begin(), e.logprobs.end());
  note(e);
}

ordered_json ResponseWriter::body() const {
  const bool chat = r_.endpoint == Endpoint::ChatCompletions;
  ordered_json out = head(chat ? "chat.completion" : "text_completion");
  ordered_json choices = ordered_json::array();
  for (size_t i = 0; i < choices_.size(); ++i) {
    const Choice& c = choices_[i];
    ordered_json choice = {{"index", i}};
    if (chat) choice["message"] = {{"role", "assistant"}, {"content", c.text}};
    else choice["text"] = c.text;
    size_t offset = r_.echo ? r_.prompt_texts[i / static_cast<size_t>(r_.n)].size() : 0;
    choice["logprobs"] = r_.logprobs >= 0 ? logprobs_json(c.logprobs, offset) : ordered_json();
    choice["finish_reason"] = c.finish == FinishReason::None ? ordered_json() : ordered_json(finish_reason_name(c.finish));
    choices.push_back(choice);
  }
  out["choices"] = choices;
  out["usage"] = usage();
  return out;
}

ordered_json models_body(const ServedModel& m) {
  ordered_json data = ordered_json::array({{{"id", m.name}, {"object", "model"}, {"created", m.created},
                                            {"owned_by", "dsopen"}, {"max_model_len", m.capacity}}});
  for (const auto& a : m.adapters)  // vLLM's shape for LoRA modules: the base model as `parent`
    data.push_back({{"id", a.name}, {"object", "model"}, {"created", m.created}, {"owned_by", "dsopen"},
                    {"max_model_len", m.capacity}, {"parent", m.name}});
  return {{"object", "list"}, {"data", data}};
}

}  // namespace dsopen::serve
