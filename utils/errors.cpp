#include "utils/errors.h"

#include <cstdio>
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
}  // namespace

int run_main(const char* program, int (*body)(int, char**), int argc, char** argv) {
  try {
    return body(argc, argv);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return e.exit_code();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, first_line(e.what()).c_str());
    return 1;
  }
}

}  // namespace dsopen
