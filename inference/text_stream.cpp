#include "inference/text_stream.h"

#include <algorithm>

namespace dsopen::inference {

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
bool starts_with_replacement(const std::string& s) { return s.rfind("\xEF\xBF\xBD", 0) == 0; }
}  // namespace

TextStream::TextStream(const data::Tokenizer& tok, const std::vector<int32_t>& prompt) : tok_(tok) {
  const std::string whole = tok.decode(prompt);
  // Grow the tail until its text is the end of the prompt's text and starts on a character boundary (a tail that
  // begins inside a multi-byte character decodes to U+FFFD there). Eight tokens cover any UTF-8 character.
  size_t n = std::min<size_t>(prompt.size(), 8);
  while (true) {
    tail_.assign(prompt.end() - static_cast<std::ptrdiff_t>(n), prompt.end());
    tail_text_ = tok.decode(tail_);
    if (n == prompt.size() || (ends_with(whole, tail_text_) && !starts_with_replacement(tail_text_))) break;
    n = std::min(prompt.size(), n * 2);
  }
}

std::string TextStream::text(const std::vector<int32_t>& generated) const {
  std::vector<int32_t> ids = tail_;
  ids.insert(ids.end(), generated.begin(), generated.end());
  const std::string all = tok_.decode(ids);
  if (all.compare(0, tail_text_.size(), tail_text_) == 0) return all.substr(tail_text_.size());
  // The tail's last character was incomplete and the new bytes completed it: keep what follows the common prefix.
  size_t common = 0;
  while (common < all.size() && common < tail_text_.size() && all[common] == tail_text_[common]) ++common;
  while (common > 0 && (static_cast<unsigned char>(all[common]) & 0xC0) == 0x80) --common;  // a character boundary
  return all.substr(common);
}

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

}  // namespace dsopen::inference
