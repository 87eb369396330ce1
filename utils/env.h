// Process environment: environment variables, thread count, terminal detection, files written atomically.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

namespace dsopen::env {

// The integer value of environment variable `name`, or `fallback` when unset; a usage error when not a number.
long long get_int(const char* name, long long fallback);
std::string get_string(const char* name, const std::string& fallback = "");

// Number of logical CPUs available to this process: the affinity mask bounded by the cgroup CPU quota
// (cpu::usable_cpus).
int available_cpus();

// Sets LibTorch's intra-op thread count; `n <= 0` means all available CPUs. LibTorch counts physical cores by
// default, which leaves half of a hyper-threaded machine idle. Returns the count set.
// More threads than kMaxThreads, or a negative count, is a usage error naming `flag`.
inline constexpr int kMaxThreads = 1024;
int configure_threads(int n, const std::string& flag = "--threads");

// Writes `contents` to `path` through a temporary file, fsync and rename, so readers never see half a file.
void write_file_atomic(const std::string& path, const std::string& contents);

// The same for a file assembled from pieces (a header, then tensor bytes), written in order without a joined copy.
struct Bytes {
  const void* data;
  size_t size;
};
// `on_written` (optional) hears the bytes written so far, at least every 64 MiB, for progress lines.
void write_file_atomic(const std::string& path, const std::vector<Bytes>& pieces,
                       const std::function<void(size_t written)>& on_written = {});

// The same written piece by piece over time (a file larger than memory, produced as it goes): write() appends,
// commit() fsyncs and renames into place. Destroyed without commit(), the temporary file is removed and `path` is
// untouched.
class AtomicFile {
public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const Bytes& piece, const std::function<void(size_t written)>& on_written = {});
  void commit();
  size_t written() const { return written_; }

private:
  std::string path_, tmp_;
  int fd_ = -1;
  size_t written_ = 0;
};

// Resident memory of this process in MB: now (/proc/self/statm; 0 where that does not exist) and its peak so far
// (getrusage).
double resident_mb();
double peak_resident_mb();

// Host memory this process can still allocate: the smaller of /proc/meminfo's MemAvailable and the cgroup's limit
// minus its usage (cgroup v2 memory.max - memory.current; v1 memory.limit_in_bytes - memory.usage_in_bytes).
// bytes 0: unknown (no /proc); `source` says which bound applied.
struct MemoryBudget {
  int64_t bytes = 0;
  std::string source;
};
MemoryBudget host_memory_budget();

// Reads a whole file; a runtime error naming the file when it cannot be read.
std::string read_file(const std::string& path);

// True when `inner` is `outer` or lies inside the directory `outer`, after resolving symlinks and `..` (the
// existing part of each path; the rest compares as written).
bool path_within(const std::string& inner, const std::string& outer);

// What an output path names: one file, a directory of files (a model export), or the prefix of a file set
// (token shards PREFIX_00000.bin ...).
enum class OutputKind { File, Directory, Prefix };

// Refuses, before any work, an output path (usage error naming `flag`) that would damage what is read or what is
// there: an empty path; one that is one of `inputs` or lies inside an input directory (it would overwrite what is
// being read, or be read back as input by the next run); for a File, an existing directory or a non-regular file (a
// device, pipe or socket); for a Directory, an existing file, a directory that contains an input, or a non-empty
// directory that is not a model directory (no config.json: an earlier export is replaced, anything else is not
// written into). Paths are compared after resolving symlinks and `..`; inputs that do not exist are ignored (their
// own error comes later).
void check_output_path(const std::string& output, OutputKind kind, const std::vector<std::string>& inputs,
                       const std::string& flag);

}  // namespace dsopen::env
