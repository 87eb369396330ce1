#include "inference/chat.h"

#include <iostream>

namespace dsopen::inference {

std::vector<int32_t> chat_prompt(const data::Conversation& conv, const data::Tokenizer& tok,
                                 const data::ChatTemplate& tmpl) {
  data::ChatTemplate t = tmpl;
  t.add_eos = false;  // the conversation goes on
  auto ids = data::tokenize_conversation(conv, tok, t).ids;
  if (!t.assistant_prefix.empty())
    for (int32_t id : tok.encode(t.assistant_prefix)) ids.push_back(id);
  return ids;
}

std::string chat_stop(const data::ChatTemplate& tmpl) {
  const auto first = tmpl.assistant_suffix.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return "";
  const auto last = tmpl.assistant_suffix.find_last_not_of(" \t\r\n");
  return tmpl.assistant_suffix.substr(first, last - first + 1);
}

data::Conversation chat_loop(model::CausalLM& model, const data::Tokenizer& tok, Sampler& sampler,
                             const ChatOptions& o, std::istream& in, std::ostream& out) {
  GenerateOptions go = o.generate;
  if (const auto stop = chat_stop(o.tmpl); !stop.empty()) go.stop.push_back(stop);
  const int64_t ctx = model->config().context_length();
  auto fresh = [&] {
    data::Conversation c;
    if (!o.system.empty()) c.messages.push_back({"system", o.system});
    return c;
  };
  data::Conversation conv = fresh();
  const size_t first_turn = conv.messages.size();
  std::string line;
  while (true) {
    if (o.show_prompt) std::cerr << "> " << std::flush;
    if (!std::getline(in, line)) break;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line == "/exit") break;
    if (line == "/reset") {
      conv = fresh();
      continue;
    }
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    conv.messages.push_back({"user", line});
    auto prompt = chat_prompt(conv, tok, o.tmpl);
    // Drop whole exchanges (user + assistant) from the front until the reply has room.
    while (static_cast<int64_t>(prompt.size()) + go.max_new_tokens > ctx && conv.messages.size() > first_turn + 2) {
      conv.messages.erase(conv.messages.begin() + first_turn, conv.messages.begin() + first_turn + 2);
      prompt = chat_prompt(conv, tok, o.tmpl);
    }
    auto r = generate(model, tok, prompt, sampler, go, [&](const std::string& piece) { out << piece << std::flush; });
    out << std::endl;
    conv.messages.push_back({"assistant", r.text});
  }
  return conv;
}

}  // namespace dsopen::inference
