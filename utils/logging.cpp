#include "utils/logging.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <filesystem>

#include "utils/errors.h"

namespace dsopen::logging {

spdlog::level::level_enum parse_level(const std::string& level, const std::string& key) {
  static const std::pair<const char*, spdlog::level::level_enum> levels[] = {
      {"trace", spdlog::level::trace}, {"debug", spdlog::level::debug}, {"info", spdlog::level::info},
      {"warn", spdlog::level::warn},   {"error", spdlog::level::err},   {"off", spdlog::level::off}};
  for (const auto& [name, value] : levels)
    if (level == name) return value;
  throw usage_error(key, "unknown log level '" + level + "'", "use trace, debug, info, warn, error or off");
}

namespace {
std::shared_ptr<spdlog::sinks::sink> console_sink() {
  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  sink->set_pattern("[%H:%M:%S] %^%l%$ %v");
  return sink;
}

void install(std::vector<spdlog::sink_ptr> sinks, spdlog::level::level_enum level) {
  auto logger = std::make_shared<spdlog::logger>("dsopen", sinks.begin(), sinks.end());
  logger->set_level(level);
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
}

std::shared_ptr<spdlog::sinks::sink> g_run_file;  // the rank log of setup_run, if any
}  // namespace

void setup_console(const std::string& level) { install({console_sink()}, parse_level(level)); }

void setup_run(const std::string& output_dir, int rank, const std::string& level) {
  const auto lvl = parse_level(level);
  const std::string dir = output_dir + "/logs";
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw runtime_error(dir, "cannot create log directory: " + ec.message(), "check run.output_dir");
  std::vector<spdlog::sink_ptr> sinks;
  if (rank == 0) {
    sinks.push_back(console_sink());
    sinks.back()->set_level(lvl);
  }
  // The rank logs also keep the details (debug: the resolved config, memory counters) the console leaves out.
  const auto file_level = std::min(lvl, spdlog::level::debug);
  auto file = std::make_shared<spdlog::sinks::basic_file_sink_mt>(dir + "/rank_" + std::to_string(rank) + ".log");
  file->set_pattern("[%Y-%m-%d %H:%M:%S.%e] [rank " + std::to_string(rank) + "] %l %v");
  file->set_level(file_level);
  sinks.push_back(file);
  g_run_file = file;
  set_fatal_error_sink(record_fatal_error);
  install(sinks, file_level);
}

void record_fatal_error(const std::string& message) {
  if (!g_run_file) return;
  try {
    g_run_file->log(spdlog::details::log_msg("dsopen", spdlog::level::err, message));
    g_run_file->flush();
  } catch (...) {  // the error is on stderr already; a full disk must not hide it
  }
}

}  // namespace dsopen::logging
