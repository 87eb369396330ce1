#include "model/tile_rows.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <torch/torch.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>

#include "model/gemv.h"
#include "utils/errors.h"

namespace dsopen::model {

namespace {

// Raised whenever the kernels or the probe change what the measurement would say (old cache files then stale).
constexpr int kProbeVersion = 3;
constexpr int64_t kCandidates[] = {64, 128, 256, 512};
constexpr int64_t kShapes[][2] = {{768, 2048}, {2048, 768}};  // {in, out}: an MLP's up and down projections
constexpr double kMargin = 0.95;                              // the tiles must win by 5%: the GEMM is the default

std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos) {
      std::string name = line.substr(line.find(':') + 1);
      name.erase(0, name.find_first_not_of(' '));
      return name;
    }
  return "unknown";
}

std::string cache_key() {
  std::string key = "cpu=" + cpu_model_name() + ";isa=" + gemv_isa() + ";torch=" + TORCH_VERSION +
                    ";probe=" + std::to_string(kProbeVersion);
  // The variables that cap LibTorch's GEMMs to lesser instruction sets change the GEMM side of the crossover.
  for (const char* var : {"ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"})
    if (const char* v = std::getenv(var); v && *v) key += std::string(";") + var + "=" + v;
  return key;
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Seconds per call: the best of three tries of at least 10 ms each, after a warm-up (first calls pay for packing
// and waking threads), so that a moment of contention from another process does not decide.
template <class F>
double best_seconds(F&& f) {
  f();
  double best = 1e30;
  for (int t = 0; t < 3; ++t) {
    const auto start = std::chrono::steady_clock::now();
    int calls = 0;
    double seconds = 0;
    while (seconds < 0.01) {
      f();
      ++calls;
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    best = std::min(best, seconds / calls);
  }
  return best;
}

// Parses the cache file; false when it is not this machine's (key) or not whole.
bool parse_cache(const std::string& path, const std::string& key, TileRows& rows) {
  std::ifstream in(path);
  if (!in) return false;
  bool key_ok = false, f32 = false, bf16 = false;
  for (std::string line; std::getline(in, line);) {
    std::istringstream words(line);
    std::string name;
    words >> name;
    if (name == "key") key_ok = line.substr(4) == key;
    else if (name == "f32") f32 = static_cast<bool>(words >> rows.f32) && rows.f32 >= kTileRowsAlways;
    else if (name == "bf16") bf16 = static_cast<bool>(words >> rows.bf16) && rows.bf16 >= kTileRowsAlways;
  }
  return key_ok && f32 && bf16;
}

bool write_cache(const std::string& path, const std::string& key, const TileRows& rows, std::string& why) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp);
    out << "# Rows up to which the decode step's prompt products run in the GEMV tiles on this machine\n"
        << "# (model/tile_rows.h). Delete this file to measure again.\n"
        << "key " << key << "\n"
        << "f32 " << rows.f32 << "\n"
        << "bf16 " << rows.bf16 << "\n"
        << "# " << rows.source << "\n";
    if (!out.flush()) {
      why = "cannot write " + tmp;
      std::remove(tmp.c_str());
      return false;
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {  // atomic: a reader sees the old file or the whole new one
    why = "cannot rename " + tmp + " to " + path;
    std::remove(tmp.c_str());
    return false;
  }
  return true;
}

// Holds an exclusive flock on `path` while alive (fd -1 when it could not be opened: no lock, still correct).
struct FileLock {
  int fd;
  explicit FileLock(const std::string& path) : fd(::open(path.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644)) {
    if (fd >= 0) ::flock(fd, LOCK_EX);
  }
  ~FileLock() {
    if (fd >= 0) ::close(fd);  // closing releases the lock
  }
};

std::once_flag g_once;
TileRows g_rows;

int64_t parse_env_rows(const char* v) {
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  if (end == v || *end != '\0' || n < 1 || n > (1 << 20))
    throw usage_error("DSOPEN_TILE_ROWS", std::string("'") + v + "' is not a row count",
                      "a whole number such as 64, or unset the variable to use this machine's measured limits");
  return std::max<int64_t>(n, kTileRowsAlways);
}

}  // namespace

std::string dsopen_cache_dir() {
  if (const char* d = std::getenv("DSOPEN_CACHE"); d && *d) return d;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/dsopen";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/dsopen";
  return "";
}

std::string tile_rows_cache_path(const std::string& cache_dir) {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(fnv1a(cache_key())));
  return cache_dir + "/tile-rows-" + hex + ".txt";
}

TileRows measure_tile_rows() {
  torch::NoGradGuard no_grad;
  const int64_t max_rows = kCandidates[std::size(kCandidates) - 1];
  const auto x = torch::randn({max_rows, 2048});
  auto y = torch::empty({max_rows, 2048});
  std::vector<torch::Tensor> w32, w16;
  for (const auto& s : kShapes) {
    w32.push_back(torch::randn({s[1], s[0]}) * 0.02);
    w16.push_back(w32.back().to(torch::kBFloat16));
  }
  TileRows rows;
  std::ostringstream figures;
  figures << "measured with " << at::get_num_threads() << " threads, GFLOP/s tiles/GEMM:";
  for (const bool bf16 : {false, true}) {
    int64_t& limit = bf16 ? rows.bf16 : rows.f32;
    figures << (bf16 ? " bf16" : " f32");
    for (const int64_t R : kCandidates) {
      double tiles = 0, gemm = 0, flops = 0;
      for (size_t s = 0; s < std::size(kShapes); ++s) {
        const int64_t in = kShapes[s][0], out = kShapes[s][1];
        const auto& w = bf16 ? w16[s] : w32[s];
        const auto xs = x.narrow(1, 0, in).narrow(0, 0, R).contiguous();
        auto ys = y.narrow(1, 0, out).narrow(0, 0, R).contiguous();
        tiles += best_seconds([&] { gemv_rows(xs.data_ptr<float>(), R, in, w.data_ptr(), bf16, out, nullptr, ys.data_ptr<float>()); });
        gemm += best_seconds([&] {  // as model/decode_step.cpp's linear() calls it
          if (bf16) ys.copy_(torch::mm(xs.to(torch::kBFloat16), w.t()));
          else torch::mm_out(ys, xs, w.t());
        });
        flops += 2.0 * static_cast<double>(R * in * out);
      }
      char buf[64];
      std::snprintf(buf, sizeof buf, " %lld:%.0f/%.0f", static_cast<long long>(R), flops / tiles / 1e9, flops / gemm / 1e9);
      figures << buf;
      if (tiles > kMargin * gemm) break;
      limit = R;
    }
  }
  rows.source = figures.str();
  return rows;
}

TileRows load_or_measure_tile_rows(const std::string& cache_dir) {
  const std::string key = cache_key(), path = tile_rows_cache_path(cache_dir);
  TileRows rows;
  if (parse_cache(path, key, rows)) {
    rows.source = path;
    return rows;
  }
  std::error_code ec;
  std::filesystem::create_directories(cache_dir, ec);
  FileLock lock(path + ".lock");
  if (parse_cache(path, key, rows)) {  // another process measured while this one waited for the lock
    rows.source = path;
    return rows;
  }
  rows = measure_tile_rows();
  std::string why;
  if (ec) why = "cannot create " + cache_dir + ": " + ec.message();
  else if (write_cache(path, key, rows, why)) {
    spdlog::info("prompt products: measured this machine's GEMV/GEMM crossover ({}), kept in {}", rows.source, path);
    rows.source = path;
    return rows;
  }
  spdlog::warn("prompt products: {}; measured in this process only, so two processes may round prompts "
               "differently (set DSOPEN_CACHE to a writable folder)", why);
  return rows;
}

const TileRows& tile_rows() {
  std::call_once(g_once, [] {
    if (const char* v = std::getenv("DSOPEN_TILE_ROWS"); v && *v) {
      const int64_t n = parse_env_rows(v);
      g_rows = {n, n, "DSOPEN_TILE_ROWS"};
    } else {
      const std::string dir = dsopen_cache_dir();
      g_rows = dir.empty() ? measure_tile_rows() : load_or_measure_tile_rows(dir);
    }
    spdlog::debug("prompt products: GEMV tiles up to {} rows with float32 weights, {} with bfloat16 ({})", g_rows.f32,
                  g_rows.bf16, g_rows.source);
  });
  return g_rows;
}

void set_tile_rows(int64_t f32, int64_t bf16) {
  std::call_once(g_once, [] {});
  g_rows = {std::max(f32, kTileRowsAlways), std::max(bf16, kTileRowsAlways), "set_tile_rows"};
}

}  // namespace dsopen::model
