// Strict JSON parsing for files other programs wrote (safetensors headers, config.json, tokenizer.json, index and
// adapter files, JSONL data): nlohmann::json, like Python's json, keeps the *last* of two equal keys in an object,
// so a crafted file can carry one value for a reader that checks and another for one that loads. Refusing
// duplicates (as safetensors' Rust reader does) gives every reader the same document.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>

namespace dsopen::json {

// Parses `text`. An object that repeats a key throws dsopen::Error (runtime) naming `where` and the key's path
// ("duplicate key 'a.b'"), as does a NUL byte anywhere (nlohmann would stop reading there); syntax errors throw nlohmann::json::parse_error as nlohmann::json::parse does, so callers
// word those messages themselves.
nlohmann::json parse(std::string_view text, const std::string& where);
nlohmann::ordered_json parse_ordered(std::string_view text, const std::string& where);

// The readable part of a nlohmann exception: its message without the "[json.exception.parse_error.101] " tag, so
// errors say "parse error at line 3, column 7: ..." and nothing of the library.
std::string reason(const std::exception& e);

}  // namespace dsopen::json
