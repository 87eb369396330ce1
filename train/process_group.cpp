#include "train/process_group.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if defined(USE_C10D_NCCL)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <cstdlib>

#include "utils/errors.h"

namespace dsopen::train {

namespace {

const char* env_or_null(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

int env_int(const char* name, int fallback, int min_value) {
  const char* v = env_or_null(name);
  if (!v) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < min_value || x > 1 << 20)
    throw usage_error(std::string("environment variable ") + name, std::string("'") + v + "' is not a valid number",
                      "unset it or start the job with scripts/launch.sh");
  return static_cast<int>(x);
}

// Slurm's node lists look like "node[01-04],other"; the first host name is the first node.
std::string first_slurm_host(const std::string& list) {
  std::string host;
  for (char c : list) {
    if (c == ',' || c == '[') break;
    host += c;
  }
  const auto bracket = list.find('[');
  if (bracket != std::string::npos && host.size() == bracket) {
    std::string first;
    for (size_t i = bracket + 1; i < list.size() && std::isdigit(static_cast<unsigned char>(list[i])); ++i) first += list[i];
    host += first;
  }
  return host;
}

// Identity collectives for a world of one.
class SingleProcessGroup final : public ProcessGroup {
public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "none"; }
  torch::Device device() const override { return torch::kCPU; }
  PendingWork all_reduce_sum(torch::Tensor) override { return {}; }
  PendingWork reduce_scatter_sum(torch::Tensor out, torch::Tensor in) override {
    if (!out.is_same(in)) out.copy_(in.view_as(out));
    return {};
  }
  PendingWork all_gather(torch::Tensor out, torch::Tensor in) override {
    out.copy_(in.view_as(out));
    return {};
  }
  PendingWork broadcast(torch::Tensor, int) override { return {}; }
  PendingWork all_to_all(torch::Tensor out, torch::Tensor in, const std::vector<int64_t>&,
                         const std::vector<int64_t>&) override {
    if (!out.is_same(in)) out.copy_(in.view_as(out));
    return {};
  }
  void barrier() override {}
  std::shared_ptr<ProcessGroup> subgroup(const std::vector<int>& ranks, const std::string&) override {
    if (ranks != std::vector<int>{0}) throw std::invalid_argument("subgroup: ranks outside a world of one");
    return std::make_shared<SingleProcessGroup>();
  }
};

// Gloo on CPU or NCCL on `device` over `store`, for `rank` of `size`.
c10::intrusive_ptr<c10d::Backend> make_backend(const std::string& backend, const c10::intrusive_ptr<c10d::Store>& store,
                                               int rank, int size, const std::string& master_addr,
                                               std::chrono::seconds timeout) {
  if (backend == "gloo") {
    auto o = c10d::ProcessGroupGloo::Options::create(timeout);
    // Gloo binds to the interface that reaches the master; on one machine that is loopback.
    o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(master_addr));
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, o);
  }
  if (backend == "nccl") {
#if defined(USE_C10D_NCCL)
    auto o = c10d::ProcessGroupNCCL::Options::create();
    o->timeout = timeout;
    return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, o);
#else
    throw usage_error("parallel.backend", "this build of LibTorch has no NCCL", "use gloo");
#endif
  }
  throw usage_error("parallel.backend", "unknown backend '" + backend + "'", "use auto, gloo or nccl");
}

class C10dProcessGroup final : public ProcessGroup {
public:
  C10dProcessGroup(c10::intrusive_ptr<c10d::Store> store, c10::intrusive_ptr<c10d::Backend> backend, int rank,
                   int size, std::string name, torch::Device device, std::string master_addr, std::chrono::seconds timeout)
      : store_(std::move(store)), backend_(std::move(backend)), rank_(rank), size_(size), name_(std::move(name)),
        device_(device), master_addr_(std::move(master_addr)), timeout_(timeout) {}

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return name_; }
  torch::Device device() const override { return device_; }

  PendingWork all_reduce_sum(torch::Tensor t) override {
    std::vector<at::Tensor> ts{t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    return wrap(backend_->allreduce(ts, o), "all_reduce");
  }
  PendingWork reduce_scatter_sum(torch::Tensor out, torch::Tensor in) override {
    c10d::ReduceScatterOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    return wrap(backend_->_reduce_scatter_base(out, in, o), "reduce_scatter");
  }
  PendingWork all_gather(torch::Tensor out, torch::Tensor in) override {
    return wrap(backend_->_allgather_base(out, in, c10d::AllgatherOptions()), "all_gather");
  }
  PendingWork broadcast(torch::Tensor t, int root) override {
    std::vector<at::Tensor> ts{t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    return wrap(backend_->broadcast(ts, o), "broadcast");
  }
  PendingWork all_to_all(torch::Tensor out, torch::Tensor in, const std::vector<int64_t>& out_splits,
                         const std::vector<int64_t>& in_splits) override {
    std::vector<int64_t> os = out_splits, is = in_splits;
    return wrap(backend_->alltoall_base(out, in, os, is, c10d::AllToAllOptions()), "all_to_all");
  }
  std::shared_ptr<ProcessGroup> subgroup(const std::vector<int>& ranks, const std::string& name) override {
    const auto it = std::find(ranks.begin(), ranks.end(), rank_);
    if (it == ranks.end() || !std::is_sorted(ranks.begin(), ranks.end()) || ranks.back() >= size_)
      throw std::invalid_argument("subgroup: rank " + std::to_string(rank_) + " is not a member of group " + name);
    if (ranks.size() == 1) return std::make_shared<SingleProcessGroup>();
    const int rank = static_cast<int>(it - ranks.begin()), size = static_cast<int>(ranks.size());
    auto store = c10::make_intrusive<c10d::PrefixStore>("dsopen/" + name, store_);
    return std::make_shared<C10dProcessGroup>(store, make_backend(name_, store, rank, size, master_addr_, timeout_), rank,
                                              size, name_, device_, master_addr_, timeout_);
  }
  void barrier() override {
    // An all-reduce of one value is a barrier on every backend without NCCL's device guessing.
    auto t = torch::zeros({1}, torch::TensorOptions().device(device_));
    all_reduce_sum(t).wait();
  }

private:
  PendingWork wrap(c10::intrusive_ptr<c10d::Work> work, const char* op) {
    // The inputs stay alive inside the work object until it is waited on.
    return PendingWork([work, what = name_ + " " + op + " over " + std::to_string(size_) + " ranks"]() {
      try {
        work->wait();
      } catch (const std::exception& e) {
        throw runtime_error("parallel", what + " failed: " + std::string(e.what()).substr(0, 300),
                            "another rank died or parallel.timeout_s passed; see that rank's log");
      }
    });
  }

  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::Backend> backend_;
  int rank_, size_;
  std::string name_;
  torch::Device device_;
  std::string master_addr_;
  std::chrono::seconds timeout_;
};

}  // namespace

void PendingWork::wait() {
  if (wait_) {
    auto w = std::move(wait_);
    wait_ = nullptr;
    w();
  }
}

double ProcessGroup::all_reduce_sum(double value) {
  if (size() == 1) return value;
  auto t = torch::tensor({value}, torch::kFloat64).to(device());
  all_reduce_sum(t).wait();
  return t.item<double>();
}

bool ProcessGroup::all_ranks_agree(bool value) {
  return all_reduce_sum(value ? 0.0 : 1.0) == 0.0;
}

DistEnv read_dist_env() {
  DistEnv e;
  if (env_or_null("RANK") || env_or_null("WORLD_SIZE")) {
    e.source = "launcher";
    if (!env_or_null("RANK") || !env_or_null("WORLD_SIZE"))
      throw usage_error("environment", "RANK and WORLD_SIZE must be set together", "start the job with scripts/launch.sh");
    e.rank = env_int("RANK", 0, 0);
    e.world_size = env_int("WORLD_SIZE", 1, 1);
    e.local_rank = env_int("LOCAL_RANK", e.rank, 0);
    e.local_world_size = env_int("LOCAL_WORLD_SIZE", e.world_size, 1);
  } else if (env_or_null("SLURM_PROCID") && env_or_null("SLURM_NTASKS")) {
    e.source = "slurm";
    e.rank = env_int("SLURM_PROCID", 0, 0);
    e.world_size = env_int("SLURM_NTASKS", 1, 1);
    e.local_rank = env_int("SLURM_LOCALID", 0, 0);
    // SLURM_NTASKS_PER_NODE may read "4(x2)"; the leading number is what a homogeneous job has per node.
    const char* per_node = env_or_null("SLURM_NTASKS_PER_NODE");
    e.local_world_size = per_node ? std::max(1, std::atoi(per_node)) : e.world_size;
    if (const char* nodes = env_or_null("SLURM_JOB_NODELIST")) e.master_addr = first_slurm_host(nodes);
  }
  if (const char* addr = env_or_null("MASTER_ADDR")) e.master_addr = addr;
  e.master_port = env_int("MASTER_PORT", 29500, 1);
  if (e.master_port > 65535) throw usage_error("environment variable MASTER_PORT", "must be at most 65535");
  if (e.rank >= e.world_size)
    throw usage_error("environment variable RANK", std::to_string(e.rank) + " is not below WORLD_SIZE " +
                                                       std::to_string(e.world_size));
  if (e.local_rank >= e.local_world_size)
    throw usage_error("environment variable LOCAL_RANK", std::to_string(e.local_rank) +
                                                             " is not below LOCAL_WORLD_SIZE " +
                                                             std::to_string(e.local_world_size));
  return e;
}

std::shared_ptr<ProcessGroup> create_process_group(const DistEnv& env, torch::Device device,
                                                   const ProcessGroupOptions& options) {
  if (env.world_size == 1) return std::make_shared<SingleProcessGroup>();
  std::string backend = options.backend;
  if (backend == "auto") backend = device.is_cuda() ? "nccl" : "gloo";
  if (backend == "nccl" && !device.is_cuda())
    throw usage_error("parallel.backend", "nccl needs CUDA tensors but this run is on the CPU", "use gloo or auto");

  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(env.master_port);
  so.isServer = env.rank == 0;
  so.numWorkers = env.world_size;
  so.waitWorkers = true;
  so.timeout = options.timeout;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
  } catch (const std::exception& e) {
    throw runtime_error("rendezvous " + env.master_addr + ":" + std::to_string(env.master_port),
                        std::string(e.what()).substr(0, 300),
                        "check MASTER_ADDR/MASTER_PORT, that the port is free, and that every rank was started");
  }

  auto pg = make_backend(backend, store, env.rank, env.world_size, env.master_addr, options.timeout);
  return std::make_shared<C10dProcessGroup>(store, pg, env.rank, env.world_size, backend, device, env.master_addr,
                                            options.timeout);
}

}  // namespace dsopen::train
