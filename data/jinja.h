// A Jinja2 renderer for the subset HuggingFace chat templates use (tokenizer_config.json's `chat_template`),
// rendering as transformers' apply_chat_template does: trim_blocks and lstrip_blocks on, `{%-`/`-%}` whitespace
// control, loop controls, transformers' `tojson` (json.dumps, ensure_ascii off) and `raise_exception`.
//
// Supported: output `{{ }}`, comments, `if/elif/else`, `for` (tuple unpacking, an `if` filter, `else`, `loop.*`,
// `break`/`continue`), `set` (names, `ns.attr`, blocks), `macro`/`call`-free macros, `generation` blocks (rendered
// as their content). Expressions: literals (strings, numbers, lists, dicts, tuples, true/false/none in either
// case), attribute and item access, slices, calls, `a if c else b`, `and/or/not`, comparisons, `in`/`not in`,
// `is [not] test`, `+ - * / // % ~`, filters with arguments. Values are JSON values (nlohmann::ordered_json) plus
// Jinja's `undefined`; Python's rules for truth, printing (True, None, 1.0, ['a']) and string methods (strip,
// split, startswith, ...). What a template uses beyond this is an error naming the template line.
#pragma once

#include <nlohmann/json.hpp>

#include <memory>
#include <string>
#include <vector>

namespace dsopen::data::jinja {

using Value = nlohmann::ordered_json;

class Template {
public:
  // Parses `source`; a syntax error is a runtime error "<where> line N: ...".
  Template(const std::string& source, std::string where = "chat template");
  ~Template();
  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;

  // Renders with the variables of `context` (a JSON object). raise_exception(msg) in the template, and errors of
  // evaluation (an unknown filter, a wrong type), are runtime errors naming the line.
  std::string render(const Value& context) const;

  struct Node;

private:
  std::vector<std::unique_ptr<Node>> body_;
  std::string where_;
};

}  // namespace dsopen::data::jinja
