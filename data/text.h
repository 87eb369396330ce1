// Text cleaning shared by tokenizer training and preprocessing: ANSI escape stripping and UTF-8 validation.
#pragma once

#include <string>
#include <string_view>

namespace dsopen::data {

// Removes ANSI/VT100 escape sequences (CSI `ESC [ ... final`, and two-byte `ESC x`), which some corpora (the
// Chinese fortune files, for one) carry for terminal colours.
std::string strip_ansi(std::string_view text);

// True when `text` is well-formed UTF-8 (no overlong forms, surrogates or code points above U+10FFFF).
bool is_valid_utf8(std::string_view text);

}  // namespace dsopen::data
