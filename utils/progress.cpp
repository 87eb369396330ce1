#include "utils/progress.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cstdio>

namespace dsopen {

Progress::Progress(std::string label, int64_t total, std::string unit, double plain_every_s, double quiet_below_s)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), plain_every_s_(plain_every_s),
      quiet_below_s_(quiet_below_s), tty_(isatty(STDERR_FILENO) != 0), start_(std::chrono::steady_clock::now()), last_print_(start_) {}

Progress::~Progress() {
  if (!finished_ && tty_ && shown_) std::fputc('\n', stderr);
}

std::string Progress::format_duration(double s) {
  if (s < 0 || s != s) return "?";
  char buf[32];
  long t = static_cast<long>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
  else if (t >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

namespace {
// Bytes in the largest binary unit that keeps the number at least 1 ("512 B", "3.2 MiB").
std::string bytes_str(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) b /= 1024, ++u;
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", b, units[u]);
  return buf;
}
}  // namespace

std::string Progress::line(int64_t done, double elapsed) const {
  const double rate = elapsed > 0 ? done / elapsed : 0.0;
  char buf[256];
  if (unit_ == "B") {
    const double eta = rate > 0 && total_ > 0 ? (total_ - done) / rate : -1;
    if (total_ > 0)
      std::snprintf(buf, sizeof buf, "%s %s/%s (%.0f%%) %s/s ETA %s", label_.c_str(), bytes_str(done).c_str(),
                    bytes_str(total_).c_str(), 100.0 * done / total_, bytes_str(rate).c_str(), format_duration(eta).c_str());
    else
      std::snprintf(buf, sizeof buf, "%s %s, %s/s", label_.c_str(), bytes_str(done).c_str(), bytes_str(rate).c_str());
  } else if (total_ > 0) {
    const double eta = rate > 0 ? (total_ - done) / rate : -1;
    std::snprintf(buf, sizeof buf, "%s %lld/%lld (%.0f%%) %.1f %s/s ETA %s", label_.c_str(),
                  static_cast<long long>(done), static_cast<long long>(total_), 100.0 * done / total_, rate,
                  unit_.c_str(), format_duration(eta).c_str());
  } else {
    std::snprintf(buf, sizeof buf, "%s %lld %s, %.1f %s/s", label_.c_str(), static_cast<long long>(done),
                  unit_.c_str(), rate, unit_.c_str());
  }
  return buf;
}

void Progress::update(int64_t done) {
  done_ = done;
  const auto now = std::chrono::steady_clock::now();
  const double since = std::chrono::duration<double>(now - last_print_).count();
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  if (elapsed < quiet_below_s_) return;
  if (tty_ && since >= 0.2) {
    shown_ = true;
    std::fprintf(stderr, "\r\033[K%s", line(done, elapsed).c_str());
    std::fflush(stderr);
    last_print_ = now;
  } else if (!tty_ && (since >= plain_every_s_ || (!shown_ && quiet_below_s_ > 0))) {
    shown_ = true;
    spdlog::info("{}", line(done, elapsed));
    last_print_ = now;
  }
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (quiet_below_s_ > 0 && !shown_ && elapsed < quiet_below_s_) return;
  if (tty_ && shown_) std::fprintf(stderr, "\r\033[K");
  spdlog::info("{} done in {}", line(done_, elapsed), format_duration(elapsed));
}

}  // namespace dsopen
