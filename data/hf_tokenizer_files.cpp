#include "data/hf_tokenizer_files.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "data/chat_format.h"
#include "data/tokenizer.h"
#include "utils/config.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/json.h"

namespace fs = std::filesystem;

namespace dsopen::data {

ChatTemplate chat_template_of(const std::string& model_dir) {
  ChatTemplate tmpl;
  const fs::path run_config = fs::path(model_dir) / "dsopen.yaml";
  std::error_code ec;
  if (!fs::exists(run_config, ec)) return tmpl;
  const config::Document doc = config::Document::load(run_config.string());
  config::ErrorList errors;
  config::Reader root(doc, doc.root(), "", errors);
  if (root.has("data")) {
    config::Reader d = root.child("data");
    if (d.has("chat_template")) {
      config::Reader t = d.child("chat_template");
      decode(t, tmpl);
    }
  }
  errors.throw_if_any();
  return tmpl;
}

std::string chat_template_jinja(const ChatTemplate& t) {
  // Every literal goes through a Jinja string (JSON escaping is valid there), so no marker can be read as template
  // syntax and no newline is eaten by transformers' trim_blocks.
  auto lit = [](const std::string& s) { return nlohmann::json(s).dump(); };
  std::string j;
  if (t.add_bos) j += "{{- bos_token }}";
  j += "{%- for message in messages %}";
  j += "{%- if message['role'] == 'system' %}{{- " + lit(t.system_prefix) + " + message['content'] + " + lit(t.system_suffix) + " }}";
  j += "{%- elif message['role'] == 'user' %}{{- " + lit(t.user_prefix) + " + message['content'] + " + lit(t.user_suffix) + " }}";
  j += "{%- elif message['role'] == 'assistant' %}{{- " + lit(t.assistant_prefix) + " + message['content'] + " +
       lit(t.assistant_suffix) + " }}";
  if (t.add_eos) j += "{%- if loop.last %}{{- eos_token }}{%- endif %}";
  j += "{%- else %}{{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}";
  j += "{%- endif %}{%- endfor %}";
  j += "{%- if add_generation_prompt %}{{- " + lit(t.assistant_prefix) + " }}{%- endif %}";
  return j;
}

std::map<std::string, std::string> hf_tokenizer_files(const std::string& tokenizer_dir, const ChatTemplate& tmpl,
                                                      int64_t model_max_length) {
  std::map<std::string, std::string> files;
  if (tokenizer_dir.empty()) return files;
  const fs::path dir(tokenizer_dir);
  std::error_code ec;
  if (fs::exists(dir / "tokenizer.json", ec)) {
    for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"})
      if (fs::exists(dir / name, ec)) files[name] = env::read_file((dir / name).string());
    // A file dsopen itself would refuse (a repeated key, not JSON) is refused here too, not handed on.
    for (const char* name : {"tokenizer.json", "special_tokens_map.json"}) {
      if (!files.count(name)) continue;
      const std::string where = (dir / name).string();
      try {
        json::parse(files[name], where);
      } catch (const nlohmann::json::exception& e) {
        throw runtime_error(where, "not valid JSON (" + json::reason(e) + ")", "restore the model's " + std::string(name));
      }
    }
    nlohmann::ordered_json config = nlohmann::ordered_json::object();
    if (files.count("tokenizer_config.json")) {
      const std::string where = (dir / "tokenizer_config.json").string();
      try {
        config = json::parse_ordered(files["tokenizer_config.json"], where);
      } catch (const nlohmann::json::exception& e) {
        throw runtime_error(where, "not valid JSON (" + json::reason(e) + ")", "restore the model's tokenizer_config.json");
      }
      if (!config.is_object()) throw runtime_error(where, "not a JSON object", "restore the model's tokenizer_config.json");
      if (config.contains("chat_template")) return files;  // the model's own template stays
    } else {
      config["tokenizer_class"] = "PreTrainedTokenizerFast";
    }
    config["chat_template"] = tmpl.jinja.empty() ? chat_template_jinja(tmpl) : ChatFormat::from_jinja_path(tmpl.jinja).jinja_source();
    files["tokenizer_config.json"] = config.dump(2) + "\n";
    return files;
  }
  const fs::path model = dir / "tokenizer.model";
  if (!fs::exists(model, ec)) return files;
  const auto sp = SentencePieceTokenizer::load(model.string());
  files["tokenizer.model"] = env::read_file(model.string());
  files["tokenizer.json"] = sp->hf_tokenizer_json();
  // Special tokens by their pieces; SentencePiece ids: pad 0, bos 1, eos 2, unk 3 (dsopen-tokenizer train).
  nlohmann::ordered_json specials = nlohmann::ordered_json::object();
  const auto piece = [&](int32_t id) { return sp->piece(id); };
  if (sp->bos_id() >= 0) specials["bos_token"] = piece(sp->bos_id());
  if (sp->eos_id() >= 0) specials["eos_token"] = piece(sp->eos_id());
  if (sp->pad_id() >= 0) specials["pad_token"] = piece(sp->pad_id());
  if (sp->unk_id() >= 0) specials["unk_token"] = piece(sp->unk_id());
  nlohmann::ordered_json config = {{"tokenizer_class", "PreTrainedTokenizerFast"},
                                   {"add_bos_token", sp->bos_id() >= 0},
                                   {"add_eos_token", false},
                                   {"clean_up_tokenization_spaces", false},
                                   {"model_max_length", model_max_length}};
  for (const auto& [k, v] : specials.items()) config[k] = v;
  config["chat_template"] = tmpl.jinja.empty() ? chat_template_jinja(tmpl) : ChatFormat::from_jinja_path(tmpl.jinja).jinja_source();
  files["tokenizer_config.json"] = config.dump(2) + "\n";
  files["special_tokens_map.json"] = specials.dump(2) + "\n";
  return files;
}

}  // namespace dsopen::data
