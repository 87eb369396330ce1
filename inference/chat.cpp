#include "inference/chat.h"

#include <iostream>

namespace dsopen::inference {

std::vector<int32_t> chat_prompt(const data::Conversation& conv, const data::Tokenizer& tok,
                                 const data::ChatTemplate& tmpl) {
  return data::ChatFormat(tmpl).prompt_ids(conv, tok);
}

std::string chat_stop(const data::ChatTemplate& tmpl) {
  const auto stops = data::ChatFormat(tmpl).stop_strings();
  return stops.empty() ? "" : stops.front();
}

data::Conversation chat_loop(model::CausalLM& model, const data::Tokenizer& tok, Sampler& sampler,
                             const ChatOptions& o, std::istream& in, std::ostream& out) {
  GenerateOptions go = o.generate;
  for (const auto& stop : o.format.stop_strings()) go.stop.push_back(stop);
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
    auto prompt = o.format.prompt_ids(conv, tok);
    // Drop whole exchanges (user + assistant) from the front until the reply has room.
    while (static_cast<int64_t>(prompt.size()) + go.max_new_tokens > ctx && conv.messages.size() > first_turn + 2) {
      conv.messages.erase(conv.messages.begin() + first_turn, conv.messages.begin() + first_turn + 2);
      prompt = o.format.prompt_ids(conv, tok);
    }
    auto r = generate(model, tok, prompt, sampler, go, [&](const std::string& piece) { out << piece << std::flush; });
    out << std::endl;
    conv.messages.push_back({"assistant", r.text});
  }
  return conv;
}

}  // namespace dsopen::inference
