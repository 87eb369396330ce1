#include "utils/errors.h"

#include <filesystem>

#include <cstdio>
#include <cstdlib>
#include <exception>

namespace dsopen {

std::string format_error(const std::string& where, const std::string& what, const std::string& hint) {
  std::string msg = where.empty() ? what : where + ": " + what;
  if (!hint.empty()) msg += " (" + hint + ")";
  return msg;
}

Error::Error(ErrorKind kind, const std::string& where, const std::string& what, const std::string& hint)
    : std::runtime_error(format_error(where, what, hint)), kind_(kind) {}

Error usage_error(const std::string& where, const std::string& what, const std::string& hint) {
  return Error(ErrorKind::Usage, where, what, hint);
}

Error runtime_error(const std::string& where, const std::string& what, const std::string& hint) {
  return Error(ErrorKind::Runtime, where, what, hint);
}

namespace {
// LibTorch's c10::Error messages carry a multi-line C++ backtrace; users get the first line only.
std::string first_line(const std::string& s) {
  auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

// Messages may quote bytes of a damaged file; they are printed as \xNN unless they form valid UTF-8, so the one
// error line stays readable text in any terminal or log.
std::string printable(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    bool ok = len > 0 && i + len <= s.size() && (c >= 0x20 || c == '\t' || c == '\n');
    for (size_t k = 1; ok && k < len; ++k) ok = (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80;
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      out += buf;
      ++i;
    }
  }
  return out;
}
}  // namespace

namespace {
void (*g_fatal_error_sink)(const std::string&) = nullptr;
}  // namespace

void set_fatal_error_sink(void (*sink)(const std::string&)) { g_fatal_error_sink = sink; }

int run_main(const char* program, int (*body)(int, char**), int argc, char** argv) {
  try {
    return body(argc, argv);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, printable(e.what()).c_str());
    if (g_fatal_error_sink) g_fatal_error_sink(std::string(program) + ": error: " + printable(e.what()));
    return e.exit_code();
  } catch (const std::filesystem::filesystem_error& e) {
    // A path the operating system refused (a symlink loop, a file where a directory should be, no permission):
    // the path and the system's reason, not the library's wording.
    const std::string path = e.path1().empty() ? "(empty path)" : e.path1().string();
    std::fprintf(stderr, "%s: error: %s: %s (check the path)\n", program, printable(path).c_str(),
                 e.code().message().c_str());
    return 1;
  } catch (const std::exception& e) {
    // An allocation the machine could not serve (LibTorch's CPU or CUDA allocator): say so in words.
    const std::string what = e.what();
    const auto at = what.find("tried to allocate ");
    if (what.find("can't allocate memory") != std::string::npos || what.find("out of memory") != std::string::npos) {
      const double bytes = at == std::string::npos ? 0 : std::atof(what.c_str() + at + 18);
      std::fprintf(stderr, "%s: error: out of memory%s (lower the sizes in the config; dsopen-train --plan and "
                   "dsopen-model-info show what a job needs)\n",
                   program, bytes > 0 ? (": an allocation of " + std::to_string(static_cast<long long>(bytes / (1 << 20))) +
                                         " MiB failed").c_str() : "");
      return 1;
    }
    std::fprintf(stderr, "%s: error: %s\n", program, printable(first_line(what)).c_str());
    if (g_fatal_error_sink) g_fatal_error_sink(std::string(program) + ": error: " + printable(first_line(what)));
    return 1;
  }
}

}  // namespace dsopen
