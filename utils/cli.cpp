#include "utils/cli.h"

#include <torch/version.h>

#include <filesystem>
#include <iostream>

#include "utils/config.h"
#include "utils/env.h"
#include "utils/errors.h"

namespace dsopen::cli {

void add_common(cxxopts::Options& options) {
  options.add_options("General")("h,help", "Print this help and exit")("version", "Print the version and exit");
}

cxxopts::ParseResult parse(cxxopts::Options& options, int argc, char** argv) {
  cxxopts::ParseResult result;
  try {
    result = options.parse(argc, argv);
  } catch (const cxxopts::exceptions::incorrect_argument_type& e) {
    // cxxopts names the value, not the flag: find the flag that was given it.
    const std::string what = e.what();
    const auto open = what.find("\xe2\x80\x98"), close = what.find("\xe2\x80\x99");
    const std::string value = open != std::string::npos && close > open ? what.substr(open + 3, close - open - 3) : "";
    for (int i = 1; i < argc && !value.empty(); ++i) {
      const std::string a = argv[i];
      const auto eq = a.find('=');
      if (a.rfind("--", 0) == 0 && eq != std::string::npos && a.substr(eq + 1) == value)
        throw usage_error(a.substr(0, eq), "'" + value + "' is not a valid value", "see --help");
      if (a == value && i > 1 && argv[i - 1][0] == '-')
        throw usage_error(argv[i - 1], "'" + value + "' is not a valid value", "see --help");
    }
    throw usage_error("command line", what, "see --help");
  } catch (const cxxopts::exceptions::no_such_option& e) {
    // "Option ‘temprature’ does not exist": name the flag and suggest the nearest one this program has.
    const std::string what = e.what();
    const auto open = what.find("\xe2\x80\x98"), close = what.find("\xe2\x80\x99");
    const std::string name = open != std::string::npos && close > open ? what.substr(open + 3, close - open - 3) : "";
    std::vector<std::string> flags;
    for (const auto& group : options.groups())
      for (const auto& o : options.group_help(group).options)
        for (const auto& l : o.l) flags.push_back(l);
    const std::string guess = config::closest_match(name, flags);
    throw usage_error(name.empty() ? "command line" : "--" + name, "no such flag",
                      guess.empty() ? "see --help" : "did you mean --" + guess + "?");
  } catch (const cxxopts::exceptions::exception& e) {
    throw usage_error("command line", e.what(), "see --help");
  }
  // A word no option takes (`--prompt A fool` leaves "fool") would otherwise be dropped without a word.
  if (!result.unmatched().empty())
    throw usage_error("command line", "unexpected argument '" + result.unmatched().front() + "'",
                      "quote values that contain spaces; see --help");
  return result;
}

std::vector<std::string> values_of(int argc, char** argv, const std::string& name) {
  std::vector<std::string> out;
  const std::string flag = "--" + name;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--") break;
    if (a == flag && i + 1 < argc) out.push_back(argv[++i]);
    else if (a.rfind(flag + "=", 0) == 0) out.push_back(a.substr(flag.size() + 1));
  }
  return out;
}

void prepare_profile_output(const std::string& path, const std::vector<std::string>& inputs) {
  env::check_output_path(path, env::OutputKind::File, inputs, "--profile");
  std::filesystem::create_directories(std::filesystem::absolute(path).parent_path());
}

std::string version_string(const std::string& program) {
  std::string s = program + " " + DSOPEN_VERSION + " (LibTorch " + TORCH_VERSION;
#ifdef DSOPEN_WITH_CUDA
  s += ", CUDA";
#endif
  return s + ")";
}

bool handle_common(const cxxopts::Options& options, const cxxopts::ParseResult& result) {
  if (result.count("help")) {
    std::cout << options.help() << std::endl;
    return true;
  }
  if (result.count("version")) {
    std::cout << version_string(options.program()) << std::endl;
    return true;
  }
  return false;
}

}  // namespace dsopen::cli
