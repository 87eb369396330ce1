// Checks the incremental inference::TextStream against its definition, decode(prompt + generated) minus
// decode(prompt) with whole decodes, token by token, for a tokenizer the including test builds: natural text
// (English, Chinese, spaces the dummy prefix could eat), special tokens and lone spaces, and random ids (byte pieces
// split mid-character), prompts ending inside a character included.
#pragma once

#include <catch2/catch.hpp>

#include <random>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "inference/text_stream.h"

namespace dsopen::testing {

// The definition, with whole decodes: the text after decode(prompt), or after the longest common prefix (from a
// character boundary) where the prompt's last character changes with what follows.
inline std::string whole_decode_text(const data::Tokenizer& tok, const std::vector<int32_t>& prompt,
                                     const std::vector<int32_t>& generated) {
  std::vector<int32_t> ids = prompt;
  ids.insert(ids.end(), generated.begin(), generated.end());
  const std::string all = tok.decode(ids), before = tok.decode(prompt);
  if (all.compare(0, before.size(), before) == 0) return all.substr(before.size());
  size_t common = 0;
  while (common < all.size() && common < before.size() && all[common] == before[common]) ++common;
  while (common > 0 && (static_cast<unsigned char>(all[common]) & 0xC0) == 0x80) --common;
  return all.substr(common);
}

// What visible() must return, from the whole text: the length before the first stop string, or (not final) without
// a trailing U+FFFD and an end that could begin a stop string.
inline size_t whole_visible_length(const std::string& text, const std::vector<std::string>& stops, bool final,
                                   bool& stopped) {
  size_t cut = text.size();
  stopped = false;
  for (const auto& s : stops)
    if (!s.empty() && text.find(s) != std::string::npos && text.find(s) < cut) cut = text.find(s), stopped = true;
  if (final || stopped) return cut;
  size_t n = text.size();
  while (n >= 3 && text.compare(n - 3, 3, "\xEF\xBF\xBD") == 0) n -= 3;
  size_t hold = 0;
  for (const auto& s : stops)
    for (size_t k = 1; k < s.size() && k <= n; ++k)
      if (text.compare(n - k, k, s, 0, k) == 0) hold = std::max(hold, k);
  return n - hold;
}

inline void check_text_stream_against_whole_decodes(const data::Tokenizer& tok, uint32_t seed) {
  const std::vector<std::string> texts = {
      "Hello, world! 你好，世界。", "  two spaces,\ttabs\nand a newline", "床前明月光，疑是地上霜。",
      "A penny saved is a penny earned.", " leading space", "混合 mixed 文本 text 😀 emoji", "x"};
  std::vector<std::vector<int32_t>> encoded;
  for (const auto& t : texts) encoded.push_back(tok.encode(t));
  // Ids that decode to nothing or to a lone space on their own: a context made of them alone must not make the next
  // piece the first of its decode (SentencePiece then drops its leading space).
  std::vector<int32_t> tricky = {tok.bos_id(), tok.eos_id()};
  for (const char* piece : {"\xE2\x96\x81", "\xC4\xA0"})  // U+2581 (SentencePiece's space), U+0120 (byte-level's)
    if (tok.token_id(piece) >= 0) tricky.push_back(tok.token_id(piece));
  std::mt19937 rng(seed);
  auto pick = [&](size_t n) { return static_cast<size_t>(std::uniform_int_distribution<size_t>(0, n - 1)(rng)); };
  // Natural text, or ids drawn at random (bytes that split characters, control and special tokens).
  auto tokens = [&](size_t n) {
    std::vector<int32_t> out;
    while (out.size() < n) {
      const size_t kind = pick(3);
      if (kind == 0) {
        const auto& e = encoded[pick(encoded.size())];
        out.insert(out.end(), e.begin(), e.end());
      } else if (kind == 1) {
        for (size_t k = 1 + pick(3); k > 0; --k) out.push_back(tricky[pick(tricky.size())]);
      } else {
        for (size_t k = 1 + pick(4); k > 0; --k) out.push_back(static_cast<int32_t>(pick(tok.vocab_size())));
      }
    }
    out.resize(n);
    return out;
  };
  for (int trial = 0; trial < 300; ++trial) {
    const auto prompt = tokens(pick(14));
    const auto all = tokens(1 + pick(40));
    inference::TextStream stream(tok, prompt);
    std::vector<int32_t> generated;
    for (const int32_t id : all) {
      generated.push_back(id);
      const std::string expect = whole_decode_text(tok, prompt, generated);
      const std::string got = stream.text(generated);
      INFO("trial " << trial << ", token " << generated.size() << " of " << all.size());
      REQUIRE(got == expect);
    }
    // Stop strings: pieces of the whole text (bytes, so sometimes half a character) and one that never occurs.
    const std::string whole = whole_decode_text(tok, prompt, all);
    std::vector<std::string> stops = {"\x01never"};
    for (size_t k = pick(3); k > 0 && !whole.empty(); --k) {
      const size_t at = pick(whole.size());
      stops.push_back(whole.substr(at, 1 + pick(4)));
    }
    inference::TextStream shown(tok, prompt);
    std::vector<int32_t> prefix;
    size_t before = 0;
    std::string shown_text;
    for (const int32_t id : all) {
      prefix.push_back(id);
      bool stopped = false, want_stopped = false;
      const size_t got = shown.visible(prefix, stops, /*final=*/false, stopped);
      const size_t want = whole_visible_length(whole_decode_text(tok, prompt, prefix), stops, false, want_stopped);
      INFO("trial " << trial << ", visible text after token " << prefix.size());
      REQUIRE(got == want);
      REQUIRE(stopped == want_stopped);
      REQUIRE(got >= before);  // what was shown stays shown, unchanged
      REQUIRE(shown.current().compare(0, before, shown_text) == 0);
      before = got;
      shown_text = shown.current().substr(0, got);
      if (stopped) break;
    }
    bool stopped = false, want_stopped = false;
    REQUIRE(shown.visible(prefix, stops, /*final=*/true, stopped) ==
            whole_visible_length(whole_decode_text(tok, prompt, prefix), stops, true, want_stopped));
    REQUIRE(stopped == want_stopped);
    // Asking again without new tokens, and starting over with fewer, give the same text.
    REQUIRE(stream.text(generated) == whole_decode_text(tok, prompt, generated));
    generated.resize(generated.size() / 2);
    REQUIRE(stream.text(generated) == whole_decode_text(tok, prompt, generated));
  }
}

}  // namespace dsopen::testing
