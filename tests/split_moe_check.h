// Expert parallelism within one process, for the tests: an all-to-all between threads and the check that a MoE
// block split over two "ranks" equals the whole block (tests/test_expert_parallel.cpp on the CPU,
// tests/test_cuda.cpp on a GPU). Include after catch.hpp.
#pragma once

#include <torch/torch.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "model/expert_parallel.h"
#include "model/moe.h"
#include "model/registry.h"

namespace dsopen::testing {

// An all-to-all between threads: every rank deposits its rows, waits for all, then takes its slices.
class ThreadExchange {
public:
  explicit ThreadExchange(int size) : size_(size), inbox_(static_cast<size_t>(size)) {}
  torch::Tensor all_to_all(int rank, const torch::Tensor& in, const std::vector<int64_t>& send) {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t round = round_;
    inbox_[rank] = {in.clone(), send};
    if (++arrived_ == size_) cv_.notify_all();
    cv_.wait(lock, [&] { return arrived_ == size_ || round_ != round; });
    std::vector<torch::Tensor> parts;
    for (int s = 0; s < size_; ++s) {
      int64_t offset = 0;
      for (int r = 0; r < rank; ++r) offset += inbox_[s].second[r];
      parts.push_back(inbox_[s].first.narrow(0, offset, inbox_[s].second[rank]));
    }
    auto out = torch::cat(parts, 0);
    if (++taken_ == size_) {  // the last reader opens the next round
      arrived_ = taken_ = 0;
      ++round_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return round_ != round; });
    }
    return out;
  }

private:
  int size_;
  std::vector<std::pair<torch::Tensor, std::vector<int64_t>>> inbox_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0, taken_ = 0;
  int64_t round_ = 0;
};

class RankExchange final : public model::ExpertExchange {
public:
  RankExchange(ThreadExchange& all, int rank, int size) : all_(all), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  torch::Tensor all_to_all(const torch::Tensor& in, const std::vector<int64_t>& send,
                           const std::vector<int64_t>&) override {
    return all_.all_to_all(rank_, in, send);
  }

private:
  ThreadExchange& all_;
  int rank_, size_;
};

// Checks that a MoE block of the debug model split over two "ranks" (two models in two threads, rows moved by
// an in-memory all-to-all) computes the whole block's outputs, input gradients and weight gradients, on `device`
// in `dtype`.
inline void check_split_moe_block(torch::Device device, torch::Dtype dtype) {
  CAPTURE(device.str(), dtype);
  auto c = *model::find_flavor("debug");
  c.aux_loss_alpha = 0.01;
  const bool lowp = dtype != torch::kFloat32;
  torch::manual_seed(11);
  model::MoE whole(c);
  // Two batches (one per "rank"); the whole block sees both. In bf16 on the CPU, enough rows that some expert
  // blocks pass 64 rows and are padded.
  const int64_t T = lowp ? 96 : 12;
  auto x0 = torch::randn({2, T, c.hidden_size}).to(device, dtype), x1 = torch::randn({2, T, c.hidden_size}).to(device, dtype);
  whole->to(device, dtype);
  auto xa = torch::cat({x0, x1}, 0).requires_grad_();
  auto ref = whole->forward(xa);
  (ref.y.to(torch::kFloat32).square().sum() + ref.aux_sum).backward();

  ThreadExchange wire(2);
  std::vector<torch::Tensor> ys(2), grads(2);
  std::vector<std::map<std::string, torch::Tensor>> weight_grads(2);
  std::vector<std::string> errors(2);
  auto run = [&](int rank) {
    try {
      model::ExpertPlacementScope scope({rank, 2});
      model::MoE part(c);
      part->to(device, dtype);
      {
        torch::NoGradGuard no_grad;
        for (auto& p : part->named_parameters()) p.value().copy_(whole->named_parameters()[p.key()]);
        for (auto& b : part->named_buffers()) b.value().copy_(whole->named_buffers()[b.key()]);
      }
      part->set_exchange(std::make_shared<RankExchange>(wire, rank, 2));
      auto x = (rank == 0 ? x0 : x1).detach().clone().requires_grad_();
      auto out = part->forward(x);
      (out.y.to(torch::kFloat32).square().sum() + out.aux_sum).backward();
      ys[rank] = out.y.detach();
      grads[rank] = x.grad();
      for (const auto& p : part->named_parameters())
        if (p.value().grad().defined()) weight_grads[rank][p.key()] = p.value().grad();
    } catch (const std::exception& e) {
      errors[rank] = e.what();
    }
  };
  std::thread t1(run, 1);
  run(0);
  t1.join();
  REQUIRE(errors[0].empty());
  REQUIRE(errors[1].empty());
  const double tol = lowp ? 2e-2 : 1e-5;
  CHECK(torch::allclose(torch::cat(ys, 0).to(torch::kFloat32), ref.y.to(torch::kFloat32), tol, tol));
  CHECK(torch::allclose(torch::cat(grads, 0).to(torch::kFloat32), xa.grad().to(torch::kFloat32), tol, tol));
  // Each expert's gradient lives on its rank only and equals the whole block's; shared weights sum over ranks.
  for (const auto& p : whole->named_parameters()) {
    CAPTURE(p.key());
    torch::Tensor sum;
    for (int r = 0; r < 2; ++r)
      if (weight_grads[r].count(p.key())) sum = sum.defined() ? sum + weight_grads[r][p.key()] : weight_grads[r][p.key()];
    REQUIRE(sum.defined());
    const double scale = std::max(1.0, p.value().grad().abs().max().item<double>());
    CHECK((sum.to(torch::kFloat32) - p.value().grad().to(torch::kFloat32)).abs().max().item<double>() <= tol * scale);
  }
}

}  // namespace dsopen::testing
