// Logging: every rank writes its own file under <output_dir>/logs; levels are validated.
#include <catch2/catch.hpp>

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <filesystem>

#include "utils/config.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/logging.h"

using namespace dsopen;
namespace fs = std::filesystem;

TEST_CASE("each rank logs to <output_dir>/logs/rank_N.log", "[utils][logging]") {
  auto dir = fs::temp_directory_path() / ("dsopen_log_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  logging::setup_run(dir.string(), 1, "info");
  spdlog::info("hello from rank one");
  spdlog::debug("details kept in the file");  // the rank log keeps debug whatever the console's level
  spdlog::trace("not shown below debug");
  spdlog::default_logger()->flush();
  const std::string text = env::read_file((dir / "logs" / "rank_1.log").string());
  CHECK(text.find("[rank 1] info hello from rank one") != std::string::npos);
  CHECK(text.find("[rank 1] debug details kept in the file") != std::string::npos);
  CHECK(text.find("not shown") == std::string::npos);
  logging::setup_console("warn");
  fs::remove_all(dir);
}

TEST_CASE("an unknown log level is a usage error naming the key", "[utils][logging]") {
  try {
    logging::parse_level("verbose");
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(e.exit_code() == 2);
    CHECK(std::string(e.what()).find("run.log_level: unknown log level 'verbose'") != std::string::npos);
  }
}
