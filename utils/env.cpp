#include "utils/env.h"

#include "utils/cpu.h"

#include <algorithm>

#include <fcntl.h>
#include <sched.h>
#include <sys/resource.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "utils/errors.h"

namespace dsopen::env {

long long get_int(const char* name, long long fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long long x = std::strtoll(v, &end, 10);
  if (*end != '\0') throw usage_error(std::string("environment variable ") + name, "expected an integer, got '" + std::string(v) + "'");
  return x;
}

std::string get_string(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::string(v) : fallback;
}

int available_cpus() { return cpu::usable_cpus(); }

int configure_threads(int n, const std::string& flag) {
  if (n < 0 || n > kMaxThreads)
    throw usage_error(flag, std::to_string(n) + " is outside 0.." + std::to_string(kMaxThreads), "0 means every CPU");
  if (n == 0) n = available_cpus();
  torch::set_num_threads(n);
  return n;
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  write_file_atomic(path, std::vector<Bytes>{{contents.data(), contents.size()}});
}

void write_file_atomic(const std::string& path, const std::vector<Bytes>& pieces,
                       const std::function<void(size_t written)>& on_written) {
  AtomicFile file(path);
  for (const Bytes& piece : pieces) file.write(piece, on_written);
  file.commit();
}

AtomicFile::AtomicFile(const std::string& path) : path_(path), tmp_(path + ".tmp." + std::to_string(getpid())) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (status.type() == std::filesystem::file_type::directory)
    throw runtime_error(path, "is a directory, not a file", "give the path of the file to write");
  // Renaming over a device or pipe would replace it (a /dev node among them).
  if (std::filesystem::exists(status) && status.type() != std::filesystem::file_type::regular)
    throw runtime_error(path, "is not a regular file (a device, pipe or socket)", "give the path of a file");
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd_ < 0) throw runtime_error(path, "cannot create file", "check the directory exists and is writable");
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
}

void AtomicFile::write(const Bytes& piece, const std::function<void(size_t written)>& on_written) {
  if (fd_ < 0) throw std::logic_error("AtomicFile::write after commit");
  const char* c = static_cast<const char*>(piece.data);
  size_t n = piece.size;
  while (n > 0) {
    const ssize_t w = ::write(fd_, c, std::min<size_t>(n, size_t(64) << 20));
    if (w <= 0) throw runtime_error(path_, "write failed (disk full?)");  // the destructor removes the temporary
    c += w, n -= static_cast<size_t>(w);
    written_ += static_cast<size_t>(w);
    if (on_written) on_written(written_);
  }
}

void AtomicFile::commit() {
  const int fd = fd_;
  fd_ = -1;
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp_.c_str());
    throw runtime_error(path_, "fsync failed");
  }
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    ::unlink(tmp_.c_str());
    throw runtime_error(path_, "rename into place failed");
  }
}

namespace {
// The first number in a file (cgroup files hold one; "max" means no limit): -1 when absent or not a number.
int64_t number_in(const std::string& path) {
  std::ifstream f(path);
  std::string word;
  if (!(f >> word)) return -1;
  try {
    size_t used = 0;
    const long long v = std::stoll(word, &used);
    return used == word.size() ? v : -1;
  } catch (const std::exception&) {
    return -1;
  }
}
}  // namespace

MemoryBudget host_memory_budget() {
  MemoryBudget b;
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  long long kb = 0;
  std::string unit;
  while (meminfo >> key >> kb >> unit)
    if (key == "MemAvailable:") {
      b.bytes = static_cast<int64_t>(kb) * 1024;
      b.source = "MemAvailable";
      break;
    }
  auto bound = [&](int64_t limit, int64_t usage, const char* source) {
    // Limits near 2^63 mean "none" (cgroup v1 writes the page-rounded maximum).
    if (limit <= 0 || limit > (int64_t{1} << 60) || usage < 0) return;
    const int64_t left = std::max<int64_t>(limit - usage, 0);
    if (b.bytes == 0 || left < b.bytes) b.bytes = left, b.source = source;
  };
  bound(number_in("/sys/fs/cgroup/memory.max"), number_in("/sys/fs/cgroup/memory.current"), "cgroup memory.max");
  bound(number_in("/sys/fs/cgroup/memory/memory.limit_in_bytes"), number_in("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        "cgroup memory.limit_in_bytes");
  return b;
}

double resident_mb() {
  std::ifstream statm("/proc/self/statm");
  long long pages = 0, resident = 0;
  if (!(statm >> pages >> resident)) return 0;
  return static_cast<double>(resident) * static_cast<double>(::sysconf(_SC_PAGESIZE)) / (1 << 20);
}

double peak_resident_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;  // Linux reports KiB
}

std::string read_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (status.type() == fs::file_type::directory) throw runtime_error(path, "is a directory, not a file", "give the file's path");
  // A pipe or device would block or never end: inputs are files.
  if (fs::exists(status) && status.type() != fs::file_type::regular)
    throw runtime_error(path, "is not a regular file (a pipe, device or socket)", "give the path of a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw runtime_error(path, "cannot open file", "check the path");
  std::ostringstream ss;
  try {
    ss << in.rdbuf();
  } catch (const std::exception&) {
    in.setstate(std::ios::badbit);
  }
  if (in.bad() || ss.bad()) throw runtime_error(path, "read failed", "check the file and the disk");
  return ss.str();
}

bool path_within(const std::string& inner, const std::string& outer) {
  namespace fs = std::filesystem;
  std::error_code ec;
  // weakly_canonical resolves the existing part of the path, so a not-yet-written output compares too.
  const fs::path in = fs::weakly_canonical(fs::absolute(inner), ec);
  if (ec) return false;
  const fs::path out = fs::weakly_canonical(fs::absolute(outer), ec);
  if (ec) return false;
  const auto rel = in.lexically_relative(out);
  return !rel.empty() && *rel.begin() != "..";
}

void check_output_path(const std::string& output, OutputKind kind, const std::vector<std::string>& inputs,
                       const std::string& flag) {
  namespace fs = std::filesystem;
  if (output.empty()) throw usage_error(flag, "is empty", "give a path");
  std::error_code ec;
  const auto canonical = [&](const std::string& p) { return fs::weakly_canonical(fs::absolute(p), ec); };
  for (const auto& input : inputs) {
    if (input.empty() || !fs::exists(input, ec)) continue;
    if (path_within(output, input)) {
      const bool same = canonical(output) == canonical(input);
      throw usage_error(flag, output + (same ? " is the input " : " is inside the input directory ") + input,
                        "write the output somewhere outside the inputs");
    }
    if (kind == OutputKind::Directory && path_within(input, output))
      throw usage_error(flag, output + " contains the input " + input, "write the output somewhere outside the inputs");
  }
  // The nearest existing directory on the way must take new files (a read-only place fails now, not after the work).
  fs::path existing = fs::absolute(output).parent_path();
  while (!existing.empty() && !fs::exists(existing, ec) && existing != existing.parent_path()) existing = existing.parent_path();
  if (fs::is_directory(existing, ec) && ::access(existing.c_str(), W_OK) != 0)
    throw usage_error(flag, existing.string() + " is not writable", "write the output somewhere you may create files");
  const auto status = fs::status(output, ec);
  if (!fs::exists(status)) return;
  if (kind == OutputKind::Directory) {
    if (status.type() != fs::file_type::directory)
      throw usage_error(flag, output + " exists and is not a directory", "give a new directory");
    if (!fs::is_empty(output, ec) && !fs::exists(fs::path(output) / "config.json", ec))
      throw usage_error(flag, output + " already holds other files and is not a model directory",
                        "give a new or empty directory (an earlier export there is replaced)");
    return;
  }
  if (status.type() == fs::file_type::directory)
    throw usage_error(flag, output + " is a directory", "give the path of the file to write");
  if (status.type() != fs::file_type::regular)
    throw usage_error(flag, output + " is not a regular file (a device, pipe or socket)", "give the path of a file");
}

}  // namespace dsopen::env
