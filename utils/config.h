// Strict YAML configuration: loading with `base:` inheritance and `--set` overrides, and a Reader that decodes
// one section into a typed struct while collecting every error of the file (unknown keys with a suggestion,
// wrong types, out-of-range values, missing required keys), each with file:line and the key path.
//
// yaml-cpp says nothing about missing or unknown keys and forgets which file a merged node came from, so the
// Document keeps an origin (file, line) for every key path and the Reader checks both directions itself.
// Each folder owns its section struct and a `decode(config::Reader&, Section&)` function for it.
#pragma once

#include <yaml-cpp/yaml.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

namespace dsopen::config {

struct Origin {
  std::string file;  // config file path, or "--set a.b=v" for command-line overrides
  int line = 0;      // 1-based; 0 when unknown
};

// A merged configuration tree plus the origin of every key in it.
class Document {
public:
  // Loads `path`, following `base:` chains (a base path is resolved against the directory of the file naming it,
  // then against the current directory). Throws a usage error on syntax errors, missing files and cycles.
  static Document load(const std::string& path);
  // Parses YAML text; `name` is used in messages in place of a file path.
  static Document parse(const std::string& text, const std::string& name);

  // Applies one `a.b.c=value` override; the value is parsed as YAML (numbers, booleans, [lists]).
  void apply_set(const std::string& assignment);

  const YAML::Node& root() const { return root_; }
  // Where a key path ("train.lr") was last set; walks up to the closest parent that has an origin.
  Origin origin(const std::string& key_path) const;
  // The resolved configuration as YAML text (what runs save next to their outputs).
  std::string dump() const;
  // Logs the resolved configuration and writes it atomically to <output_dir>/config.resolved.yaml, so every
  // run directory records exactly what ran. Returns the path written.
  std::string save_resolved(const std::string& output_dir) const;

private:
  void merge_file(const std::string& path, std::vector<std::string>& chain);
  void merge_node(YAML::Node& dst, const YAML::Node& src, const std::string& prefix, const std::string& file);
  void record(const std::string& key_path, const Origin& origin);

  YAML::Node root_ = YAML::Node(YAML::NodeType::Map);
  std::map<std::string, Origin> origins_;
  std::string name_;
};

// Errors gathered while decoding a document; thrown together as one usage error.
class ErrorList {
public:
  void add(const Origin& origin, const std::string& key_path, const std::string& message);
  bool empty() const { return lines_.empty(); }
  const std::vector<std::string>& lines() const { return lines_; }
  // Throws dsopen::Error (usage) whose message lists every error, one per line.
  void throw_if_any() const;

private:
  std::vector<std::string> lines_;
};

// A value check: returns an empty string when the value is fine, else what is wrong ("must be > 0").
template <class T>
using Check = std::function<std::string(const T&)>;

Check<double> greater_than(double lo);
Check<double> at_least_f(double lo);
Check<double> in_range(double lo, double hi);  // inclusive
Check<long long> at_least(long long lo);
Check<long long> in_range_i(long long lo, long long hi);

// The top-level sections of a run config (docs/CONFIG.md; train::decode_job reads each). Tools that read only some
// of them (dsopen-model-info, dsopen-bench-model) still refuse a misspelled section with this list.
inline constexpr const char* kRunSections[] = {"run", "model", "tokenizer", "data", "train", "parallel", "checkpoint", "lora"};

// Decodes one mapping. Every key read is remembered; finish() reports the others as unknown.
class Reader {
public:
  Reader(const Document& doc, YAML::Node node, std::string path, ErrorList& errors);

  bool has(const std::string& key) const;
  const std::string& path() const { return path_; }
  std::string key_path(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

  // Typed values. `optional` keeps `out` (the default) when the key is absent; `required` reports it missing.
  void optional(const std::string& key, std::string& out);
  void optional(const std::string& key, bool& out);
  void optional(const std::string& key, int& out, const Check<long long>& check = nullptr);
  void optional(const std::string& key, long long& out, const Check<long long>& check = nullptr);
  void optional(const std::string& key, long& out, const Check<long long>& check = nullptr);  // int64_t
  void optional(const std::string& key, double& out, const Check<double>& check = nullptr);
  void optional(const std::string& key, std::vector<std::string>& out);
  void optional(const std::string& key, std::vector<double>& out, size_t expected_size = 0);
  void required(const std::string& key, std::string& out);
  void required(const std::string& key, int& out, const Check<long long>& check = nullptr);
  void required(const std::string& key, long long& out, const Check<long long>& check = nullptr);
  void required(const std::string& key, long& out, const Check<long long>& check = nullptr);
  void required(const std::string& key, double& out, const Check<double>& check = nullptr);

  // A string that must be one of `choices`; `out` is left unchanged when absent.
  void choice(const std::string& key, std::string& out, const std::vector<std::string>& choices);
  // The same for an enum: the string names one of `choices` (name, value), decoded once here so that the code
  // using the value never compares strings.
  template <class E>
  void choice(const std::string& key, E& out, const std::vector<std::pair<std::string, E>>& choices) {
    std::vector<std::string> names;
    std::string name;
    for (const auto& [n, v] : choices) {
      names.push_back(n);
      if (v == out) name = n;
    }
    choice(key, name, names);
    for (const auto& [n, v] : choices)
      if (n == name) out = v;
  }

  // A sub-mapping; absent keys give an empty reader (so its defaults stay), a non-mapping is an error.
  Reader child(const std::string& key);
  // Marks a key as known without decoding it (for keys another layer interprets).
  void accept(const std::string& key);
  // The raw node of a key (undefined node when absent); marks the key as known.
  YAML::Node raw(const std::string& key);

  // Reports an error against `key` (use "" for the section itself).
  void error(const std::string& key, const std::string& message);
  // Keys of this mapping nothing has read or accepted so far.
  std::vector<std::string> unread() const;
  // Reports every key that was not read, suggesting the closest known one. When `strict` is false, unknown keys
  // are ignored (HuggingFace config.json files carry many keys we do not use).
  void finish(bool strict = true);

  ErrorList& errors() { return *errors_; }

private:
  bool fetch(const std::string& key, YAML::Node& node, bool required);
  template <class T>
  bool scalar(const std::string& key, const YAML::Node& node, T& out, const char* type_name);

  const Document* doc_;
  YAML::Node node_;
  std::string path_;
  ErrorList* errors_;
  std::vector<std::string> known_;
};

// The name of an enum value in a (name, value) table as Reader::choice takes it; "?" when absent.
template <class E>
std::string name_of(E value, const std::vector<std::pair<std::string, E>>& names) {
  for (const auto& [n, v] : names)
    if (v == value) return n;
  return "?";
}

// The closest of `candidates` to `word` when it is a plausible typo, else "".
std::string closest_match(const std::string& word, const std::vector<std::string>& candidates);

// Splits "a.b=v" into ("a.b", "v"); throws a usage error naming the bad argument otherwise.
std::pair<std::string, std::string> split_assignment(const std::string& assignment);

}  // namespace dsopen::config
