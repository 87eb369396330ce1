#include "utils/json.h"

#include <unordered_set>
#include <vector>

#include "utils/errors.h"

namespace dsopen::json {

namespace {

struct DuplicateKey {
  std::string path;
};

// Tracks the keys of every open object; the parser callback sees keys and object boundaries in document order.
template <class Json>
class DuplicateGuard {
public:
  bool operator()(int /*depth*/, nlohmann::detail::parse_event_t event, Json& parsed) {
    using E = nlohmann::detail::parse_event_t;
    if (event == E::object_start) {
      open_.emplace_back();
    } else if (event == E::object_end) {
      if (!open_.empty()) open_.pop_back();
    } else if (event == E::key) {
      Object& o = open_.back();
      o.last = parsed.template get<std::string>();
      if (!o.keys.insert(o.last).second) throw DuplicateKey{path()};
    }
    return true;
  }

private:
  struct Object {
    std::unordered_set<std::string> keys;
    std::string last;
  };
  std::string path() const {
    std::string p;
    for (const auto& o : open_) p += (p.empty() ? "" : ".") + o.last;
    return p;
  }
  std::vector<Object> open_;
};

template <class Json>
Json parse_strict(std::string_view text, const std::string& where) {
  // nlohmann stops reading at a NUL byte as if the input ended there; raw NUL is never valid JSON.
  if (const auto nul = text.find('\0'); nul != std::string_view::npos)
    throw runtime_error(where, "not valid JSON: a NUL byte at offset " + std::to_string(nul));
  try {
    return Json::parse(text.begin(), text.end(), DuplicateGuard<Json>());
  } catch (const DuplicateKey& d) {
    throw runtime_error(where, "duplicate key '" + d.path + "' (readers disagree on which of the two counts)",
                        "remove one of the entries");
  }
}

}  // namespace

nlohmann::json parse(std::string_view text, const std::string& where) { return parse_strict<nlohmann::json>(text, where); }

nlohmann::ordered_json parse_ordered(std::string_view text, const std::string& where) {
  return parse_strict<nlohmann::ordered_json>(text, where);
}

std::string reason(const std::exception& e) {
  const std::string what = e.what();
  if (what.rfind("[json.exception.", 0) != 0) return what;
  const auto p = what.find("] ");
  return p == std::string::npos ? what : what.substr(p + 2);
}

}  // namespace dsopen::json
