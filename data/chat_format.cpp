#include "data/chat_format.h"

#include <filesystem>
#include <optional>

#include "data/hf_tokenizer_files.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/json.h"

namespace fs = std::filesystem;

namespace dsopen::data {

Conversation conversation_from_messages(const nlohmann::json& msgs) {
  if (!msgs.is_array() || msgs.empty()) throw MessageError("messages", "'messages' must be a non-empty array of messages");
  Conversation conv;
  for (size_t i = 0; i < msgs.size(); ++i) {
    const std::string at = "messages[" + std::to_string(i) + "]";
    const auto& m = msgs[i];
    if (!m.is_object()) throw MessageError(at, "'" + at + "' must be an object with 'role' and 'content'");
    if (!m.contains("role") || !m["role"].is_string()) throw MessageError(at + ".role", "'" + at + ".role' must be a string");
    std::string role = m["role"].get<std::string>();
    if (role == "developer") role = "system";
    if (role != "system" && role != "user" && role != "assistant")
      throw MessageError(at + ".role", at + ".role '" + role + "' is not system, developer, user or assistant");
    std::string content;
    static const nlohmann::json none;
    const nlohmann::json& c = m.contains("content") ? m["content"] : none;  // a reference: content may be large
    if (c.is_string()) {
      content = c.get<std::string>();
    } else if (c.is_array()) {
      for (const auto& part : c) {
        if (!part.is_object() || !part.contains("type") || part["type"] != "text" || !part.contains("text") ||
            !part["text"].is_string())
          throw MessageError(at + ".content", at + ".content: only text parts ({\"type\": \"text\", \"text\": ...}) are supported");
        content += part["text"].get<std::string>();
      }
    } else if (!(c.is_null() && role == "assistant")) {
      throw MessageError(at + ".content", "'" + at + ".content' must be a string or an array of text parts");
    }
    conv.messages.push_back({role, content});
  }
  return conv;
}

ChatFormat::ChatFormat(ChatTemplate tmpl) : tmpl_(std::move(tmpl)), description_("dsopen's chat template") {}

ChatFormat::ChatFormat(const std::string& jinja_source, std::string bos_token, std::string eos_token, std::string where)
    : jinja_(std::make_shared<jinja::Template>(jinja_source, where)), bos_(std::move(bos_token)),
      eos_(std::move(eos_token)), description_("the model's chat template (" + where + ")"), source_(jinja_source) {}

namespace {

// A special token of tokenizer_config.json: a string or {"content": ...}; "" when absent.
std::string special_token(const nlohmann::json& config, const char* key) {
  if (!config.contains(key) || config.at(key).is_null()) return "";
  const auto& v = config.at(key);
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v.at("content").is_string()) return v.at("content").get<std::string>();
  return "";
}

// tokenizer_config.json of `dir` ({} when absent); a runtime error naming it when it is not JSON.
nlohmann::json tokenizer_config_in(const fs::path& dir) {
  std::error_code ec;
  const fs::path path = dir / "tokenizer_config.json";
  if (!fs::is_regular_file(path, ec)) return nlohmann::json::object();
  try {
    return json::parse(env::read_file(path.string()), path.string());
  } catch (const nlohmann::json::exception& e) {
    throw runtime_error(path.string(), std::string("not valid JSON: ") + json::reason(e));
  }
}

// The Jinja template of a directory: chat_template.jinja (transformers' newer layout) or tokenizer_config.json's
// chat_template (a string, or a list of {name, template} whose "default" entry is used).
std::optional<ChatFormat> jinja_format_in(const fs::path& dir) {
  std::error_code ec;
  const fs::path config_path = dir / "tokenizer_config.json", jinja_path = dir / "chat_template.jinja";
  const nlohmann::json config = tokenizer_config_in(dir);
  const std::string bos = special_token(config, "bos_token"), eos = special_token(config, "eos_token");
  if (fs::is_regular_file(jinja_path, ec))
    return ChatFormat(env::read_file(jinja_path.string()), bos, eos, jinja_path.string());
  if (!config.contains("chat_template") || config.at("chat_template").is_null()) return std::nullopt;
  const auto& t = config.at("chat_template");
  if (t.is_string()) return ChatFormat(t.get<std::string>(), bos, eos, config_path.string() + " chat_template");
  if (t.is_array())
    for (const auto& e : t)
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e.at("template").is_string())
        return ChatFormat(e.at("template").get<std::string>(), bos, eos, config_path.string() + " chat_template");
  throw runtime_error(config_path.string(), "chat_template must be a string or a list with a {\"name\": \"default\"} entry");
}

}  // namespace

ChatFormat ChatFormat::from_jinja_path(const std::string& path) {
  std::error_code ec;
  const fs::path p(path);
  if (fs::is_directory(p, ec)) {
    if (auto f = jinja_format_in(p)) return *f;
    throw runtime_error(path, "holds no chat_template.jinja and no tokenizer_config.json with a chat_template");
  }
  if (p.filename() == "tokenizer_config.json") {
    if (auto f = jinja_format_in(p.parent_path())) return *f;
    throw runtime_error(path, "has no chat_template");
  }
  if (!fs::is_regular_file(p, ec)) throw runtime_error(path, "chat template not found");
  // A bare template: the special tokens from a tokenizer_config.json beside it, if any.
  const nlohmann::json config = tokenizer_config_in(p.parent_path());
  return ChatFormat(env::read_file(path), special_token(config, "bos_token"), special_token(config, "eos_token"), path);
}

ChatFormat ChatFormat::for_template(const ChatTemplate& tmpl) {
  return tmpl.jinja.empty() ? ChatFormat(tmpl) : from_jinja_path(tmpl.jinja);
}

ChatFormat ChatFormat::for_model(const std::string& model_dir, const std::string& tokenizer_dir) {
  std::error_code ec;
  // A dsopen run's own checkpoint: the template it trained with (its export's Jinja template renders the same).
  if (fs::exists(fs::path(model_dir) / "dsopen.yaml", ec)) return for_template(chat_template_of(model_dir));
  for (const std::string& dir : {model_dir, tokenizer_dir}) {
    if (dir.empty()) continue;
    const fs::path d = fs::is_directory(dir, ec) ? fs::path(dir) : fs::path(dir).parent_path();
    if (auto f = jinja_format_in(d)) return *f;
  }
  return ChatFormat(chat_template_of(model_dir));
}

namespace {

jinja::Value messages_json(const Conversation& conv) {
  jinja::Value messages = jinja::Value::array();
  for (const auto& m : conv.messages) messages.push_back({{"role", m.role}, {"content", m.content}});
  return messages;
}

}  // namespace

std::string ChatFormat::render(const Conversation& conv, bool add_generation_prompt, const Tokenizer& tok,
                              const nlohmann::json& extra) const {
  if (!jinja_)
    return tok.decode(add_generation_prompt ? prompt_ids(conv, tok) : tokenize_conversation(conv, tok, tmpl_).ids);
  // As transformers' apply_chat_template: tools and documents are passed (None), special tokens when set, the
  // caller's extra variables last.
  jinja::Value ctx = {{"messages", messages_json(conv)}, {"add_generation_prompt", add_generation_prompt},
                      {"tools", nullptr}, {"documents", nullptr}};
  if (!bos_.empty()) ctx["bos_token"] = bos_;
  if (!eos_.empty()) ctx["eos_token"] = eos_;
  if (extra.is_object())
    for (const auto& [k, v] : extra.items()) ctx[k] = v;
  return jinja_->render(ctx);
}

std::vector<int32_t> ChatFormat::prompt_ids(const Conversation& conv, const Tokenizer& tok,
                                            const nlohmann::json& extra) const {
  return ids(conv, /*add_generation_prompt=*/true, tok, extra);
}

std::vector<int32_t> ChatFormat::ids(const Conversation& conv, bool add_generation_prompt, const Tokenizer& tok,
                                     const nlohmann::json& extra) const {
  if (!jinja_) {
    ChatTemplate t = tmpl_;
    t.add_eos = false;  // the conversation goes on
    auto ids = tokenize_conversation(conv, tok, t).ids;
    if (add_generation_prompt && !t.assistant_prefix.empty())
      for (int32_t id : tok.encode(t.assistant_prefix)) ids.push_back(id);
    return ids;
  }
  return encode(render(conv, add_generation_prompt, tok, extra), tok);
}

std::vector<int32_t> ChatFormat::encode(const std::string& text, const Tokenizer& tok) const {
  // BOS/EOS written out by the template become their ids (a SentencePiece model never reads "<s>" as BOS).
  std::vector<std::pair<std::string, int32_t>> specials;
  for (const auto& s : {bos_, eos_})
    if (!s.empty() && tok.token_id(s) >= 0) specials.emplace_back(s, tok.token_id(s));
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t next = std::string::npos;
    const std::pair<std::string, int32_t>* which = nullptr;
    for (const auto& sp : specials) {
      const size_t at = text.find(sp.first, pos);
      if (at < next || (at == next && which && sp.first.size() > which->first.size())) next = at, which = &sp;
    }
    const std::string chunk = text.substr(pos, next == std::string::npos ? std::string::npos : next - pos);
    if (!chunk.empty())
      for (int32_t id : tok.encode(chunk)) ids.push_back(id);
    if (!which) break;
    ids.push_back(which->second);
    pos = next + which->first.size();
  }
  return ids;
}

TokenizedConversation ChatFormat::tokenize(const Conversation& conv, const Tokenizer& tok) const {
  if (!jinja_) return tokenize_conversation(conv, tok, tmpl_);
  // The whole conversation encoded at once, as apply_chat_template(tokenize=True) does; each reply's tokens are
  // those after the prompt that would have asked for it (the messages before it, generation prompt on) up to where
  // the conversation ending with it parts from the whole (so a template's end-of-conversation EOS counts only when
  // the reply is the last message). Compared as tokens, not text: the two renders may share the first characters
  // of different markers.
  auto common = [](const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
    size_t n = 0;
    while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
    return n;
  };
  const std::vector<int32_t> ids = encode(render(conv, false, tok), tok);
  std::vector<char> target(ids.size(), 0);
  Conversation upto;
  for (size_t i = 0; i < conv.messages.size(); ++i) {
    if (conv.messages[i].role == "assistant") {
      const auto before = encode(render(upto, true, tok), tok);
      const size_t start = common(before, ids);
      if (start < before.size())
        throw runtime_error(description_, "the conversation up to message " + std::to_string(i) +
                                              " does not render as the start of the whole conversation",
                            "a template that rewrites earlier turns cannot mark what to train");
      upto.messages.push_back(conv.messages[i]);
      const size_t end = common(encode(render(upto, false, tok), tok), ids);
      for (size_t t = start; t < end; ++t) target[t] = 1;
    } else {
      upto.messages.push_back(conv.messages[i]);
    }
  }
  TokenizedConversation out;
  out.labels.assign(ids.size(), -100);  // ignored by the loss (as in data/sft.h)
  for (size_t i = 0; i + 1 < ids.size(); ++i)
    if (target[i + 1]) out.labels[i] = ids[i + 1];
  out.ids = ids;
  return out;
}

std::vector<std::string> ChatFormat::stop_strings() const {
  if (jinja_) return {};
  const auto& suffix = tmpl_.assistant_suffix;
  const auto first = suffix.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return {};
  return {suffix.substr(first, suffix.find_last_not_of(" \t\r\n") - first + 1)};
}

}  // namespace dsopen::data
