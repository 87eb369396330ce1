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

TEST_CASE("environment integers are validated", "[utils]") {
  ::setenv("DSOPEN_TEST_INT", "12", 1);
  CHECK(env::get_int("DSOPEN_TEST_INT", 0) == 12);
  ::setenv("DSOPEN_TEST_INT", "x1", 1);
  CHECK_THROWS_AS(env::get_int("DSOPEN_TEST_INT", 0), Error);
  CHECK(env::get_int("DSOPEN_TEST_UNSET_VAR", 7) == 7);
}
