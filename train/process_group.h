// Process groups for data parallelism (docs/ARCHITECTURE.md "Data parallelism"): where this process sits (rank,
// world size, local rank) from the variables torchrun/scripts/launch.sh or Slurm's srun set, a TCPStore
// rendezvous, and c10d's Gloo (CPU) or NCCL (CUDA) backend behind a small interface. The c10d and gloo headers stay inside process_group.cpp.
//
// A world of one process needs no backend: every collective is then the identity, so single-process training
// runs the same code without a store or sockets.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace dsopen::train {

struct DistEnv {
  int rank = 0, world_size = 1;
  int local_rank = 0, local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string source = "single process";  // "launcher" (RANK/WORLD_SIZE) | "slurm" | "single process"
};

// Reads RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torchrun names), falling back to
// SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE / SLURM_LAUNCH_NODE_IPADDR under srun. Throws a
// usage error naming the variable when one is malformed or inconsistent.
DistEnv read_dist_env();

// An asynchronous collective; wait() blocks until it finished (and rethrows a peer failure or timeout).
class PendingWork {
public:
  PendingWork() = default;
  explicit PendingWork(std::function<void()> wait) : wait_(std::move(wait)) {}
  void wait();
  bool pending() const { return static_cast<bool>(wait_); }

private:
  std::function<void()> wait_;
};

class ProcessGroup {
public:
  virtual ~ProcessGroup() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;
  // Where this group's tensors must live (NCCL: the rank's CUDA device).
  virtual torch::Device device() const = 0;

  // Sum over ranks, in place.
  virtual PendingWork all_reduce_sum(torch::Tensor t) = 0;
  // `in` (size() * out.numel() elements) summed over ranks; rank r receives slice r into `out`.
  virtual PendingWork reduce_scatter_sum(torch::Tensor out, torch::Tensor in) = 0;
  // Concatenation of every rank's `in` (out.numel() == size() * in.numel()). `in` must not alias `out`.
  virtual PendingWork all_gather(torch::Tensor out, torch::Tensor in) = 0;
  virtual PendingWork broadcast(torch::Tensor t, int root) = 0;
  // Rows (dim 0) of `in` go `in_splits[r]` to rank r, in rank order; `out` receives `out_splits[r]` rows from rank
  // r. Every rank calls it with matching sizes (what r sends to q is what q expects from r); zero rows are fine.
  virtual PendingWork all_to_all(torch::Tensor out, torch::Tensor in, const std::vector<int64_t>& out_splits,
                                 const std::vector<int64_t>& in_splits) = 0;
  virtual void barrier() = 0;
  // A group of some ranks of this one (`ranks`: their ranks here, ascending; this rank among them). Only the members
  // call it, with the same `ranks` and a `name` unique to that set (it keys the rendezvous); its rank is this
  // rank's index in `ranks`. Like torch.distributed.new_group.
  virtual std::shared_ptr<ProcessGroup> subgroup(const std::vector<int>& ranks, const std::string& name) = 0;

  double all_reduce_sum(double value);
  bool all_ranks_agree(bool value);  // true only when `value` is true on every rank
};

struct ProcessGroupOptions {
  std::string backend = "auto";  // auto | gloo | nccl
  std::chrono::seconds timeout{300};
};

// The group of this process: a world of one needs no rendezvous; otherwise a TCPStore at MASTER_ADDR:MASTER_PORT
// (rank 0 hosts it) and Gloo on CPU or NCCL on `device` (a CUDA device: LOCAL_RANK's).
std::shared_ptr<ProcessGroup> create_process_group(const DistEnv& env, torch::Device device,
                                                   const ProcessGroupOptions& options);

}  // namespace dsopen::train
