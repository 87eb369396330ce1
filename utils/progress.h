// A progress reporter for long loops: an in-place line (done/total, rate, ETA) when stderr is a terminal,
// plain log lines every `plain_every_s` seconds otherwise, so logs of batch jobs stay readable. With the unit "B"
// counts print as KiB/MiB/GiB. `quiet_below_s` > 0 keeps short work silent (checkpoint saves of a small model):
// nothing prints until that many seconds have passed, and the closing line only when something was shown.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace dsopen {

class Progress {
public:
  Progress(std::string label, int64_t total, std::string unit = "it", double plain_every_s = 30.0,
           double quiet_below_s = 0.0);
  ~Progress();

  // Reports `done` units finished so far (absolute, not a delta).
  void update(int64_t done);
  // Reports `delta` more units finished.
  void advance(int64_t delta) { update(done_ + delta); }
  // Prints the final line (total time and average rate).
  void finish();

  // "1h02m", "3m05s", "12s": ETA and duration formatting shared by the trainer's log lines.
  static std::string format_duration(double seconds);

private:
  std::string line(int64_t done, double elapsed) const;

  std::string label_, unit_;
  int64_t total_, done_ = 0;
  double plain_every_s_, quiet_below_s_;
  bool tty_, finished_ = false, shown_ = false;
  std::chrono::steady_clock::time_point start_, last_print_;
};

}  // namespace dsopen
