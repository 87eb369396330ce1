#include "train/memory_plan.h"

#include <numeric>
#include <set>

#include <torch/torch.h>

#include <cstdio>
#include <iostream>

#include "utils/env.h"
#include "utils/errors.h"

#ifdef DSOPEN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace dsopen::train {

namespace {

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

int zero_stage(Strategy s) {
  return s == Strategy::Zero3 ? 3 : s == Strategy::Zero2 ? 2 : s == Strategy::Zero1 ? 1 : 0;
}

}  // namespace

bool JobMemoryPlan::fits() const {
  if (device_budget <= 0) return true;  // unknown: nothing to compare with
  if (on_gpu) return plan.device_total() <= device_budget && (plan.optimizer_host <= host_budget || host_budget <= 0);
  return plan.device_total() + plan.optimizer_host <= device_budget;
}

JobMemoryPlan plan_job(const JobConfig& job, int64_t world_size, int64_t local_world_size) {
  JobMemoryPlan out;
  out.world_size = world_size;
  out.on_gpu = runs_on_cuda(job.run);
  model::TrainingPlanInput in;
  in.world_size = world_size;
  // zero3 gathers units even on one rank; the other strategies hold everything there.
  in.zero_stage = world_size > 1 || job.parallel.strategy == Strategy::Zero3 ? zero_stage(job.parallel.strategy) : 0;
  in.offload_optimizer = job.parallel.offload_optimizer;
  in.expert_parallel = job.parallel.expert_parallel;
  in.micro_batch_size = job.train.micro_batch_size;
  in.seq_len = job.data.seq_len;
  in.activation_checkpointing = job.train.activation_checkpointing;
  // auto may become fp32 on this machine: plan for the larger activations.
  in.activation_bytes = job.train.precision == PrecisionMode::Fp32 || job.train.precision == PrecisionMode::Auto ? 4 : 2;
  if (job.lora.enabled) in.trainable_params = 0;  // adapters: megabytes beside the frozen base
  out.plan = model::plan_training(job.model, in);
  if (job.lora.enabled && job.lora.base_dtype == torch::kBFloat16) out.plan.weights /= 2;

  const env::MemoryBudget host = env::host_memory_budget();
  const double ranks_here = static_cast<double>(std::max<int64_t>(local_world_size, 1));
  out.host_budget = static_cast<double>(host.bytes) / ranks_here;
  out.device_budget = out.host_budget;
  out.budget_source = "host, " + host.source + (ranks_here > 1 ? ", shared by " + std::to_string(local_world_size) + " ranks" : "");
#ifdef DSOPEN_WITH_CUDA
  if (out.on_gpu) {
    const int index = 0;  // ranks of a machine hold one GPU each, all of one kind
    out.device_budget = static_cast<double>(at::cuda::getDeviceProperties(index)->totalGlobalMem);
    out.budget_source = std::string("GPU memory of ") + at::cuda::getDeviceProperties(index)->name;
  }
#endif
  char buf[256];
  const std::string experts = job.parallel.expert_parallel > 1
                                  ? ", expert parallel " + std::to_string(job.parallel.expert_parallel) : std::string();
  std::snprintf(buf, sizeof buf, "%lld rank%s, strategy %s%s%s, %s, micro-batch %lld x %lld tokens, %s",
                static_cast<long long>(world_size), world_size == 1 ? "" : "s", to_string(job.parallel.strategy).c_str(),
                job.parallel.offload_optimizer ? " + optimizer offload" : "", experts.c_str(),
                job.train.precision == PrecisionMode::Auto ? "precision auto (planned as fp32)"
                                                           : to_string(job.train.precision).c_str(),
                static_cast<long long>(job.train.micro_batch_size), static_cast<long long>(job.data.seq_len),
                job.train.activation_checkpointing ? "activation checkpointing" : "no activation checkpointing");
  out.layout = buf;
  return out;
}

std::string plan_text(const JobMemoryPlan& p) {
  std::string s = "memory plan per rank (" + p.layout + "):\n";
  s += "  weights " + gib(p.plan.weights) +
       (p.plan.gathered_unit > 0 ? " (slices + 2 gathered units of " + gib(p.plan.gathered_unit) + ")" : "") + " | gradients " + gib(p.plan.grads) + " | AdamW moments " +
       gib(p.plan.optimizer) + (p.plan.optimizer_host > 0 ? " (+ " + gib(p.plan.optimizer_host) + " offloaded)" : "") +
       " | activations ~" + gib(p.plan.activations) + " | total " + gib(p.plan.device_total() + (p.on_gpu ? 0 : p.plan.optimizer_host)) + "\n";
  s += "  available " + (p.device_budget > 0 ? gib(p.device_budget) + " (" + p.budget_source + ")" : std::string("unknown")) +
       (p.fits() ? ": fits" : ": does not fit") + "\n";
  return s;
}

std::vector<std::string> layouts_that_fit(const JobConfig& job, int64_t world_size, int64_t local_world_size) {
  struct Candidate {
    std::string sets;
    JobConfig job;
    int64_t world;
    std::string kind;  // one suggestion per kind: the first (smallest) that fits
  };
  std::vector<Candidate> candidates;
  auto add = [&](const std::string& sets, JobConfig j, int64_t world, std::string kind = "") {
    candidates.push_back({sets, std::move(j), world, kind.empty() ? sets : kind});
  };
  JobConfig j = job;
  if (!j.train.activation_checkpointing) {
    j.train.activation_checkpointing = true;
    add("train.activation_checkpointing=true", j, world_size);
  }
  for (int64_t mb = job.train.micro_batch_size / 2; mb >= 1; mb /= 2) {
    JobConfig k = j;
    k.train.micro_batch_size = mb;
    k.train.grad_accum_steps = job.train.grad_accum_steps * (job.train.micro_batch_size / mb);
    add("train.activation_checkpointing=true train.micro_batch_size=" + std::to_string(mb) +
            " train.grad_accum_steps=" + std::to_string(k.train.grad_accum_steps),
        k, world_size, "micro-batch");
  }
  if (!job.parallel.offload_optimizer) {
    JobConfig k = j;
    k.parallel.offload_optimizer = true;
    add("parallel.offload_optimizer=cpu train.activation_checkpointing=true", k, world_size);
  }
  // More ranks shard the moments and gradients (zero2) — the weights stay whole on every rank but for the routed
  // experts, which expert parallelism splits over up to gcd(ranks, experts) ranks — or everything (zero3).
  for (int64_t n = std::max<int64_t>(2, world_size); n <= 1024; n *= 2) {
    JobConfig k = j;
    k.parallel.strategy = Strategy::Zero2;
    const std::string where = " on " + std::to_string(n) + " ranks (one per " + (runs_on_cuda(job.run) ? "GPU" : "machine") + ")";
    add("parallel.strategy=zero2 train.activation_checkpointing=true" + where, k, n, "zero2");
    const int64_t E = std::gcd(n, job.model.n_routed_experts);
    if (E > 1) {
      k.parallel.expert_parallel = E;
      add("parallel.strategy=zero2 parallel.expert_parallel=" + std::to_string(E) + " train.activation_checkpointing=true" + where,
          k, n, "zero2 ep");
    }
    k.parallel.expert_parallel = 1;
    k.parallel.strategy = Strategy::Zero3;
    add("parallel.strategy=zero3 train.activation_checkpointing=true" + where, k, n, "zero3");
    k.parallel.offload_optimizer = true;
    add("parallel.strategy=zero3 parallel.offload_optimizer=cpu train.activation_checkpointing=true" + where, k, n,
        "zero3 offload");
  }
  std::vector<std::string> out;
  std::set<std::string> kinds;
  for (const auto& c : candidates) {
    if (kinds.count(c.kind)) continue;
    // Extra ranks of the suggestions run one per machine (CPU) or GPU: the memory of one is what they get.
    const int64_t local = c.world == world_size ? local_world_size : 1;
    if (plan_job(c.job, c.world, local).fits()) out.push_back(c.sets), kinds.insert(c.kind);
    if (out.size() == 3) break;
  }
  return out;
}

void refuse_if_it_cannot_fit(const JobConfig& job, int64_t world_size, int64_t local_world_size) {
  const JobMemoryPlan p = plan_job(job, world_size, local_world_size);
  if (p.fits()) return;
  std::cerr << plan_text(p);
  const auto fixes = layouts_that_fit(job, world_size, local_world_size);
  std::string hint;
  for (const auto& f : fixes) hint += (hint.empty() ? "layouts that fit: --set " : "; or --set ") + f;
  if (hint.empty())
    hint = "no layout up to 1024 ranks fits (zero3 shards the weights too; the largest unit, two gathered, and the "
           "activations stay per rank): use a smaller model, a shorter data.seq_len or a machine with more memory; "
           "dsopen-train --plan shows each term";
  const double total = p.plan.device_total() + (p.on_gpu ? 0 : p.plan.optimizer_host);
  throw usage_error("model", "the job needs " + gib(total) + " per rank but " + gib(p.device_budget) + " is available (" +
                                 p.budget_source + ")",
                    hint);
}

}  // namespace dsopen::train
