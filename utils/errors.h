// dsopen::Error — the one exception type of the project.
//
// An error says what went wrong, where (file, key, tensor name) and how to fix it. Binaries catch it in main,
// print one line and exit with the error's exit code: 2 for usage and config errors, 1 for runtime errors.
#pragma once

#include <stdexcept>
#include <string>

namespace dsopen {

enum class ErrorKind { Usage, Runtime };

class Error : public std::runtime_error {
public:
  // `where`: file[:line] and/or key path; `hint`: how to fix it (may be empty).
  Error(ErrorKind kind, const std::string& where, const std::string& what, const std::string& hint = "");

  ErrorKind kind() const { return kind_; }
  int exit_code() const { return kind_ == ErrorKind::Usage ? 2 : 1; }

private:
  ErrorKind kind_;
};

// Shorthands: a usage/config error (exit 2) and a runtime error (exit 1).
Error usage_error(const std::string& where, const std::string& what, const std::string& hint = "");
Error runtime_error(const std::string& where, const std::string& what, const std::string& hint = "");

// Joins the parts the way every message of the project reads: "where: what (hint)".
std::string format_error(const std::string& where, const std::string& what, const std::string& hint);

// Runs a binary's body: catches dsopen::Error and any std::exception, prints one line to stderr prefixed by the
// program name and returns the exit code (0 on success). Keeps every main() to one line of error handling.
int run_main(const char* program, int (*body)(int, char**), int argc, char** argv);
// Where run_main also sends the line it prints (utils/logging.h installs the rank log; none by default).
void set_fatal_error_sink(void (*sink)(const std::string&));

}  // namespace dsopen
