// Sharing the CPU well: how many CPUs this process may really use, how long its threads waited for CPUs that other
// processes held, and backing off to fewer threads when that wait says the machine is oversubscribed.
//
// Why: LibTorch's OpenMP workers spin at barriers. On a quiet machine that saves a wake-up per parallel region
// (passive waiting, OMP_WAIT_POLICY=PASSIVE, cost 3x in decode speed there); on a machine where other processes
// keep the same cores busy, a spinning worker burns the time slice the thread it waits for needs, and decoding
// with two threads fell several-fold below one thread. So the threads stay, and work that sees the wait backs off.
#pragma once

#include <chrono>
#include <string>

namespace dsopen::cpu {

// CPUs this process may run on at once: the affinity mask (taskset, cpusets) bounded by the cgroup CPU quota
// (v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us), rounded up; at least 1.
int usable_cpus();

// The OpenMP wait policy in effect: the OMP_WAIT_POLICY value, "GOMP_SPINCOUNT=N", or "default".
std::string omp_wait_policy();

// Time this process's threads spent runnable but not running (waiting for a CPU), from /proc/self/task/*/schedstat.
// Measured over a stretch of work: waited_share() is that wait divided by (wall time x threads),
// 0 on a quiet machine, towards 1 when other processes hold the CPUs; negative where the kernel does not report it.
class ContentionMeter {
public:
  ContentionMeter();
  // Waiting share since construction or the last reset(), for `threads` threads of work.
  double waited_share(int threads) const;
  void reset();

private:
  double run_delay_s_;
  std::chrono::steady_clock::time_point start_;
};

// For a loop of parallel steps (decoding tokens, training steps): every `every` steps, when LibTorch's threads waited
// for a CPU a quarter of the time or more, halves their number (down to 1), saying so once. Other processes come and
// go, so after a while it tries the full count again (after 8 checks, then 16, 32, ... while the wait persists).
// A quiet machine never triggers it.
class ThreadBackoff {
public:
  explicit ThreadBackoff(std::string what, int every = 16) : what_(std::move(what)), every_(every) {}
  void step();

private:
  std::string what_;
  int every_, steps_ = 0;
  int full_ = 0;                 // the thread count the work started with
  int checks_since_ = 0, probe_after_ = 8;
  bool probing_ = false, warned_ = false;
  ContentionMeter meter_;
};

}  // namespace dsopen::cpu
