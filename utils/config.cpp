#include "utils/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <set>
#include <sstream>
#include <type_traits>

#include "utils/env.h"
#include "utils/errors.h"

#include <spdlog/spdlog.h>

namespace fs = std::filesystem;

namespace dsopen::config {

// ---------------------------------------------------------------------------------------------------------------
// Document: load, merge, override
// ---------------------------------------------------------------------------------------------------------------

namespace {

std::string where_of(const Origin& o) {
  return o.line > 0 ? o.file + ":" + std::to_string(o.line) : o.file;
}

// YAML (like JSON) asks for unique keys, but yaml-cpp keeps both entries of a repeated key and lookups see the
// first, while Python's yaml and json keep the last: a repeated key would mean different models to different tools.
// Also refuses what a config never needs and the tools could not survive: keys that are not plain names ([a, b]: 1)
// and nesting deeper than any config (an alias that contains itself, `&m {x: *m}`, would recurse forever).
void reject_duplicate_keys(const YAML::Node& node, const std::string& file, const std::string& prefix, int depth = 0) {
  const auto line = [&](const YAML::Node& n) { return file + ":" + std::to_string(n.Mark().line + 1); };
  if (depth > 64) {
    const auto second_dot = prefix.find('.', prefix.find('.') + 1);  // the first two keys say where
    throw usage_error(line(node), prefix.substr(0, second_dot) + ": nested more than 64 levels (or an alias that contains itself)",
                      "write the values out");
  }
  if (node.IsSequence())
    for (const auto& item : node) reject_duplicate_keys(item, file, prefix, depth + 1);
  if (!node.IsMap()) return;
  std::set<std::string> seen;
  for (const auto& kv : node) {
    if (!kv.first.IsScalar())
      throw usage_error(line(kv.first), (prefix.empty() ? std::string("config") : prefix) + ": a key must be a plain name",
                        "write the key as text");
    const std::string key = kv.first.Scalar();
    const std::string path = prefix.empty() ? key : prefix + "." + key;
    if (!seen.insert(key).second)
      throw usage_error(line(kv.first), path + ": duplicate key", "remove one of the two entries");
    reject_duplicate_keys(kv.second, file, path, depth + 1);
  }
}

// Parses one YAML document from `text` (named `name` in errors): a NUL byte (a binary file), a second document
// after `---` (which every tool would silently ignore) and syntax errors are usage errors with the line.
YAML::Node parse_yaml(const std::string& text, const std::string& name) {
  const auto nul = text.find('\0');
  if (nul != std::string::npos)
    throw usage_error(name + ":" + std::to_string(1 + std::count(text.begin(), text.begin() + nul, '\n')),
                      "contains a NUL byte: not a text file", "give a YAML config file");
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(text);
  } catch (const YAML::ParserException& e) {
    throw usage_error(name + ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1),
                      "YAML syntax error: " + e.msg, "fix the YAML syntax at that line");
  }
  if (docs.size() > 1)
    throw usage_error(name + ":" + std::to_string(docs[1].Mark().line + 1),
                      "a second YAML document (after ---); a config is one document", "merge them or use base:");
  YAML::Node node = docs.empty() ? YAML::Node() : docs.front();
  reject_duplicate_keys(node, name, "");
  return node;
}

YAML::Node load_yaml_file(const std::string& path) { return parse_yaml(env::read_file(path), path); }

// Resolves a `base:` path: first relative to the including file's directory, then to the current directory.
std::string resolve_base(const std::string& base, const std::string& including_file) {
  fs::path p(base);
  if (p.is_absolute()) return p.string();
  fs::path beside = fs::path(including_file).parent_path() / p;
  if (fs::exists(beside)) return beside.lexically_normal().string();
  return p.lexically_normal().string();
}

}  // namespace

Document Document::load(const std::string& path) {
  if (!fs::exists(path)) throw usage_error(path, "config file not found", "check the --config path");
  if (fs::is_directory(path)) throw usage_error(path, "is a directory, not a config file", "give the YAML file's path");
  Document doc;
  doc.name_ = path;
  std::vector<std::string> chain;
  doc.merge_file(path, chain);
  return doc;
}

Document Document::parse(const std::string& text, const std::string& name) {
  Document doc;
  doc.name_ = name;
  YAML::Node node = parse_yaml(text, name);
  if (!node.IsNull() && !node.IsMap()) throw usage_error(name, "a config must be a mapping of sections");
  if (node.IsMap()) doc.merge_node(doc.root_, node, "", name);
  return doc;
}

void Document::merge_file(const std::string& path, std::vector<std::string>& chain) {
  const std::string canonical = fs::weakly_canonical(path).string();
  if (std::find(chain.begin(), chain.end(), canonical) != chain.end())
    throw usage_error(path, "`base:` chain loops back to this file", "remove the cycle between config files");
  chain.push_back(canonical);

  YAML::Node node = load_yaml_file(path);
  if (node.IsNull()) return;  // an empty file contributes nothing
  if (!node.IsMap()) throw usage_error(path + ":1", "a config file must be a mapping of sections");

  if (const YAML::Node base = node["base"]) {
    const std::string where = path + ":" + std::to_string(base.Mark().line + 1);
    if (!base.IsScalar()) throw usage_error(where, "base: expected a file path");
    const std::string base_path = resolve_base(base.as<std::string>(), path);
    if (!fs::exists(base_path))
      throw usage_error(where, "base: file '" + base.as<std::string>() + "' not found",
                        "paths are relative to the including file's directory or the current directory");
    merge_file(base_path, chain);
  }
  // Origins need the marks of the original nodes, so merge key by key from `node`, skipping `base`.
  for (const auto& kv : node) {
    if (kv.first.as<std::string>() == "base") continue;
    YAML::Node single(YAML::NodeType::Map);
    single[kv.first] = kv.second;
    merge_node(root_, single, "", path);
  }
}

void Document::record(const std::string& key_path, const Origin& origin) { origins_[key_path] = origin; }

void Document::merge_node(YAML::Node& dst, const YAML::Node& src, const std::string& prefix,
                          const std::string& file) {
  for (const auto& kv : src) {
    const std::string key = kv.first.as<std::string>();
    const std::string key_path = prefix.empty() ? key : prefix + "." + key;
    const Origin origin{file, kv.first.Mark().line >= 0 ? kv.first.Mark().line + 1 : 0};
    YAML::Node existing = dst[key];
    if (kv.second.IsMap() && existing && existing.IsMap()) {
      record(key_path, origin);
      merge_node(existing, kv.second, key_path, file);
      continue;
    }
    // Replace: drop origins of the old subtree, then record the new one.
    for (auto it = origins_.lower_bound(key_path + "."); it != origins_.end() && it->first.rfind(key_path + ".", 0) == 0;)
      it = origins_.erase(it);
    dst[key] = YAML::Clone(kv.second);
    record(key_path, origin);
    if (kv.second.IsMap()) {
      // Record the nested origins: merging into a scratch map walks the subtree and records each key.
      YAML::Node scratch(YAML::NodeType::Map);
      merge_node(scratch, kv.second, key_path, file);
    }
  }
}

std::pair<std::string, std::string> split_assignment(const std::string& assignment) {
  const auto eq = assignment.find('=');
  const std::string hint = "write --set KEY=VALUE, for example --set train.lr=3e-4";
  if (eq == std::string::npos) throw usage_error("--set " + assignment, "missing '='", hint);
  std::string key = assignment.substr(0, eq), value = assignment.substr(eq + 1);
  if (key.empty() || key.front() == '.' || key.back() == '.' || key.find("..") != std::string::npos ||
      key.find_first_of(" \t") != std::string::npos)
    throw usage_error("--set " + assignment, "bad key '" + key + "'", hint);
  return {key, value};
}

void Document::apply_set(const std::string& assignment) {
  auto [key_path, text] = split_assignment(assignment);
  const Origin origin{"--set " + assignment, 0};
  YAML::Node value;
  try {
    value = YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    throw usage_error(origin.file, "value is not valid YAML: " + e.msg);
  }
  std::vector<std::string> parts;
  std::stringstream ss(key_path);
  for (std::string part; std::getline(ss, part, '.');) parts.push_back(part);

  // yaml-cpp nodes are handles, so walking with a Node and assigning through it edits root_ in place.
  YAML::Node cursor = root_;
  std::string walked;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    walked = walked.empty() ? parts[i] : walked + "." + parts[i];
    YAML::Node next = cursor[parts[i]];
    if (!next || next.IsNull()) {
      cursor[parts[i]] = YAML::Node(YAML::NodeType::Map);
      next = cursor[parts[i]];
      record(walked, origin);
    } else if (!next.IsMap()) {
      throw usage_error(origin.file, "'" + walked + "' is a value, not a section", "check the key path");
    }
    cursor.reset(next);
  }
  for (auto it = origins_.lower_bound(key_path + "."); it != origins_.end() && it->first.rfind(key_path + ".", 0) == 0;)
    it = origins_.erase(it);
  cursor[parts.back()] = value;
  record(key_path, origin);
}

Origin Document::origin(const std::string& key_path) const {
  std::string p = key_path;
  while (true) {
    auto it = origins_.find(p);
    if (it != origins_.end()) return it->second;
    auto dot = p.rfind('.');
    if (dot == std::string::npos) return {name_, 0};
    p = p.substr(0, dot);
  }
}

std::string Document::dump() const {
  YAML::Emitter out;
  out << root_;
  return std::string(out.c_str()) + "\n";
}

std::string Document::save_resolved(const std::string& output_dir) const {
  std::error_code ec;
  fs::create_directories(output_dir, ec);
  if (ec) throw runtime_error(output_dir, "cannot create output directory: " + ec.message(), "check run.output_dir");
  const std::string path = (fs::path(output_dir) / "config.resolved.yaml").string();
  const std::string text = dump();
  spdlog::info("config {} resolved into {} (run.log_level: debug prints it here)", name_, path);
  spdlog::debug("resolved config ({}):\n{}", name_, text);
  env::write_file_atomic(path, "# resolved from " + name_ + "\n" + text);
  return path;
}

// ---------------------------------------------------------------------------------------------------------------
// Errors and checks
// ---------------------------------------------------------------------------------------------------------------

void ErrorList::add(const Origin& origin, const std::string& key_path, const std::string& message) {
  std::string line = where_of(origin);
  if (!key_path.empty()) line += (line.empty() ? "" : ": ") + key_path;
  lines_.push_back(line + ": " + message);
}

void ErrorList::throw_if_any() const {
  if (lines_.empty()) return;
  std::string msg = lines_.front();
  for (size_t i = 1; i < lines_.size(); ++i) msg += "\n" + lines_[i];
  throw Error(ErrorKind::Usage, "", msg);
}

namespace {
std::string fmt_num(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}
}  // namespace

Check<double> greater_than(double lo) {
  return [lo](const double& v) { return v > lo ? "" : "must be > " + fmt_num(lo) + ", got " + fmt_num(v); };
}
Check<double> at_least_f(double lo) {
  return [lo](const double& v) { return v >= lo ? "" : "must be >= " + fmt_num(lo) + ", got " + fmt_num(v); };
}
Check<double> in_range(double lo, double hi) {
  return [lo, hi](const double& v) {
    return (v >= lo && v <= hi) ? "" : "must be in [" + fmt_num(lo) + ", " + fmt_num(hi) + "], got " + fmt_num(v);
  };
}
Check<long long> at_least(long long lo) {
  return [lo](const long long& v) {
    return v >= lo ? "" : "must be >= " + std::to_string(lo) + ", got " + std::to_string(v);
  };
}
Check<long long> in_range_i(long long lo, long long hi) {
  return [lo, hi](const long long& v) {
    return (v >= lo && v <= hi)
               ? ""
               : "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(v);
  };
}

std::string closest_match(const std::string& word, const std::vector<std::string>& candidates) {
  auto distance = [](const std::string& a, const std::string& b) {
    std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
      cur[0] = i;
      for (size_t j = 1; j <= b.size(); ++j)
        cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      std::swap(prev, cur);
    }
    return prev[b.size()];
  };
  const auto lower = [](std::string s) {
    for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    return s;
  };
  std::string best;
  size_t best_d = std::max<size_t>(2, word.size() / 3) + 1;
  for (const auto& c : candidates) {
    size_t d = distance(lower(word), lower(c));  // ZERO3 means zero3
    if (d < best_d) best_d = d, best = c;
  }
  return best;
}

// ---------------------------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------------------------

Reader::Reader(const Document& doc, YAML::Node node, std::string path, ErrorList& errors)
    : doc_(&doc), node_(std::move(node)), path_(std::move(path)), errors_(&errors) {}

bool Reader::has(const std::string& key) const {
  if (!node_ || !node_.IsMap()) return false;
  const YAML::Node& n = node_;
  return static_cast<bool>(n[key]);
}

void Reader::error(const std::string& key, const std::string& message) {
  const std::string kp = key.empty() ? path_ : key_path(key);
  errors_->add(doc_->origin(kp), kp, message);
}

bool Reader::fetch(const std::string& key, YAML::Node& out, bool required) {
  known_.push_back(key);
  if (has(key)) {
    const YAML::Node& n = node_;
    out.reset(n[key]);
    return true;
  }
  if (required) error(key, "missing required key");
  return false;
}

namespace {
const char* node_kind(const YAML::Node& n) {
  if (n.IsMap()) return "a mapping";
  if (n.IsSequence()) return "a list";
  if (n.IsNull()) return "nothing";
  return "a value";
}
}  // namespace

template <class T>
bool Reader::scalar(const std::string& key, const YAML::Node& node, T& out, const char* type_name) {
  if (!node.IsScalar()) {
    error(key, std::string("expected ") + type_name + ", got " + node_kind(node));
    return false;
  }
  // A quoted scalar is a string in YAML and in JSON: "512" is not a number, "false" not a boolean.
  if constexpr (!std::is_same_v<T, std::string>) {
    if (node.Tag() == "!") {
      error(key, std::string("expected ") + type_name + ", got the string \"" + node.Scalar() + "\"");
      return false;
    }
  }
  try {
    out = node.as<T>();
    return true;
  } catch (const YAML::Exception&) {
    error(key, std::string("expected ") + type_name + ", got '" + node.Scalar() + "'");
    return false;
  }
}

void Reader::optional(const std::string& key, std::string& out) {
  YAML::Node n;
  if (fetch(key, n, false)) scalar(key, n, out, "a string");
}
void Reader::optional(const std::string& key, bool& out) {
  YAML::Node n;
  if (fetch(key, n, false)) scalar(key, n, out, "true or false");
}

namespace {
template <class T>
void run_check(Reader& r, const std::string& key, const T& v, const Check<T>& check) {
  if (!check) return;
  std::string problem = check(v);
  if (!problem.empty()) r.error(key, problem);
}
}  // namespace

void Reader::optional(const std::string& key, long long& out, const Check<long long>& check) {
  YAML::Node n;
  long long v = out;
  if (fetch(key, n, false) && scalar(key, n, v, "an integer")) {
    out = v;
    run_check(*this, key, v, check);
  }
}
void Reader::optional(const std::string& key, int& out, const Check<long long>& check) {
  long long v = out;
  optional(key, v, check);
  out = static_cast<int>(v);
}
void Reader::optional(const std::string& key, long& out, const Check<long long>& check) {
  long long v = out;
  optional(key, v, check);
  out = static_cast<long>(v);
}
void Reader::optional(const std::string& key, double& out, const Check<double>& check) {
  YAML::Node n;
  double v = out;
  if (fetch(key, n, false) && scalar(key, n, v, "a number")) {
    // .inf and .nan are YAML numbers, but no setting means anything with them (and .inf passes "> 0" checks).
    if (!std::isfinite(v)) return error(key, "must be a finite number, got " + n.Scalar());
    out = v;
    run_check(*this, key, v, check);
  }
}
void Reader::optional(const std::string& key, std::vector<std::string>& out) {
  YAML::Node n;
  if (!fetch(key, n, false)) return;
  if (n.IsScalar()) {  // a single string stands for a one-element list
    out = {n.Scalar()};
    return;
  }
  if (!n.IsSequence()) return error(key, std::string("expected a list of strings, got ") + node_kind(n));
  std::vector<std::string> v;
  for (const auto& item : n) {
    if (!item.IsScalar()) return error(key, "expected a list of strings, found an element that is not a string");
    v.push_back(item.Scalar());
  }
  out = std::move(v);
}
void Reader::optional(const std::string& key, std::vector<double>& out, size_t expected_size) {
  YAML::Node n;
  if (!fetch(key, n, false)) return;
  if (!n.IsSequence()) return error(key, std::string("expected a list of numbers, got ") + node_kind(n));
  std::vector<double> v;
  for (const auto& item : n) {
    try {
      v.push_back(item.as<double>());
    } catch (const YAML::Exception&) {
      return error(key, "expected a list of numbers, found '" + (item.IsScalar() ? item.Scalar() : "?") + "'");
    }
  }
  if (expected_size && v.size() != expected_size)
    return error(key, "expected " + std::to_string(expected_size) + " numbers, got " + std::to_string(v.size()));
  out = std::move(v);
}
void Reader::required(const std::string& key, std::string& out) {
  YAML::Node n;
  if (fetch(key, n, true)) scalar(key, n, out, "a string");
}
namespace {
// `required` = "report if absent" + the matching `optional`.
template <class T, class C>
void required_value(Reader& r, const std::string& key, T& out, const C& check) {
  if (!r.has(key)) {
    r.accept(key);
    return r.error(key, "missing required key");
  }
  r.optional(key, out, check);
}
}  // namespace

void Reader::required(const std::string& key, long long& out, const Check<long long>& check) {
  required_value(*this, key, out, check);
}
void Reader::required(const std::string& key, int& out, const Check<long long>& check) {
  required_value(*this, key, out, check);
}
void Reader::required(const std::string& key, long& out, const Check<long long>& check) {
  required_value(*this, key, out, check);
}
void Reader::required(const std::string& key, double& out, const Check<double>& check) {
  required_value(*this, key, out, check);
}

void Reader::choice(const std::string& key, std::string& out, const std::vector<std::string>& choices) {
  YAML::Node n;
  std::string v;
  if (!fetch(key, n, false) || !scalar(key, n, v, "a string")) return;
  if (std::find(choices.begin(), choices.end(), v) == choices.end()) {
    std::string list;
    for (const auto& c : choices) list += (list.empty() ? "" : " | ") + c;
    std::string guess = closest_match(v, choices);
    error(key, "'" + v + "' is not one of " + list + (guess.empty() ? "" : " (did you mean '" + guess + "'?)"));
    return;
  }
  out = v;
}

Reader Reader::child(const std::string& key) {
  YAML::Node n;
  if (fetch(key, n, false) && !n.IsMap() && !n.IsNull()) {
    error(key, std::string("expected a section (mapping), got ") + node_kind(n));
    n = YAML::Node(YAML::NodeType::Map);
  }
  return Reader(*doc_, n, key_path(key), *errors_);
}

void Reader::accept(const std::string& key) { known_.push_back(key); }

YAML::Node Reader::raw(const std::string& key) {
  YAML::Node n;
  fetch(key, n, false);
  return n;
}

std::vector<std::string> Reader::unread() const {
  std::vector<std::string> out;
  if (!node_ || !node_.IsMap()) return out;
  for (const auto& kv : node_) {
    const std::string key = kv.first.as<std::string>();
    if (std::find(known_.begin(), known_.end(), key) == known_.end()) out.push_back(key);
  }
  return out;
}

void Reader::finish(bool strict) {
  if (!strict || !node_ || !node_.IsMap()) return;
  for (const auto& kv : node_) {
    const std::string key = kv.first.as<std::string>();
    if (std::find(known_.begin(), known_.end(), key) != known_.end()) continue;
    // Names other trainers use (transformers' TrainingArguments, torchtitan) for keys spelled differently here.
    static const std::pair<const char*, const char*> aliases[] = {
        {"learning_rate", "lr"},          {"warmup", "warmup_steps"},
        {"warmup_iters", "warmup_steps"}, {"batch_size", "micro_batch_size"},
        {"per_device_train_batch_size", "micro_batch_size"},
        {"gradient_accumulation_steps", "grad_accum_steps"},
        {"max_grad_norm", "grad_clip"},   {"steps", "max_steps"},
        {"num_steps", "max_steps"},       {"training_steps", "max_steps"},
        {"save_steps", "every"},          {"save_total_limit", "keep_last"},
        {"logging_steps", "log_every"},   {"seed_value", "seed"},
        {"sequence_length", "seq_len"},   {"max_seq_len", "seq_len"},
        {"block_size", "seq_len"}};
    std::string guess;
    for (const auto& [alias, name] : aliases)
      if (key == alias && std::find(known_.begin(), known_.end(), name) != known_.end()) guess = name;
    if (guess.empty()) guess = closest_match(key, known_);
    error(key, "unknown key" + (guess.empty() ? std::string() : " (did you mean '" + guess + "'?)"));
  }
}

}  // namespace dsopen::config
