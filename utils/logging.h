// Logging through spdlog: rank 0 logs to the console, every rank to <output_dir>/logs/rank_N.log.
// Code logs with spdlog::info/warn/error directly; this file only wires the sinks and the level.
#pragma once

#include <spdlog/spdlog.h>

#include <string>

namespace dsopen::logging {

// Parses "trace|debug|info|warn|error|off"; throws a usage error naming `key` otherwise.
spdlog::level::level_enum parse_level(const std::string& level, const std::string& key = "run.log_level");

// Console-only logging for tools that have no run directory.
void setup_console(const std::string& level = "info");

// Console (rank 0 only, at `level`) plus a per-rank file under `output_dir`/logs/ that also keeps debug messages
// (the resolved config, internal counters). Creates the directory.
void setup_run(const std::string& output_dir, int rank, const std::string& level);

// Writes `message` (the error that ends the process, already printed on stderr) into this process's rank log, if
// it has one: a failed rank's log then says why, where other ranks' errors send the reader.
void record_fatal_error(const std::string& message);

}  // namespace dsopen::logging
