#include "utils/cpu.h"

#include <dirent.h>
#include <sched.h>
#include <unistd.h>

#include <ATen/Parallel.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <tuple>

namespace dsopen::cpu {

namespace {

// The first two numbers of a file ("max 100000" reads as -1, 100000); {-1, -1} when absent.
std::pair<double, double> two_numbers(const char* path) {
  std::ifstream f(path);
  std::string a, b;
  if (!(f >> a)) return {-1, -1};
  f >> b;
  auto num = [](const std::string& s) {
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    return end && *end == '\0' && !s.empty() ? v : -1.0;
  };
  return {num(a), num(b)};
}

double read_run_delay_s() {
  DIR* d = ::opendir("/proc/self/task");
  if (!d) return -1;
  double total = 0;
  bool any = false;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream f(std::string("/proc/self/task/") + e->d_name + "/schedstat");
    double cpu_ns = 0, wait_ns = 0;
    if (f >> cpu_ns >> wait_ns) total += wait_ns * 1e-9, any = true;
  }
  ::closedir(d);
  return any ? total : -1;
}

}  // namespace

int usable_cpus() {
  int n = 0;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) n = static_cast<int>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
  double quota = -1, period = -1;
  std::tie(quota, period) = two_numbers("/sys/fs/cgroup/cpu.max");  // v2: "QUOTA PERIOD" or "max PERIOD"
  if (quota <= 0) {                                                    // v1
    quota = two_numbers("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").first;
    period = two_numbers("/sys/fs/cgroup/cpu/cpu.cfs_period_us").first;
  }
  if (quota > 0 && period > 0) n = std::min(n, std::max(1, static_cast<int>(std::ceil(quota / period))));
  return n;
}

std::string omp_wait_policy() {
  const char* p = std::getenv("OMP_WAIT_POLICY");
  if (std::getenv("GOMP_SPINCOUNT")) return std::string("GOMP_SPINCOUNT=") + std::getenv("GOMP_SPINCOUNT");
  return p ? p : "default";
}

ContentionMeter::ContentionMeter() { reset(); }

void ContentionMeter::reset() {
  run_delay_s_ = read_run_delay_s();
  start_ = std::chrono::steady_clock::now();
}

double ContentionMeter::waited_share(int threads) const {
  const double now = read_run_delay_s();
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (now < 0 || run_delay_s_ < 0 || wall <= 0 || threads < 1) return -1;
  return (now - run_delay_s_) / (wall * threads);
}


}  // namespace dsopen::cpu

namespace dsopen::cpu {

void ThreadBackoff::step() {
  const int threads = at::get_num_threads();
  if (full_ == 0) full_ = threads;
  if (++steps_ % every_ != 0) return;
  const double share = meter_.waited_share(threads);
  meter_.reset();
  if (share >= 0.25 && threads > 1) {
    at::set_num_threads(threads / 2);
    if (probing_) probe_after_ = std::min(probe_after_ * 2, 1024);  // still busy: wait longer before the next try
    probing_ = false;
    checks_since_ = 0;
    if (!warned_)
      spdlog::warn("the CPUs are busy with other work: {} threads waited {:.0f}% of the time for a CPU, so {} goes on "
                   "with {} thread(s) and tries {} again later", threads, 100 * share, what_, threads / 2, full_);
    else
      spdlog::debug("{}: {} threads waited {:.0f}% of the time; now {}", what_, threads, 100 * share, threads / 2);
    warned_ = true;
    return;
  }
  if (probing_) {  // the full count ran without waiting: the other work is gone
    probing_ = false;
    probe_after_ = 8;
    spdlog::info("the CPUs are free again: {} back on {} threads", what_, threads);
    return;
  }
  if (threads < full_ && ++checks_since_ >= probe_after_) {
    at::set_num_threads(full_);
    probing_ = true;
    checks_since_ = 0;
  }
}

}  // namespace dsopen::cpu
