// Small utilities: error formatting and exit codes, atomic writes, metrics lines, closest-match suggestions.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "utils/config.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/metrics.h"
#include "utils/progress.h"

#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <sstream>
#include <thread>

using namespace dsopen;
namespace fs = std::filesystem;

TEST_CASE("errors carry where, what and hint; usage errors exit 2, runtime errors 1", "[utils]") {
  Error u = usage_error("a.yaml:3", "bad", "fix it");
  CHECK(std::string(u.what()) == "a.yaml:3: bad (fix it)");
  CHECK(u.exit_code() == 2);
  CHECK(runtime_error("f.bin", "truncated").exit_code() == 1);
  auto body = [](int, char**) -> int { throw runtime_error("x", "boom"); };
  CHECK(run_main("prog", body, 0, nullptr) == 1);
}

TEST_CASE("closest_match suggests plausible typos only", "[utils]") {
  const std::vector<std::string> keys{"lr", "min_lr", "max_steps", "warmup_steps"};
  CHECK(config::closest_match("lrr", keys) == "lr");
  CHECK(config::closest_match("max_step", keys) == "max_steps");
  CHECK(config::closest_match("completely_different", keys).empty());
}

TEST_CASE("write_file_atomic replaces whole files and leaves no temp file", "[utils]") {
  auto dir = fs::temp_directory_path() / ("dsopen_atomic_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto path = (dir / "f.txt").string();
  env::write_file_atomic(path, "first");
  env::write_file_atomic(path, "second");
  CHECK(env::read_file(path) == "second");
  int files = 0;
  for (auto& e : fs::directory_iterator(dir)) (void)e, ++files;
  CHECK(files == 1);
  CHECK_THROWS_AS(env::write_file_atomic((dir / "missing" / "f").string(), "x"), Error);
  fs::remove_all(dir);
}

TEST_CASE("metrics are JSON lines, appended", "[utils]") {
  auto path = (fs::temp_directory_path() / ("dsopen_metrics_" + std::to_string(::getpid()) + ".jsonl")).string();
  fs::remove(path);
  {
    MetricsWriter w(path);
    w.write({{"step", 1}, {"loss", 2.5}});
  }
  {
    MetricsWriter w(path);  // a resumed run continues the file
    w.write({{"step", 2}, {"loss", 2.0}});
  }
  std::ifstream in(path);
  std::string line;
  std::vector<nlohmann::json> rows;
  while (std::getline(in, line)) rows.push_back(nlohmann::json::parse(line));
  REQUIRE(rows.size() == 2);
  CHECK(rows[1]["step"] == 2);
  CHECK(rows[0]["loss"] == 2.5);
  fs::remove(path);
}

TEST_CASE("durations format for ETAs", "[utils]") {
  CHECK(Progress::format_duration(5) == "5s");
  CHECK(Progress::format_duration(125) == "2m05s");
  CHECK(Progress::format_duration(3720) == "1h02m");
}

TEST_CASE("progress lines: bytes in binary units, short quiet work silent, long quiet work reported", "[utils]") {
  // spdlog's default logger captured in a string (stderr is not a terminal under ctest: plain log lines).
  std::ostringstream captured;
  auto previous = spdlog::default_logger();
  auto logger = std::make_shared<spdlog::logger>("capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(captured));
  logger->set_pattern("%v");
  spdlog::set_default_logger(logger);
  {
    Progress p("writing x", 3 << 20, "B", 30.0, /*quiet_below_s=*/2.0);
    p.update(1 << 20);
    p.finish();
  }
  CHECK(captured.str().empty());  // a fast checkpoint save prints nothing
  {
    Progress p("writing y", int64_t(3) << 30, "B", 30.0, /*quiet_below_s=*/0.05);
    std::this_thread::sleep_for(std::chrono::milliseconds(80));
    p.update(int64_t(3) << 29);  // past the quiet time: the first line comes at once
    p.finish();
  }
  const std::string text = captured.str();
  INFO(text);
  CHECK(text.find("writing y 1.5 GiB/3.0 GiB (50%)") != std::string::npos);
  CHECK(text.find("done in") != std::string::npos);
  captured.str("");
  {
    Progress p("batches", 10, "batches");  // not quiet: the closing line always
    p.update(10);
    p.finish();
  }
  CHECK(captured.str().find("batches 10/10 (100%)") != std::string::npos);
  spdlog::set_default_logger(previous);
}

TEST_CASE("environment integers are validated", "[utils]") {
  ::setenv("DSOPEN_TEST_INT", "12", 1);
  CHECK(env::get_int("DSOPEN_TEST_INT", 0) == 12);
  ::setenv("DSOPEN_TEST_INT", "x1", 1);
  CHECK_THROWS_AS(env::get_int("DSOPEN_TEST_INT", 0), Error);
  CHECK(env::get_int("DSOPEN_TEST_UNSET_VAR", 7) == 7);
}
