// Command-line helpers shared by every binary: --help and --version, and cxxopts errors turned into usage errors.
#pragma once

#include <cxxopts.hpp>

#include <string>
#include <vector>

namespace dsopen::cli {

// Adds -h/--help and --version to `options`.
void add_common(cxxopts::Options& options);

// Parses argv; a cxxopts error, or an argument no option takes, becomes a usage error (exit 2) naming it.
cxxopts::ParseResult parse(cxxopts::Options& options, int argc, char** argv);

// Prints help or version when asked; returns true when the program should exit 0 right away.
bool handle_common(const cxxopts::Options& options, const cxxopts::ParseResult& result);

// Every value of a repeatable option as written: cxxopts splits a vector value at commas, which would turn
// --prompt "Hello, world" into two prompts.
std::vector<std::string> values_of(int argc, char** argv, const std::string& name);

// --profile PATH (a Chrome trace from LibTorch's profiler): refused like any output file (env::check_output_path
// against `inputs`), and its directory created, since the profiler only warns when it cannot write.
void prepare_profile_output(const std::string& path, const std::vector<std::string>& inputs);

// "dsopen-train 0.1.0 (LibTorch 2.11.0, CUDA)".
std::string version_string(const std::string& program);

}  // namespace dsopen::cli
