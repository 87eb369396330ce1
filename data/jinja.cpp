#include "data/jinja.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <functional>
#include <map>

#include "utils/errors.h"

namespace dsopen::data::jinja {

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Values: JSON plus `undefined` (a discarded json), with Python's truth, printing and comparisons.
// ---------------------------------------------------------------------------------------------------------------

Value undefined() { return Value(Value::value_t::discarded); }
bool is_undefined(const Value& v) { return v.is_discarded(); }

bool truthy(const Value& v) {
  if (v.is_discarded() || v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number_integer()) return v.get<int64_t>() != 0;
  if (v.is_number_float()) return v.get<double>() != 0.0;
  if (v.is_string()) return !v.get_ref<const std::string&>().empty();
  return !v.empty();  // arrays, objects
}

// Python's repr of a float: the shortest digits that round-trip, with ".0" for integral values.
std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, d);
  std::string s(buf, end);
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

std::string repr(const Value& v);

// How `{{ v }}` prints: Python's str().
std::string str(const Value& v) {
  if (v.is_discarded()) return "";
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return "None";
  if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_number_unsigned()) return std::to_string(v.get<uint64_t>());
  if (v.is_number_float()) return float_repr(v.get<double>());
  return repr(v);
}

std::string quote_py(const std::string& s) {
  const char q = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    if (c == q || c == '\\') out += '\\', out += c;
    else if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c == '\r') out += "\\r";
    else out += c;
  }
  return out + q;
}

// Python's repr() of lists and dicts (how a template that prints one sees it).
std::string repr(const Value& v) {
  if (v.is_string()) return quote_py(v.get<std::string>());
  if (v.is_array()) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + repr(v[i]);
    return out + "]";
  }
  if (v.is_object()) {
    std::string out = "{";
    bool first = true;
    for (const auto& [k, x] : v.items()) out += (first ? "" : ", ") + quote_py(k) + ": " + repr(x), first = false;
    return out + "}";
  }
  return str(v);
}

// json.dumps(v, ensure_ascii=False, indent=indent) exactly as Python writes it (transformers' tojson).
void dumps(const Value& v, int indent, int depth, std::string& out) {
  auto newline = [&](int d) {
    out += '\n';
    out.append(static_cast<size_t>(indent * d), ' ');
  };
  if (v.is_string()) {
    out += '"';
    for (unsigned char c : v.get_ref<const std::string&>()) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
          } else {
            out += static_cast<char>(c);
          }
      }
    }
    out += '"';
  } else if (v.is_array() || v.is_object()) {
    const bool arr = v.is_array();
    if (v.empty()) {
      out += arr ? "[]" : "{}";
      return;
    }
    out += arr ? '[' : '{';
    bool first = true;
    for (const auto& [k, x] : v.items()) {
      if (!first) out += indent >= 0 ? "," : ", ";
      first = false;
      if (indent >= 0) newline(depth + 1);
      if (!arr) dumps(Value(k), indent, depth + 1, out), out += ": ";
      dumps(x, indent, depth + 1, out);
    }
    if (indent >= 0) newline(depth);
    out += arr ? ']' : '}';
  } else if (v.is_null() || v.is_discarded()) {
    out += "null";
  } else if (v.is_boolean()) {
    out += v.get<bool>() ? "true" : "false";
  } else if (v.is_number_float()) {
    const double d = v.get<double>();
    out += std::isnan(d) ? "NaN" : std::isinf(d) ? (d > 0 ? "Infinity" : "-Infinity") : float_repr(d);
  } else {
    out += str(v);
  }
}

bool is_number(const Value& v) { return v.is_number() && !v.is_boolean(); }
double num(const Value& v) { return v.is_boolean() ? (v.get<bool>() ? 1.0 : 0.0) : v.get<double>(); }

bool equal(const Value& a, const Value& b) {
  if (a.is_discarded() || b.is_discarded()) return a.is_discarded() && b.is_discarded();
  if (is_number(a) && is_number(b)) return num(a) == num(b);
  return a == b;
}

// ---------------------------------------------------------------------------------------------------------------
// Errors with the template line.
// ---------------------------------------------------------------------------------------------------------------

struct TemplateError : std::runtime_error {
  TemplateError(int l, const std::string& what) : std::runtime_error(what), line(l) {}
  int line;
};

// raise_exception(message) in a template: the message reaches the user as written.
struct RaisedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------------------------
// Expression tokens.
// ---------------------------------------------------------------------------------------------------------------

enum class Tok { Name, String, Int, Float, Op, End };
struct Token {
  Tok kind;
  std::string text;
};

std::vector<Token> lex(const std::string& s, int line) {
  std::vector<Token> out;
  size_t i = 0;
  while (i < s.size()) {
    const char c = s[i];
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++i;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      out.push_back({Tok::Name, s.substr(i, j - i)});
      i = j;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      bool is_float = false;
      while (j < s.size() && (std::isdigit(static_cast<unsigned char>(s[j])) || s[j] == '_' ||
                              (s[j] == '.' && j + 1 < s.size() && std::isdigit(static_cast<unsigned char>(s[j + 1])))))
        is_float = is_float || s[j] == '.', ++j;
      std::string digits = s.substr(i, j - i);
      digits.erase(std::remove(digits.begin(), digits.end(), '_'), digits.end());
      out.push_back({is_float ? Tok::Float : Tok::Int, digits});
      i = j;
    } else if (c == '\'' || c == '"') {
      std::string text;
      size_t j = i + 1;
      for (; j < s.size() && s[j] != c; ++j) {
        if (s[j] != '\\' || j + 1 >= s.size()) {
          text += s[j];
          continue;
        }
        const char e = s[++j];
        switch (e) {
          case 'n': text += '\n'; break;
          case 't': text += '\t'; break;
          case 'r': text += '\r'; break;
          case '\\': text += '\\'; break;
          case '\'': text += '\''; break;
          case '"': text += '"'; break;
          case '\n': break;
          default: text += '\\', text += e;
        }
      }
      if (j >= s.size()) throw TemplateError(line, "unterminated string");
      out.push_back({Tok::String, text});
      i = j + 1;
    } else {
      static const char* two[] = {"==", "!=", "<=", ">=", "//", "**"};
      std::string op(1, c);
      for (const char* t : two)
        if (s.compare(i, 2, t) == 0) op = t;
      if (op.size() == 1 && std::string("+-*/%~<>()[]{}.,:|=").find(c) == std::string::npos)
        throw TemplateError(line, std::string("unexpected character '") + c + "'");
      out.push_back({Tok::Op, op});
      i += op.size();
    }
  }
  out.push_back({Tok::End, ""});
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Expressions.
// ---------------------------------------------------------------------------------------------------------------

class Context;

struct Expr {
  explicit Expr(int l) : line(l) {}
  virtual ~Expr() = default;
  virtual Value eval(Context& ctx) const = 0;
  int line;
};
using ExprPtr = std::unique_ptr<Expr>;

struct Args {
  std::vector<ExprPtr> positional;
  std::vector<std::pair<std::string, ExprPtr>> named;
};

// The values of a call's arguments.
struct CallArgs {
  std::vector<Value> positional;
  std::map<std::string, Value> named;
  int line = 0;

  const Value* get(size_t i, const std::string& name) const {
    if (i < positional.size()) return &positional[i];
    const auto it = named.find(name);
    return it == named.end() ? nullptr : &it->second;
  }
  Value value(size_t i, const std::string& name, const Value& fallback) const {
    const Value* v = get(i, name);
    return v ? *v : fallback;
  }
  std::string string(size_t i, const std::string& name, const std::string& what) const {
    const Value* v = get(i, name);
    if (!v || !v->is_string()) throw TemplateError(line, what + ": argument '" + name + "' must be a string");
    return v->get<std::string>();
  }
};

struct Macro;

// What one rendering may use. A chat template is data from a model directory (or a request's model), so a recursive
// macro, a loop of 10^8 iterations or a string doubled 40 times must end in an error naming the line, not in a stack
// overflow, minutes of CPU or gigabytes of memory. Real templates stay far below: a few macro levels (tool schemas),
// thousands of steps per message.
constexpr int kMaxCallDepth = 100;
constexpr int kMaxParseDepth = 200;
constexpr int64_t kMaxSteps = 20'000'000;
constexpr size_t kMaxText = size_t(64) << 20;  // bytes of one string value or of the output
constexpr int64_t kMaxItems = 1'000'000;       // range() length, list size from `+`

void check_text(size_t bytes, int line) {
  if (bytes > kMaxText)
    throw TemplateError(line, "text of " + std::to_string(bytes) + " bytes: more than the 64 MiB a chat template may make");
}

class Context {
public:
  explicit Context(const Value& globals) { scopes_.push_back({}), globals_ = &globals; }

  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      const auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    if (globals_->is_object() && globals_->contains(name)) return (*globals_)[name];
    return undefined();
  }
  Value* find(const std::string& name) {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      const auto f = it->find(name);
      if (f != it->end()) return &f->second;
    }
    return nullptr;
  }
  void set(const std::string& name, Value v) { scopes_.back()[name] = std::move(v); }
  void push() { scopes_.emplace_back(); }
  void pop() { scopes_.pop_back(); }

  std::map<std::string, const Macro*> macros;
  std::string* out = nullptr;
  int call_depth = 0;   // macro calls now running
  int64_t steps = 0;    // nodes rendered and loop iterations so far

private:
  std::vector<std::map<std::string, Value>> scopes_;
  const Value* globals_;
};

struct Literal : Expr {
  Literal(int l, Value v) : Expr(l), value(std::move(v)) {}
  Value eval(Context&) const override { return value; }
  Value value;
};

struct ListExpr : Expr {
  using Expr::Expr;
  Value eval(Context& ctx) const override {
    Value out = Value::array();
    for (const auto& e : items) out.push_back(e->eval(ctx));
    return out;
  }
  std::vector<ExprPtr> items;
};

struct DictExpr : Expr {
  using Expr::Expr;
  Value eval(Context& ctx) const override {
    Value out = Value::object();
    for (const auto& [k, v] : items) {
      const Value key = k->eval(ctx);
      out[key.is_string() ? key.get<std::string>() : str(key)] = v->eval(ctx);
    }
    return out;
  }
  std::vector<std::pair<ExprPtr, ExprPtr>> items;
};

struct Var : Expr {
  Var(int l, std::string n) : Expr(l), name(std::move(n)) {}
  Value eval(Context& ctx) const override { return ctx.lookup(name); }
  std::string name;
};

Value item_of(const Value& obj, const Value& key) {
  if (obj.is_object()) {
    if (key.is_string() && obj.contains(key.get<std::string>())) return obj[key.get<std::string>()];
    return undefined();
  }
  if ((obj.is_array() || obj.is_string()) && key.is_number_integer()) {
    const int64_t n = obj.is_array() ? static_cast<int64_t>(obj.size()) : static_cast<int64_t>(obj.get_ref<const std::string&>().size());
    int64_t i = key.get<int64_t>();
    if (i < 0) i += n;
    if (i < 0 || i >= n) return undefined();
    return obj.is_array() ? obj[static_cast<size_t>(i)] : Value(obj.get_ref<const std::string&>().substr(static_cast<size_t>(i), 1));
  }
  return undefined();
}

struct GetAttr : Expr {
  GetAttr(int l, ExprPtr o, std::string n) : Expr(l), obj(std::move(o)), name(std::move(n)) {}
  Value eval(Context& ctx) const override { return item_of(obj->eval(ctx), Value(name)); }
  ExprPtr obj;
  std::string name;
};

struct GetItem : Expr {
  GetItem(int l, ExprPtr o, ExprPtr k) : Expr(l), obj(std::move(o)), key(std::move(k)) {}
  Value eval(Context& ctx) const override { return item_of(obj->eval(ctx), key->eval(ctx)); }
  ExprPtr obj, key;
};

struct SliceExpr : Expr {
  using Expr::Expr;
  Value eval(Context& ctx) const override {
    const Value v = obj->eval(ctx);
    const bool is_str = v.is_string();
    if (!v.is_array() && !is_str) throw TemplateError(line, "only lists and strings can be sliced");
    const int64_t n = is_str ? static_cast<int64_t>(v.get_ref<const std::string&>().size()) : static_cast<int64_t>(v.size());
    auto bound = [&](const ExprPtr& e, int64_t fallback) -> std::optional<int64_t> {
      if (!e) return fallback;
      const Value b = e->eval(ctx);
      if (b.is_null() || b.is_discarded()) return fallback;
      if (!b.is_number_integer()) throw TemplateError(line, "slice bounds must be integers");
      return b.get<int64_t>();
    };
    const int64_t step = *bound(step_e, 1);
    if (step == 0) throw TemplateError(line, "slice step cannot be zero");
    auto clamp = [&](int64_t i, bool upper) {
      if (i < 0) i += n;
      return step > 0 ? std::clamp<int64_t>(i, 0, n) : std::clamp<int64_t>(i, -1, upper ? n - 1 : n - 1);
    };
    int64_t start = start_e ? clamp(*bound(start_e, 0), false) : (step > 0 ? 0 : n - 1);
    int64_t stop = stop_e ? clamp(*bound(stop_e, 0), true) : (step > 0 ? n : -1);
    Value out = is_str ? Value("") : Value::array();
    std::string s;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
      if (is_str) s += v.get_ref<const std::string&>()[static_cast<size_t>(i)];
      else out.push_back(v[static_cast<size_t>(i)]);
    }
    return is_str ? Value(s) : out;
  }
  ExprPtr obj, start_e, stop_e, step_e;
};

struct Unary : Expr {
  Unary(int l, std::string o, ExprPtr e) : Expr(l), op(std::move(o)), operand(std::move(e)) {}
  Value eval(Context& ctx) const override {
    const Value v = operand->eval(ctx);
    if (op == "not") return !truthy(v);
    if (!is_number(v)) throw TemplateError(line, "unary " + op + " needs a number");
    if (op == "-") return v.is_number_integer() ? Value(-v.get<int64_t>()) : Value(-v.get<double>());
    return v;
  }
  std::string op;
  ExprPtr operand;
};

bool contains(const Value& hay, const Value& needle, int line) {
  if (hay.is_string()) {
    if (!needle.is_string()) throw TemplateError(line, "'in <string>' needs a string on the left");
    return hay.get_ref<const std::string&>().find(needle.get_ref<const std::string&>()) != std::string::npos;
  }
  if (hay.is_array()) return std::any_of(hay.begin(), hay.end(), [&](const Value& x) { return equal(x, needle); });
  if (hay.is_object()) return needle.is_string() && hay.contains(needle.get<std::string>());
  if (hay.is_discarded()) throw TemplateError(line, "'in' on an undefined value");
  return false;
}

struct Binary : Expr {
  Binary(int l, std::string o, ExprPtr a, ExprPtr b) : Expr(l), op(std::move(o)), lhs(std::move(a)), rhs(std::move(b)) {}
  Value eval(Context& ctx) const override {
    if (op == "and") {
      Value a = lhs->eval(ctx);
      return truthy(a) ? rhs->eval(ctx) : a;
    }
    if (op == "or") {
      Value a = lhs->eval(ctx);
      return truthy(a) ? a : rhs->eval(ctx);
    }
    const Value a = lhs->eval(ctx), b = rhs->eval(ctx);
    if (op == "==") return equal(a, b);
    if (op == "!=") return !equal(a, b);
    if (op == "in") return contains(b, a, line);
    if (op == "not in") return !contains(b, a, line);
    if (op == "~") {
      std::string out = str(a);
      const std::string right = str(b);
      check_text(out.size() + right.size(), line);
      return out + right;
    }
    if (op == "+" && a.is_string() && b.is_string()) {
      check_text(a.get_ref<const std::string&>().size() + b.get_ref<const std::string&>().size(), line);
      return a.get<std::string>() + b.get<std::string>();
    }
    if (op == "+" && a.is_array() && b.is_array()) {
      if (static_cast<int64_t>(a.size() + b.size()) > kMaxItems)
        throw TemplateError(line, "a list of more than 1,000,000 items");
      Value out = a;
      for (const auto& x : b) out.push_back(x);
      return out;
    }
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      int cmp = 0;
      if (is_number(a) && is_number(b)) cmp = num(a) < num(b) ? -1 : num(a) > num(b) ? 1 : 0;
      else if (a.is_string() && b.is_string()) cmp = a.get<std::string>().compare(b.get<std::string>());
      else throw TemplateError(line, "cannot compare " + repr(a) + " and " + repr(b));
      return op == "<" ? cmp < 0 : op == ">" ? cmp > 0 : op == "<=" ? cmp <= 0 : cmp >= 0;
    }
    if (op == "*" && ((a.is_string() && b.is_number_integer()) || (a.is_number_integer() && b.is_string()))) {
      const Value& text = a.is_string() ? a : b;
      const int64_t times = a.is_string() ? b.get<int64_t>() : a.get<int64_t>();
      if (times > 0) check_text(text.get_ref<const std::string&>().size() * static_cast<size_t>(std::min<int64_t>(times, int64_t(1) << 40)), line);
      std::string out;
      for (int64_t i = 0; i < times; ++i) out += text.get<std::string>();
      return out;
    }
    if (!is_number(a) || !is_number(b))
      throw TemplateError(line, "'" + op + "' needs numbers, got " + repr(a) + " and " + repr(b));
    const bool ints = a.is_number_integer() && b.is_number_integer();
    if (op == "+") return ints ? Value(a.get<int64_t>() + b.get<int64_t>()) : Value(num(a) + num(b));
    if (op == "-") return ints ? Value(a.get<int64_t>() - b.get<int64_t>()) : Value(num(a) - num(b));
    if (op == "*") return ints ? Value(a.get<int64_t>() * b.get<int64_t>()) : Value(num(a) * num(b));
    if (op == "/") {
      if (num(b) == 0) throw TemplateError(line, "division by zero");
      return num(a) / num(b);
    }
    if (op == "//" || op == "%") {
      if (num(b) == 0) throw TemplateError(line, "division by zero");
      if (ints) {  // Python floors
        const int64_t x = a.get<int64_t>(), y = b.get<int64_t>();
        int64_t q = x / y;
        if ((x % y != 0) && ((x < 0) != (y < 0))) --q;
        return op == "//" ? Value(q) : Value(x - q * y);
      }
      const double q = std::floor(num(a) / num(b));
      return op == "//" ? Value(q) : Value(num(a) - q * num(b));
    }
    if (op == "**") return ints && b.get<int64_t>() >= 0 ? Value(static_cast<int64_t>(std::llround(std::pow(num(a), num(b)))))
                                                         : Value(std::pow(num(a), num(b)));
    throw TemplateError(line, "unknown operator " + op);
  }
  std::string op;
  ExprPtr lhs, rhs;
};

struct CondExpr : Expr {
  using Expr::Expr;
  Value eval(Context& ctx) const override {
    if (truthy(cond->eval(ctx))) return then->eval(ctx);
    return otherwise ? otherwise->eval(ctx) : undefined();
  }
  ExprPtr then, cond, otherwise;
};

CallArgs eval_args(const Args& args, Context& ctx, int line) {
  CallArgs out;
  out.line = line;
  for (const auto& a : args.positional) out.positional.push_back(a->eval(ctx));
  for (const auto& [k, v] : args.named) out.named[k] = v->eval(ctx);
  return out;
}

// Python's str.strip family.
std::string strip(const std::string& s, const std::string& chars, bool left, bool right) {
  size_t b = 0, e = s.size();
  if (left) b = s.find_first_not_of(chars);
  if (b == std::string::npos) return "";
  if (right) e = s.find_last_not_of(chars) + 1;
  return s.substr(b, e - b);
}
const std::string kWhitespace = " \t\n\r\f\v";

std::vector<Value> iterate(const Value& v, int line) {
  std::vector<Value> out;
  if (v.is_array()) {
    for (const auto& x : v) out.push_back(x);
  } else if (v.is_object()) {
    for (const auto& [k, x] : v.items()) out.emplace_back(k);
  } else if (v.is_string()) {
    for (char c : v.get<std::string>()) out.emplace_back(std::string(1, c));
  } else if (!v.is_discarded() && !v.is_null()) {
    throw TemplateError(line, repr(v) + " is not iterable");
  }
  return out;
}

std::string title_case(const std::string& s, bool only_first) {
  std::string out = s;
  bool start = true;
  for (size_t i = 0; i < out.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(out[i]);
    if (only_first) out[i] = static_cast<char>(i == 0 ? std::toupper(c) : std::tolower(c));
    else out[i] = static_cast<char>(start ? std::toupper(c) : std::tolower(c));
    start = !std::isalnum(c);
  }
  return out;
}

Value split(const std::string& s, const Value* sep, int64_t maxsplit) {
  Value out = Value::array();
  if (!sep || sep->is_null()) {  // runs of whitespace, no empty parts
    size_t i = 0;
    while (true) {
      i = s.find_first_not_of(kWhitespace, i);
      if (i == std::string::npos) break;
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) {
        out.push_back(strip(s.substr(i), kWhitespace, false, true));
        break;
      }
      const size_t j = s.find_first_of(kWhitespace, i);
      out.push_back(s.substr(i, j == std::string::npos ? std::string::npos : j - i));
      if (j == std::string::npos) break;
      i = j;
    }
    return out;
  }
  const std::string d = sep->get<std::string>();
  size_t i = 0;
  while (true) {
    const size_t j = s.find(d, i);
    if (j == std::string::npos || (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit)) {
      out.push_back(s.substr(i));
      break;
    }
    out.push_back(s.substr(i, j - i));
    i = j + d.size();
  }
  return out;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to, int64_t count = -1) {
  if (from.empty()) return s;
  size_t i = 0;
  for (int64_t n = 0; (count < 0 || n < count) && (i = s.find(from, i)) != std::string::npos; ++n) {
    s.replace(i, from.size(), to);
    i += to.size();
  }
  return s;
}

// obj.method(args): the str and dict methods templates call.
Value call_method(const Value& obj, const std::string& name, const CallArgs& a, int line) {
  if (obj.is_string()) {
    const std::string& s = obj.get_ref<const std::string&>();
    const Value* chars = a.get(0, "chars");
    const std::string set = chars && chars->is_string() ? chars->get<std::string>() : kWhitespace;
    if (name == "strip") return strip(s, set, true, true);
    if (name == "lstrip") return strip(s, set, true, false);
    if (name == "rstrip") return strip(s, set, false, true);
    if (name == "upper" || name == "lower") {
      std::string out = s;
      for (auto& c : out) c = static_cast<char>(name == "upper" ? std::toupper(static_cast<unsigned char>(c))
                                                                 : std::tolower(static_cast<unsigned char>(c)));
      return out;
    }
    if (name == "title") return title_case(s, false);
    if (name == "capitalize") return title_case(s, true);
    if (name == "startswith" || name == "endswith") {
      const Value* p = a.get(0, "prefix");
      std::vector<std::string> options;
      if (p && p->is_string()) options.push_back(p->get<std::string>());
      else if (p && p->is_array())
        for (const auto& x : *p) options.push_back(x.get<std::string>());
      else throw TemplateError(line, name + " needs a string");
      for (const auto& o : options)
        if (s.size() >= o.size() && s.compare(name == "startswith" ? 0 : s.size() - o.size(), o.size(), o) == 0) return true;
      return false;
    }
    if (name == "split") {
      const Value* sep = a.get(0, "sep");
      return split(s, sep, a.value(1, "maxsplit", Value(-1)).get<int64_t>());
    }
    if (name == "replace")
      return replace_all(s, a.string(0, "old", "replace"), a.string(1, "new", "replace"),
                         a.value(2, "count", Value(-1)).get<int64_t>());
    if (name == "find") {
      const auto at = s.find(a.string(0, "sub", "find"));
      return at == std::string::npos ? int64_t{-1} : static_cast<int64_t>(at);
    }
    if (name == "count") {
      const std::string sub = a.string(0, "sub", "count");
      int64_t n = 0;
      for (size_t i = 0; !sub.empty() && (i = s.find(sub, i)) != std::string::npos; i += sub.size()) ++n;
      return n;
    }
    if (name == "join") {
      std::string out;
      bool first = true;
      for (const auto& x : iterate(a.value(0, "iterable", Value::array()), line)) out += (first ? "" : s) + str(x), first = false;
      return out;
    }
    if (name == "isdigit" || name == "isspace" || name == "isalpha") {
      if (s.empty()) return false;
      for (unsigned char c : s)
        if (!(name == "isdigit" ? std::isdigit(c) : name == "isspace" ? std::isspace(c) : std::isalpha(c))) return false;
      return true;
    }
  }
  if (obj.is_object()) {
    if (name == "get") {
      const Value key = a.value(0, "key", Value());
      if (key.is_string() && obj.contains(key.get<std::string>())) return obj[key.get<std::string>()];
      return a.value(1, "default", Value());
    }
    if (name == "items") {
      Value out = Value::array();
      for (const auto& [k, v] : obj.items()) out.push_back(Value::array({k, v}));
      return out;
    }
    if (name == "keys" || name == "values") {
      Value out = Value::array();
      for (const auto& [k, v] : obj.items()) out.push_back(name == "keys" ? Value(k) : v);
      return out;
    }
  }
  throw TemplateError(line, "unknown method '" + name + "' of " + (obj.is_discarded() ? "an undefined value" : repr(obj)));
}

// Jinja's tests: `x is name(args)`.
bool apply_test(const std::string& name, const Value& v, const CallArgs& a, int line) {
  if (name == "defined") return !is_undefined(v);
  if (name == "undefined") return is_undefined(v);
  if (name == "none") return v.is_null();
  if (name == "string") return v.is_string();
  if (name == "number") return is_number(v);
  if (name == "integer") return v.is_number_integer();
  if (name == "float") return v.is_number_float();
  if (name == "boolean") return v.is_boolean();
  if (name == "true") return v.is_boolean() && v.get<bool>();
  if (name == "false") return v.is_boolean() && !v.get<bool>();
  if (name == "mapping") return v.is_object();
  if (name == "sequence") return v.is_array() || v.is_string() || v.is_object();
  if (name == "iterable") return v.is_array() || v.is_string() || v.is_object();
  if (name == "callable") return false;
  if (name == "odd" || name == "even") {
    if (!v.is_number_integer()) throw TemplateError(line, "'" + name + "' needs an integer");
    return (v.get<int64_t>() % 2 != 0) == (name == "odd");
  }
  if (name == "divisibleby") return v.get<int64_t>() % a.value(0, "num", Value(1)).get<int64_t>() == 0;
  if (name == "eq" || name == "equalto" || name == "==") return equal(v, a.value(0, "other", Value()));
  if (name == "ne" || name == "!=") return !equal(v, a.value(0, "other", Value()));
  if (name == "in") return contains(a.value(0, "seq", Value::array()), v, line);
  throw TemplateError(line, "unknown test '" + name + "'");
}

Value apply_filter(const std::string& name, const Value& v, const CallArgs& a, Context& ctx, int line);

struct Filter : Expr {
  Filter(int l, ExprPtr o, std::string n, Args a) : Expr(l), obj(std::move(o)), name(std::move(n)), args(std::move(a)) {}
  Value eval(Context& ctx) const override { return apply_filter(name, obj->eval(ctx), eval_args(args, ctx, line), ctx, line); }
  ExprPtr obj;
  std::string name;
  Args args;
};

struct Test : Expr {
  Test(int l, ExprPtr o, std::string n, Args a, bool neg) : Expr(l), obj(std::move(o)), name(std::move(n)), args(std::move(a)), negated(neg) {}
  Value eval(Context& ctx) const override {
    return apply_test(name, obj->eval(ctx), eval_args(args, ctx, line), line) != negated;
  }
  ExprPtr obj;
  std::string name;
  Args args;
  bool negated;
};

Value attribute_path(const Value& v, const std::string& path) {
  Value cur = v;
  size_t i = 0;
  while (i <= path.size()) {
    const size_t j = path.find('.', i);
    const std::string part = path.substr(i, j == std::string::npos ? std::string::npos : j - i);
    if (!part.empty() && std::all_of(part.begin(), part.end(), ::isdigit)) cur = item_of(cur, Value(std::stoll(part)));
    else cur = item_of(cur, Value(part));
    if (j == std::string::npos) break;
    i = j + 1;
  }
  return cur;
}

Value apply_filter(const std::string& name, const Value& v, const CallArgs& a, Context& ctx, int line) {
  (void)ctx;
  if (name == "trim") {
    const Value* chars = a.get(0, "chars");
    return strip(str(v), chars && chars->is_string() ? chars->get<std::string>() : kWhitespace, true, true);
  }
  if (name == "tojson") {
    const Value* ind = a.get(0, "indent");
    std::string out;
    dumps(v, ind && ind->is_number_integer() ? static_cast<int>(ind->get<int64_t>()) : -1, 0, out);
    return out;
  }
  if (name == "length" || name == "count") {
    if (v.is_string()) return static_cast<int64_t>(v.get_ref<const std::string&>().size());
    if (v.is_array() || v.is_object()) return static_cast<int64_t>(v.size());
    if (v.is_discarded()) return int64_t{0};
    throw TemplateError(line, "length of " + repr(v));
  }
  if (name == "string") return str(v);
  if (name == "safe" || name == "e" || name == "escape" || name == "forceescape") return name == "safe" ? v : Value(str(v));
  if (name == "upper" || name == "lower" || name == "title" || name == "capitalize")
    return call_method(Value(str(v)), name, {}, line);
  if (name == "first" || name == "last") {
    const auto items = iterate(v, line);
    if (items.empty()) return undefined();
    return name == "first" ? items.front() : items.back();
  }
  if (name == "default" || name == "d") {
    const bool boolean = truthy(a.value(1, "boolean", Value(false)));
    if (is_undefined(v) || (boolean && !truthy(v))) return a.value(0, "default_value", Value(""));
    return v;
  }
  if (name == "join") {
    const std::string sep = a.get(0, "d") ? str(*a.get(0, "d")) : "";
    const Value* attr = a.get(1, "attribute");
    std::string out;
    bool first = true;
    for (const auto& x : iterate(v, line)) {
      out += (first ? "" : sep) + str(attr ? attribute_path(x, str(*attr)) : x);
      first = false;
    }
    return out;
  }
  if (name == "list") {
    Value out = Value::array();
    for (const auto& x : iterate(v, line)) out.push_back(x);
    return out;
  }
  if (name == "reverse") {
    if (v.is_string()) return std::string(v.get<std::string>().rbegin(), v.get<std::string>().rend());
    auto items = iterate(v, line);
    std::reverse(items.begin(), items.end());
    return Value(items);
  }
  if (name == "items") return call_method(v, "items", {}, line);
  if (name == "int") {
    if (v.is_number()) return static_cast<int64_t>(num(v));
    try {
      return static_cast<int64_t>(std::stoll(str(v)));
    } catch (...) {
      return a.value(0, "default", Value(0));
    }
  }
  if (name == "float") {
    if (v.is_number()) return num(v);
    try {
      return std::stod(str(v));
    } catch (...) {
      return a.value(0, "default", Value(0.0));
    }
  }
  if (name == "abs") return v.is_number_integer() ? Value(std::llabs(v.get<int64_t>())) : Value(std::fabs(num(v)));
  if (name == "round") {
    const int64_t precision = a.value(0, "precision", Value(0)).get<int64_t>();
    const double f = std::pow(10.0, static_cast<double>(precision));
    return std::round(num(v) * f) / f;
  }
  if (name == "replace")
    return replace_all(str(v), str(a.value(0, "old", Value(""))), str(a.value(1, "new", Value(""))),
                       a.value(2, "count", Value(-1)).get<int64_t>());
  if (name == "indent") {
    const int64_t width = a.value(0, "width", Value(4)).get<int64_t>();
    const bool first = truthy(a.value(1, "first", Value(false)));
    const std::string pad(static_cast<size_t>(width), ' ');
    std::string s = str(v), out;
    size_t i = 0;
    bool line_start = first;
    for (; i < s.size(); ++i) {
      if (line_start && s[i] != '\n') out += pad;
      out += s[i];
      line_start = s[i] == '\n';
    }
    return out;
  }
  if (name == "map" || name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject") {
    Value out = Value::array();
    const auto items = iterate(v, line);
    if (name == "map") {
      const Value* attr = a.named.count("attribute") ? &a.named.at("attribute") : nullptr;
      for (const auto& x : items) {
        if (attr) out.push_back(attribute_path(x, str(*attr)));
        else out.push_back(apply_filter(a.string(0, "filter", "map"), x, CallArgs{{a.positional.begin() + 1, a.positional.end()}, {}, line}, ctx, line));
      }
      return out;
    }
    const bool by_attr = name.size() > 6;  // selectattr / rejectattr
    const bool keep_true = name.rfind("select", 0) == 0;
    for (const auto& x : items) {
      const Value subject = by_attr ? attribute_path(x, a.string(0, "attribute", name)) : x;
      const size_t test_at = by_attr ? 1 : 0;
      bool pass;
      if (a.positional.size() > test_at) {
        CallArgs rest{{a.positional.begin() + static_cast<long>(test_at) + 1, a.positional.end()}, {}, line};
        pass = apply_test(str(a.positional[test_at]), subject, rest, line);
      } else {
        pass = truthy(subject);
      }
      if (pass == keep_true) out.push_back(x);
    }
    return out;
  }
  if (name == "unique") {
    Value out = Value::array();
    for (const auto& x : iterate(v, line))
      if (!contains(out, x, line)) out.push_back(x);
    return out;
  }
  if (name == "sort") {
    auto items = iterate(v, line);
    const bool reverse = truthy(a.value(0, "reverse", Value(false)));
    const Value* attr = a.named.count("attribute") ? &a.named.at("attribute") : nullptr;
    std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
      const Value l = attr ? attribute_path(x, str(*attr)) : x, r = attr ? attribute_path(y, str(*attr)) : y;
      const bool less = is_number(l) && is_number(r) ? num(l) < num(r) : str(l) < str(r);
      const bool more = is_number(l) && is_number(r) ? num(r) < num(l) : str(r) < str(l);
      return reverse ? more : less;
    });
    return Value(items);
  }
  if (name == "wordcount") return static_cast<int64_t>(split(str(v), nullptr, -1).size());
  throw TemplateError(line, "unknown filter '" + name + "'");
}

struct Macro {
  std::vector<std::pair<std::string, ExprPtr>> params;  // name, default (may be null)
  std::vector<std::unique_ptr<Template::Node>> body;
};

std::string render_nodes(const std::vector<std::unique_ptr<Template::Node>>& nodes, Context& ctx);

// A call: a global function, a macro, loop.cycle, or a method of a value.
struct Call : Expr {
  Call(int l, ExprPtr c, Args a) : Expr(l), callee(std::move(c)), args(std::move(a)) {}
  Value eval(Context& ctx) const override {
    const CallArgs a = eval_args(args, ctx, line);
    if (auto* attr = dynamic_cast<const GetAttr*>(callee.get())) {
      const Value obj = attr->obj->eval(ctx);
      if (obj.is_object() && obj.contains("__loop_cycle__") && attr->name == "cycle") {
        if (a.positional.empty()) throw TemplateError(line, "loop.cycle needs values");
        return a.positional[static_cast<size_t>(obj["index0"].get<int64_t>()) % a.positional.size()];
      }
      return call_method(obj, attr->name, a, line);
    }
    auto* var = dynamic_cast<const Var*>(callee.get());
    if (!var) throw TemplateError(line, "only functions, macros and methods can be called");
    const std::string& f = var->name;
    if (f == "raise_exception") throw RaisedError(a.positional.empty() ? "raise_exception" : str(a.positional[0]));
    if (f == "namespace" || f == "dict") {
      Value out = Value::object();
      if (!a.positional.empty() && a.positional[0].is_object()) out = a.positional[0];
      for (const auto& [k, v] : a.named) out[k] = v;
      return out;
    }
    if (f == "range") {
      int64_t start = 0, stop = 0, step = 1;
      if (a.positional.size() == 1) stop = a.positional[0].get<int64_t>();
      else if (a.positional.size() >= 2) start = a.positional[0].get<int64_t>(), stop = a.positional[1].get<int64_t>();
      if (a.positional.size() == 3) step = a.positional[2].get<int64_t>();
      if (step == 0) throw TemplateError(line, "range step cannot be zero");
      const double count = std::ceil((static_cast<double>(stop) - static_cast<double>(start)) / static_cast<double>(step));
      if (count > static_cast<double>(kMaxItems))
        throw TemplateError(line, "range of " + std::to_string(static_cast<int64_t>(count)) + " items: more than the 1,000,000 a chat template may use");
      Value out = Value::array();
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) out.push_back(i);
      return out;
    }
    if (f == "strftime_now") {
      const std::time_t t = std::time(nullptr);
      std::tm tm{};
      localtime_r(&t, &tm);
      char buf[256];
      const size_t n = std::strftime(buf, sizeof buf, a.string(0, "format", "strftime_now").c_str(), &tm);
      return std::string(buf, n);
    }
    const auto m = ctx.macros.find(f);
    if (m == ctx.macros.end()) throw TemplateError(line, "unknown function '" + f + "'");
    if (ctx.call_depth >= kMaxCallDepth)
      throw TemplateError(line, "macro '" + f + "' called " + std::to_string(kMaxCallDepth) + " levels deep (a recursion without end?)");
    struct Depth {
      int& d;
      explicit Depth(int& x) : d(++x) {}
      ~Depth() { --d; }
    } depth(ctx.call_depth);
    ctx.push();
    const Macro& macro = *m->second;
    for (size_t i = 0; i < macro.params.size(); ++i) {
      const auto& [pname, def] = macro.params[i];
      const Value* given = a.get(i, pname);
      ctx.set(pname, given ? *given : def ? def->eval(ctx) : undefined());
    }
    std::string out = render_nodes(macro.body, ctx);
    ctx.pop();
    return out;
  }
  ExprPtr callee;
  Args args;
};

// ---------------------------------------------------------------------------------------------------------------
// Expression parser (Jinja's precedence: or < and < not < comparisons < + - < ~ < * / // % < ** < unary <
// filters and tests < postfix).
// ---------------------------------------------------------------------------------------------------------------

class Parser {
public:
  Parser(std::vector<Token> toks, int line) : t_(std::move(toks)), line_(line) {}

  // Nesting of expressions (parentheses, unary operators, `not`, call arguments): bounded, so that a template
  // cannot overflow the stack while being parsed.
  struct Nest {
    Parser& p;
    explicit Nest(Parser& x) : p(x) {
      if (++p.depth_ > kMaxParseDepth) throw TemplateError(p.line_, "expression nested more than 200 levels deep");
    }
    ~Nest() { --p.depth_; }
  };

  ExprPtr expression() {
    Nest nest(*this);
    ExprPtr e = or_expr();
    if (is_name("if")) {  // a if cond else b
      ++i_;
      auto c = std::make_unique<CondExpr>(line_);
      c->then = std::move(e);
      c->cond = or_expr();
      if (is_name("else")) ++i_, c->otherwise = expression();
      return c;
    }
    return e;
  }
  // A comma-separated list (a tuple when there is a comma): `for a, b in ...`, `set x = a, b`.
  ExprPtr tuple_or_expression() {
    ExprPtr first = expression();
    if (!is_op(",")) return first;
    auto list = std::make_unique<ListExpr>(line_);
    list->items.push_back(std::move(first));
    while (is_op(",")) {
      ++i_;
      if (at_end()) break;
      list->items.push_back(expression());
    }
    return list;
  }

  // An expression without `if ... else` (a for loop's iterable, where `if` starts its filter).
  ExprPtr expression_no_condition() { return or_expr(); }

  bool at_end() const { return t_[i_].kind == Tok::End; }
  bool is_name(const char* n) const { return t_[i_].kind == Tok::Name && t_[i_].text == n; }
  bool is_op(const char* o) const { return t_[i_].kind == Tok::Op && t_[i_].text == o; }
  std::string name() {
    if (t_[i_].kind != Tok::Name) throw TemplateError(line_, "expected a name, got '" + t_[i_].text + "'");
    return t_[i_++].text;
  }
  void expect_op(const char* o) {
    if (!is_op(o)) throw TemplateError(line_, std::string("expected '") + o + "', got '" + t_[i_].text + "'");
    ++i_;
  }
  void expect_end() {
    if (!at_end()) throw TemplateError(line_, "unexpected '" + t_[i_].text + "'");
  }
  void skip() { ++i_; }

private:
  ExprPtr or_expr() {
    ExprPtr e = and_expr();
    while (is_name("or")) ++i_, e = std::make_unique<Binary>(line_, "or", std::move(e), and_expr());
    return e;
  }
  ExprPtr and_expr() {
    ExprPtr e = not_expr();
    while (is_name("and")) ++i_, e = std::make_unique<Binary>(line_, "and", std::move(e), not_expr());
    return e;
  }
  ExprPtr not_expr() {
    Nest nest(*this);
    if (is_name("not")) {
      ++i_;
      return std::make_unique<Unary>(line_, "not", not_expr());
    }
    return compare();
  }
  ExprPtr compare() {
    ExprPtr e = add();
    while (true) {
      std::string op;
      if (t_[i_].kind == Tok::Op && (is_op("==") || is_op("!=") || is_op("<") || is_op(">") || is_op("<=") || is_op(">=")))
        op = t_[i_++].text;
      else if (is_name("in")) op = "in", ++i_;
      else if (is_name("not") && t_[i_ + 1].kind == Tok::Name && t_[i_ + 1].text == "in") op = "not in", i_ += 2;
      else break;
      e = std::make_unique<Binary>(line_, op, std::move(e), add());
    }
    return e;
  }
  ExprPtr add() {
    ExprPtr e = concat();
    while (is_op("+") || is_op("-")) {
      const std::string op = t_[i_++].text;
      e = std::make_unique<Binary>(line_, op, std::move(e), concat());
    }
    return e;
  }
  ExprPtr concat() {
    ExprPtr e = mul();
    while (is_op("~")) ++i_, e = std::make_unique<Binary>(line_, "~", std::move(e), mul());
    return e;
  }
  ExprPtr mul() {
    ExprPtr e = pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string op = t_[i_++].text;
      e = std::make_unique<Binary>(line_, op, std::move(e), pow());
    }
    return e;
  }
  ExprPtr pow() {
    ExprPtr e = unary();
    while (is_op("**")) ++i_, e = std::make_unique<Binary>(line_, "**", std::move(e), unary());
    return e;
  }
  ExprPtr unary() {
    Nest nest(*this);
    if (is_op("-") || is_op("+")) {
      const std::string op = t_[i_++].text;
      return std::make_unique<Unary>(line_, op, unary());
    }
    ExprPtr e = postfix(primary());
    // Filters and tests bind tighter than every binary operator.
    while (true) {
      if (is_op("|")) {
        ++i_;
        const std::string f = name();
        Args a;
        if (is_op("(")) a = call_args();
        e = std::make_unique<Filter>(line_, std::move(e), f, std::move(a));
        e = postfix(std::move(e));
      } else if (is_name("is")) {
        ++i_;
        bool neg = false;
        if (is_name("not")) neg = true, ++i_;
        std::string test;
        if (t_[i_].kind == Tok::Name) test = name();
        else if (is_op("==") || is_op("!=")) test = t_[i_++].text;
        else throw TemplateError(line_, "expected a test name after 'is'");
        Args a;
        if (is_op("(")) {
          a = call_args();
        } else if (t_[i_].kind == Tok::String || t_[i_].kind == Tok::Int || t_[i_].kind == Tok::Float ||
                   (t_[i_].kind == Tok::Name && !is_name("and") && !is_name("or") && !is_name("else") &&
                    !is_name("if") && !is_name("is") && !is_name("in") && !is_name("not"))) {
          a.positional.push_back(postfix(primary()));  // `x is divisibleby 3`, `x is sameas none`
        }
        e = std::make_unique<Test>(line_, std::move(e), test, std::move(a), neg);
      } else {
        return e;
      }
    }
  }
  ExprPtr primary() {
    const Token tok = t_[i_];
    if (tok.kind == Tok::String) {
      ++i_;
      std::string s = tok.text;
      while (t_[i_].kind == Tok::String) s += t_[i_++].text;  // adjacent literals concatenate
      return std::make_unique<Literal>(line_, Value(s));
    }
    if (tok.kind == Tok::Int) return ++i_, std::make_unique<Literal>(line_, Value(static_cast<int64_t>(std::stoll(tok.text))));
    if (tok.kind == Tok::Float) return ++i_, std::make_unique<Literal>(line_, Value(std::stod(tok.text)));
    if (tok.kind == Tok::Name) {
      ++i_;
      if (tok.text == "true" || tok.text == "True") return std::make_unique<Literal>(line_, Value(true));
      if (tok.text == "false" || tok.text == "False") return std::make_unique<Literal>(line_, Value(false));
      if (tok.text == "none" || tok.text == "None") return std::make_unique<Literal>(line_, Value(nullptr));
      return std::make_unique<Var>(line_, tok.text);
    }
    if (is_op("(")) {
      ++i_;
      ExprPtr e = tuple_or_expression();
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      ++i_;
      auto list = std::make_unique<ListExpr>(line_);
      while (!is_op("]")) {
        list->items.push_back(expression());
        if (!is_op(",")) break;
        ++i_;
      }
      expect_op("]");
      return list;
    }
    if (is_op("{")) {
      ++i_;
      auto dict = std::make_unique<DictExpr>(line_);
      while (!is_op("}")) {
        ExprPtr k = expression();
        expect_op(":");
        dict->items.emplace_back(std::move(k), expression());
        if (!is_op(",")) break;
        ++i_;
      }
      expect_op("}");
      return dict;
    }
    throw TemplateError(line_, tok.kind == Tok::End ? "unexpected end of expression" : "unexpected '" + tok.text + "'");
  }
  ExprPtr postfix(ExprPtr e) {
    while (true) {
      if (is_op(".")) {
        ++i_;
        if (t_[i_].kind == Tok::Int) e = std::make_unique<GetItem>(line_, std::move(e), std::make_unique<Literal>(line_, Value(static_cast<int64_t>(std::stoll(t_[i_++].text)))));
        else e = std::make_unique<GetAttr>(line_, std::move(e), name());
      } else if (is_op("[")) {
        ++i_;
        ExprPtr a, b, c;
        bool slice = false;
        if (!is_op(":")) a = expression();
        if (is_op(":")) {
          slice = true;
          ++i_;
          if (!is_op("]") && !is_op(":")) b = expression();
          if (is_op(":")) {
            ++i_;
            if (!is_op("]")) c = expression();
          }
        }
        expect_op("]");
        if (slice) {
          auto s = std::make_unique<SliceExpr>(line_);
          s->obj = std::move(e), s->start_e = std::move(a), s->stop_e = std::move(b), s->step_e = std::move(c);
          e = std::move(s);
        } else {
          e = std::make_unique<GetItem>(line_, std::move(e), std::move(a));
        }
      } else if (is_op("(")) {
        e = std::make_unique<Call>(line_, std::move(e), call_args());
      } else {
        return e;
      }
    }
  }
  Args call_args() {
    expect_op("(");
    Args a;
    while (!is_op(")")) {
      if (t_[i_].kind == Tok::Name && t_[i_ + 1].kind == Tok::Op && t_[i_ + 1].text == "=") {
        const std::string k = name();
        ++i_;
        a.named.emplace_back(k, expression());
      } else {
        a.positional.push_back(expression());
      }
      if (!is_op(",")) break;
      ++i_;
    }
    expect_op(")");
    return a;
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  int line_;
  int depth_ = 0;
};

struct LoopControl {
  bool is_break;
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Statements.
// ---------------------------------------------------------------------------------------------------------------

struct Template::Node {
  explicit Node(int l) : line(l) {}
  virtual ~Node() = default;
  virtual void render(Context& ctx) const = 0;
  int line;
};

namespace {

using NodeList = std::vector<std::unique_ptr<Template::Node>>;

void render_into(const NodeList& nodes, Context& ctx) {
  for (const auto& n : nodes) {
    if (++ctx.steps > kMaxSteps)
      throw TemplateError(n->line, "the template ran more than 20,000,000 steps (a loop without end?)");
    n->render(ctx);
    if (ctx.out->size() > kMaxText) check_text(ctx.out->size(), n->line);
  }
}

std::string render_nodes(const NodeList& nodes, Context& ctx) {
  std::string* saved = ctx.out;
  std::string out;
  ctx.out = &out;
  try {
    render_into(nodes, ctx);
  } catch (...) {
    ctx.out = saved;
    throw;
  }
  ctx.out = saved;
  return out;
}

struct TextNode : Template::Node {
  TextNode(int l, std::string t) : Node(l), text(std::move(t)) {}
  void render(Context& ctx) const override { *ctx.out += text; }
  std::string text;
};

struct OutputNode : Template::Node {
  OutputNode(int l, ExprPtr e) : Node(l), expr(std::move(e)) {}
  void render(Context& ctx) const override { *ctx.out += str(expr->eval(ctx)); }
  ExprPtr expr;
};

struct IfNode : Template::Node {
  using Node::Node;
  void render(Context& ctx) const override {
    for (const auto& [cond, body] : branches)
      if (!cond || truthy(cond->eval(ctx))) return render_into(body, ctx);
  }
  std::vector<std::pair<ExprPtr, NodeList>> branches;  // a null condition: else
};

void assign(Context& ctx, const std::vector<std::string>& names, const Value& v, int line) {
  if (names.size() == 1) return ctx.set(names[0], v);
  if (!v.is_array() || v.size() != names.size())
    throw TemplateError(line, "cannot unpack " + repr(v) + " into " + std::to_string(names.size()) + " names");
  for (size_t i = 0; i < names.size(); ++i) ctx.set(names[i], v[i]);
}

struct ForNode : Template::Node {
  using Node::Node;
  void render(Context& ctx) const override {
    std::vector<Value> items = iterate(iterable->eval(ctx), line);
    if (filter) {  // `for x in xs if cond`: the loop variables count the kept items only
      std::vector<Value> kept;
      for (const auto& item : items) {
        ctx.push();
        assign(ctx, names, item, line);
        if (truthy(filter->eval(ctx))) kept.push_back(item);
        ctx.pop();
      }
      items = std::move(kept);
    }
    if (items.empty()) return render_into(otherwise, ctx);
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < n; ++i) {
      if (++ctx.steps > kMaxSteps)
        throw TemplateError(line, "the template ran more than 20,000,000 steps (a loop without end?)");
      ctx.push();
      Value loop = {{"index", i + 1}, {"index0", i}, {"revindex", n - i}, {"revindex0", n - i - 1},
                    {"first", i == 0}, {"last", i == n - 1}, {"length", n}, {"__loop_cycle__", true}};
      loop["previtem"] = i > 0 ? items[static_cast<size_t>(i - 1)] : undefined();
      loop["nextitem"] = i + 1 < n ? items[static_cast<size_t>(i + 1)] : undefined();
      ctx.set("loop", loop);
      assign(ctx, names, items[static_cast<size_t>(i)], line);
      try {
        render_into(body, ctx);
      } catch (const LoopControl& c) {
        ctx.pop();
        if (c.is_break) break;
        continue;
      }
      ctx.pop();
    }
  }
  std::vector<std::string> names;
  ExprPtr iterable, filter;
  NodeList body, otherwise;
};

struct SetNode : Template::Node {
  using Node::Node;
  void render(Context& ctx) const override {
    const Value v = block_body.empty() && expr ? expr->eval(ctx) : Value(render_nodes(block_body, ctx));
    if (attr.empty()) return assign(ctx, names, v, line);
    Value* ns = ctx.find(names[0]);
    if (!ns || !ns->is_object()) throw TemplateError(line, "'" + names[0] + "' is not a namespace");
    (*ns)[attr] = v;
  }
  std::vector<std::string> names;  // set a / set a, b / set ns.attr (names = {ns}, attr)
  std::string attr;
  ExprPtr expr;
  NodeList block_body;  // {% set x %}...{% endset %}
};

struct LoopControlNode : Template::Node {
  LoopControlNode(int l, bool b) : Node(l), is_break(b) {}
  void render(Context&) const override { throw LoopControl{is_break}; }
  bool is_break;
};

struct MacroNode : Template::Node {
  using Node::Node;
  void render(Context& ctx) const override { ctx.macros[name] = &macro; }
  std::string name;
  Macro macro;
};

struct BodyNode : Template::Node {  // {% generation %}: its content as is
  using Node::Node;
  void render(Context& ctx) const override { render_into(body, ctx); }
  NodeList body;
};

// ---------------------------------------------------------------------------------------------------------------
// Template text -> segments (text, {{ }}, {% %}) with whitespace control, then statements.
// ---------------------------------------------------------------------------------------------------------------

struct Segment {
  enum Kind { Text, Output, Statement } kind;
  std::string text;
  int line;
};

std::vector<Segment> segments(const std::string& src) {
  std::vector<Segment> out;
  size_t pos = 0;
  int line = 1;
  bool strip_next = false;   // the previous tag ended with "-": drop the whitespace that follows it
  bool trim_newline = false; // trim_blocks: drop the first newline after a block tag
  auto line_at = [&](size_t upto) {
    return line + static_cast<int>(std::count(src.begin() + static_cast<long>(pos), src.begin() + static_cast<long>(upto), '\n'));
  };
  while (pos <= src.size()) {
    size_t open = std::string::npos;
    for (size_t i = src.find('{', pos); i != std::string::npos && i + 1 < src.size(); i = src.find('{', i + 1))
      if (src[i + 1] == '{' || src[i + 1] == '%' || src[i + 1] == '#') {
        open = i;
        break;
      }
    std::string text = src.substr(pos, open == std::string::npos ? std::string::npos : open - pos);
    size_t removed = 0;  // leading characters the previous tag's whitespace control takes
    if (strip_next) removed = std::min(text.size(), text.find_first_not_of(" \t\r\n\f\v"));
    else if (trim_newline && text.rfind("\n", 0) == 0) removed = 1;
    else if (trim_newline && text.rfind("\r\n", 0) == 0) removed = 2;
    text.erase(0, removed);
    const size_t text_begin = pos + removed;
    if (open == std::string::npos) {
      if (!text.empty()) out.push_back({Segment::Text, text, line});
      break;
    }
    const char kind = src[open + 1];
    const bool minus_left = open + 2 < src.size() && src[open + 2] == '-';
    const bool plus_left = open + 2 < src.size() && src[open + 2] == '+';
    if (minus_left) {
      const size_t last = text.find_last_not_of(" \t\r\n\f\v");
      text.erase(last == std::string::npos ? 0 : last + 1);
    } else if (kind != '{' && !plus_left) {
      // lstrip_blocks: the spaces and tabs before a block or comment tag that starts its line.
      const size_t nl = text.find_last_of('\n');
      const size_t from = nl == std::string::npos ? 0 : nl + 1;
      const bool line_starting = nl != std::string::npos || text_begin == 0 || src[text_begin - 1] == '\n';
      if (line_starting && text.find_first_not_of(" \t", from) == std::string::npos) text.erase(from);
    }
    if (!text.empty()) out.push_back({Segment::Text, text, line});
    const int tag_line = line_at(open);
    // The tag's end, skipping quoted strings.
    const char close = kind == '{' ? '}' : kind;
    size_t i = open + 2;
    char quote = 0;
    for (; i + 1 < src.size(); ++i) {
      if (quote) {
        if (src[i] == '\\') ++i;
        else if (src[i] == quote) quote = 0;
      } else if (kind != '#' && (src[i] == '\'' || src[i] == '"')) {
        quote = src[i];
      } else if (src[i] == close && src[i + 1] == '}') {
        break;
      }
    }
    if (i + 1 >= src.size()) throw TemplateError(tag_line, std::string("unclosed '{") + kind + "'");
    const bool minus_right = i > open + 2 && src[i - 1] == '-';
    std::string inner = src.substr(open + 2, i - open - 2);
    if (minus_left || plus_left) inner.erase(0, 1);
    if (minus_right && !inner.empty()) inner.pop_back();
    if (kind == '{') out.push_back({Segment::Output, inner, tag_line});
    else if (kind == '%') out.push_back({Segment::Statement, inner, tag_line});
    strip_next = minus_right;
    trim_newline = kind != '{';
    line = line_at(i + 2);
    pos = i + 2;
  }
  return out;
}

class StatementParser {
public:
  explicit StatementParser(std::vector<Segment> segs) : s_(std::move(segs)) {}

  // Parses until one of `ends` (the statement's first word); returns the body and leaves the end statement's parser
  // positioned after its keyword in `end_parser`.
  NodeList body(const std::vector<std::string>& ends, std::string* ended, std::unique_ptr<Parser>* end_parser) {
    struct Nest {  // blocks inside blocks: bounded, as expressions are
      int& n;
      Nest(int& x, int line) : n(x) {
        if (++n > kMaxParseDepth) throw TemplateError(line, "blocks nested more than 200 levels deep");
      }
      ~Nest() { --n; }
    } nest(nesting_, i_ > 0 && i_ <= s_.size() ? s_[i_ - 1].line : 1);
    NodeList nodes;
    while (i_ < s_.size()) {
      const Segment& seg = s_[i_++];
      if (seg.kind == Segment::Text) {
        nodes.push_back(std::make_unique<TextNode>(seg.line, seg.text));
        continue;
      }
      auto p = std::make_unique<Parser>(lex(seg.text, seg.line), seg.line);
      if (seg.kind == Segment::Output) {
        ExprPtr e = p->expression();
        p->expect_end();
        nodes.push_back(std::make_unique<OutputNode>(seg.line, std::move(e)));
        continue;
      }
      const std::string word = p->name();
      if (std::find(ends.begin(), ends.end(), word) != ends.end()) {
        if (ended) *ended = word;
        if (end_parser) *end_parser = std::move(p);
        return nodes;
      }
      nodes.push_back(statement(word, *p, seg.line));
    }
    if (!ends.empty()) throw TemplateError(s_.empty() ? 1 : s_.back().line, "missing {% " + ends.back() + " %}");
    return nodes;
  }

private:
  std::unique_ptr<Template::Node> statement(const std::string& word, Parser& p, int line) {
    if (word == "if") {
      auto node = std::make_unique<IfNode>(line);
      ExprPtr cond = p.expression();
      p.expect_end();
      while (true) {
        std::string ended;
        std::unique_ptr<Parser> ep;
        NodeList b = body({"elif", "else", "endif"}, &ended, &ep);
        node->branches.emplace_back(std::move(cond), std::move(b));
        if (ended == "endif") break;
        if (ended == "else") {
          ep->expect_end();
          std::string e2;
          NodeList eb = body({"endif"}, &e2, nullptr);
          node->branches.emplace_back(nullptr, std::move(eb));
          break;
        }
        cond = ep->expression();
        ep->expect_end();
      }
      return node;
    }
    if (word == "for") {
      auto node = std::make_unique<ForNode>(line);
      node->names.push_back(p.name());
      while (p.is_op(",")) p.skip(), node->names.push_back(p.name());
      if (!p.is_name("in")) throw TemplateError(line, "expected 'in' in for");
      p.skip();
      node->iterable = p.expression_no_condition();
      if (p.is_name("if")) p.skip(), node->filter = p.expression();
      if (p.is_name("recursive")) throw TemplateError(line, "recursive loops are not supported");
      p.expect_end();
      std::string ended;
      std::unique_ptr<Parser> ep;
      node->body = body({"else", "endfor"}, &ended, &ep);
      if (ended == "else") node->otherwise = body({"endfor"}, nullptr, nullptr);
      return node;
    }
    if (word == "set") {
      auto node = std::make_unique<SetNode>(line);
      node->names.push_back(p.name());
      if (p.is_op(".")) p.skip(), node->attr = p.name();
      while (p.is_op(",")) p.skip(), node->names.push_back(p.name());
      if (p.is_op("=")) {
        p.skip();
        node->expr = p.tuple_or_expression();
        p.expect_end();
      } else {
        p.expect_end();
        node->block_body = body({"endset"}, nullptr, nullptr);
        if (node->block_body.empty()) node->block_body.push_back(std::make_unique<TextNode>(line, ""));
      }
      return node;
    }
    if (word == "break" || word == "continue") {
      p.expect_end();
      return std::make_unique<LoopControlNode>(line, word == "break");
    }
    if (word == "macro") {
      auto node = std::make_unique<MacroNode>(line);
      node->name = p.name();
      p.expect_op("(");
      while (!p.is_op(")")) {
        std::string param = p.name();
        ExprPtr def;
        if (p.is_op("=")) p.skip(), def = p.expression();
        node->macro.params.emplace_back(param, std::move(def));
        if (!p.is_op(",")) break;
        p.skip();
      }
      p.expect_op(")");
      p.expect_end();
      node->macro.body = body({"endmacro"}, nullptr, nullptr);
      return node;
    }
    if (word == "generation") {
      p.expect_end();
      auto node = std::make_unique<BodyNode>(line);
      node->body = body({"endgeneration"}, nullptr, nullptr);
      return node;
    }
    throw TemplateError(line, "unknown statement '" + word + "'");
  }

  std::vector<Segment> s_;
  size_t i_ = 0;
  int nesting_ = 0;
};

}  // namespace

Template::Template(const std::string& source, std::string where) : where_(std::move(where)) {
  try {
    StatementParser parser(segments(source));
    body_ = parser.body({}, nullptr, nullptr);
  } catch (const TemplateError& e) {
    throw runtime_error(where_ + " line " + std::to_string(e.line), e.what());
  }
}

Template::~Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;

std::string Template::render(const Value& context) const {
  Context ctx(context);
  std::string out;
  ctx.out = &out;
  try {
    render_into(body_, ctx);
  } catch (const TemplateError& e) {
    throw runtime_error(where_ + " line " + std::to_string(e.line), e.what());
  } catch (const RaisedError& e) {
    throw runtime_error(where_, e.what());
  } catch (const LoopControl&) {
    throw runtime_error(where_, "break or continue outside a loop");
  }
  return out;
}

}  // namespace dsopen::data::jinja
