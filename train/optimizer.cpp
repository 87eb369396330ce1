#include "train/optimizer.h"

#include <algorithm>
#include <tuple>
#include <cmath>
#include <set>
#include <nlohmann/json.hpp>

#include "train/adamw_cpu.h"
#include "utils/errors.h"
#include "utils/progress.h"
#include "utils/json.h"

namespace dsopen::train {

FlatAdamW::FlatAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const AdamWOptions& o,
                     const ShardingOptions& sh)
    : opts_(o), params_(std::make_unique<FlatParams>(named_params, o.decay_embeddings, sh)) {
  for (const auto& g : params_->groups()) {
    auto state_opts = g.params.options();
    if (sh.offload) state_opts = g.master.options();
    const int64_t n = params_->owned_numel(g);
    moments_.push_back({torch::zeros({n}, state_opts), torch::zeros({n}, state_opts)});
  }
}

void FlatAdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++step_;
  const bool offload = sharding().offload;
  const double bc1 = 1.0 - std::pow(opts_.beta1, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(opts_.beta2, static_cast<double>(step_));
  auto& groups = params_->groups();
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    FlatGroup& g = groups[gi];
    for (const auto& pc : params_->pieces(g)) {
      auto grad = params_->grad(g, pc);
      auto m = moments_[gi].m.narrow(0, pc.state_offset, pc.numel), v = moments_[gi].v.narrow(0, pc.state_offset, pc.numel);
      auto param = g.params.narrow(0, pc.offset, pc.numel);
      // Offload: the update runs on the host copy (multithreaded CPU kernels), then the result goes back.
      auto target = offload ? g.master.narrow(0, pc.state_offset, pc.numel) : param;
      if (offload) grad = grad.to(torch::kCPU);
      const double decay = g.decay && opts_.weight_decay > 0 ? 1.0 - lr * opts_.weight_decay : 1.0;
      if (target.is_cpu() && target.scalar_type() == torch::kFloat32 && grad.scalar_type() == torch::kFloat32 &&
          target.is_contiguous() && grad.is_contiguous() && m.is_contiguous() && v.is_contiguous()) {
        adamw_update_cpu(target.data_ptr<float>(), grad.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(),
                         pc.numel,
                         {static_cast<float>(decay), static_cast<float>(opts_.beta1), static_cast<float>(opts_.beta2),
                          static_cast<float>(bc2), static_cast<float>(opts_.eps), static_cast<float>(-lr / bc1)});
        if (offload) param.copy_(target, /*non_blocking=*/false);
        continue;
      }
      if (g.decay && opts_.weight_decay > 0) target.mul_(1.0 - lr * opts_.weight_decay);  // decoupled decay
      m.lerp_(grad, 1.0 - opts_.beta1);                                                // m = b1 m + (1-b1) g
      v.mul_(opts_.beta2).addcmul_(grad, grad, 1.0 - opts_.beta2);                     // v = b2 v + (1-b2) g^2
      auto denom = (v / bc2).sqrt_().add_(opts_.eps);
      target.addcdiv_(m, denom, -lr / bc1);
      if (offload) param.copy_(target, /*non_blocking=*/false);
    }
  }
}

int64_t FlatAdamW::state_bytes() const {
  int64_t n = 0;
  for (const auto& mo : moments_) n += mo.m.numel() + mo.v.numel();
  return n * 4 + params_->master_bytes();
}

std::map<std::string, torch::Tensor> FlatAdamW::state_dict() const {
  std::map<std::string, torch::Tensor> s;
  const auto& groups = params_->groups();
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const FlatGroup& g = groups[gi];
    s[g.name + ".exp_avg"] = moments_[gi].m;
    s[g.name + ".exp_avg_sq"] = moments_[gi].v;
    const auto ranges = params_->owned_ranges(g);
    auto r = torch::empty({static_cast<int64_t>(ranges.size()), 3}, torch::kInt64);
    for (size_t i = 0; i < ranges.size(); ++i) {
      r[i][0] = ranges[i].state_offset;
      r[i][1] = ranges[i].unpadded_offset;
      r[i][2] = ranges[i].numel;
    }
    s[g.name + ".ranges"] = r;
  }
  s["step"] = torch::tensor({step_}, torch::kInt64);
  return s;
}

std::map<std::string, std::string> FlatAdamW::state_metadata() const {
  nlohmann::json groups = nlohmann::json::array();
  for (const auto& g : params_->groups()) {
    nlohmann::json params = nlohmann::json::array();
    for (size_t i = 0; i < g.names.size(); ++i) params.push_back({g.names[i], g.numels[i]});
    groups.push_back({{"name", g.name}, {"numel", g.numel}, {"params", params}});
  }
  return {{"dsopen.optimizer_layout", groups.dump()},
          {"dsopen.world_size", std::to_string(sharding().world_size)},
          {"dsopen.rank", std::to_string(sharding().rank)}};
}

namespace {

// Where the shards came from, for messages: their common directory and their file names.
std::string directory_of(const std::vector<FlatAdamW::SavedShard>& shards) {
  const auto slash = shards.front().source.rfind('/');
  return slash == std::string::npos ? shards.front().source : shards.front().source.substr(0, slash);
}
std::string file_list(const std::vector<FlatAdamW::SavedShard>& shards) {
  std::string out;
  for (const auto& sh : shards) {
    const auto slash = sh.source.rfind('/');
    out += (out.empty() ? "" : ", ") + (slash == std::string::npos ? sh.source : sh.source.substr(slash + 1));
  }
  return out;
}

const torch::Tensor& saved(const FlatAdamW::SavedShard& sh, const std::string& key) {
  auto it = sh.tensors.find(key);
  if (it == sh.tensors.end()) throw runtime_error(sh.source, "optimizer state lacks '" + key + "'", "restore the file");
  return it->second;
}

}  // namespace

// Each shard's parameters, from its layout metadata: where each sits in its group's unpadded concatenation.
struct FlatAdamW::SavedLayout {
  struct Param {
    std::string name;
    int64_t offset, numel;
  };
  std::map<std::string, std::vector<Param>> groups;  // group name -> parameters by offset
};

std::vector<FlatAdamW::SavedLayout> FlatAdamW::read_layouts(const std::vector<SavedShard>& shards,
                                                            const std::function<bool(const std::string&)>& foreign) const {
  if (shards.empty()) throw runtime_error("optimizer", "no optimizer state files", "is this a complete checkpoint?");
  std::vector<SavedLayout> layouts;
  std::map<std::string, std::pair<std::string, int64_t>> saved_params;  // name -> (group, numel), from any shard
  for (const auto& sh : shards) {
    auto it = sh.metadata.find("dsopen.optimizer_layout");
    if (it == sh.metadata.end())
      throw runtime_error(sh.source, "has no optimizer layout metadata", "the file is not a dsopen optimizer shard");
    nlohmann::json groups;
    try {
      groups = json::parse(it->second, sh.source);
    } catch (const std::exception&) {
      throw runtime_error(sh.source, "optimizer layout metadata is not valid JSON", "restore the file");
    }
    SavedLayout layout;
    try {
      for (const auto& g : groups) {
        auto& params = layout.groups[g.at("name").get<std::string>()];
        int64_t offset = 0;
        for (const auto& p : g.at("params")) {
          params.push_back({p.at(0).get<std::string>(), offset, p.at(1).get<int64_t>()});
          offset += params.back().numel;
          saved_params[params.back().name] = {g.at("name").get<std::string>(), params.back().numel};
        }
      }
    } catch (const nlohmann::json::exception&) {
      throw runtime_error(sh.source, "optimizer layout metadata is malformed", "restore the file");
    }
    layouts.push_back(std::move(layout));
  }
  // The values are matched by parameter name, so any layout (world size, buckets, expert parallelism) re-slices.
  // Every trainable parameter here must be saved with its size and group; a saved one missing here is another
  // model, unless `foreign` says another rank holds it (expert parallelism).
  const auto another = [&](const std::string& source, const std::string& name) {
    return runtime_error(source, "optimizer state was written for another set of trainable parameters (first difference at " +
                                     name + ")",
                         "resume with the model and trainable parameters that wrote it");
  };
  std::set<std::string> mine;
  for (const auto& g : params_->groups())
    for (const auto& name : g.names) mine.insert(name);
  // First a saved parameter this run does not have (another model), then one of ours saved differently, then one
  // of ours no file holds (a missing file).
  for (size_t k = 0; k < shards.size(); ++k)
    for (const auto& [group, params] : layouts[k].groups)
      for (const auto& p : params)
        if (!mine.count(p.name) && !(foreign && foreign(p.name))) throw another(shards[k].source, p.name);
  for (const auto& g : params_->groups())
    for (size_t i = 0; i < g.names.size(); ++i) {
      auto it = saved_params.find(g.names[i]);
      if (it != saved_params.end() && (it->second.first != g.name || it->second.second != g.numels[i]))
        throw another(shards.front().source, g.names[i]);
      if (it == saved_params.end())
        throw runtime_error(directory_of(shards), "no optimizer file holds the state of " + g.names[i] + " (read: " +
                                                      file_list(shards) + ")",
                            "an optimizer file of the checkpoint is missing (every rank_R and experts_rank_R that was "
                            "written), or it was written for other trainable parameters; restore it");
    }
  return layouts;
}

// Copies, from every shard, the parts of its saved ranges that this rank owns; they must cover all it owns.
namespace {
// exp_avg finite, exp_avg_sq finite and >= 0 (a sum of squares), checked in slices (no bool copy of the whole state).
void check_moments(const std::string& source, const std::string& group, const torch::Tensor& m, const torch::Tensor& v) {
  constexpr int64_t kSlice = int64_t(1) << 24;
  for (const auto& [t, name, nonnegative] : {std::tuple{m, ".exp_avg", false}, std::tuple{v, ".exp_avg_sq", true}}) {
    const auto flat = t.reshape({-1});
    for (int64_t at = 0; at < flat.numel(); at += kSlice) {
      const auto part = flat.narrow(0, at, std::min(kSlice, flat.numel() - at));
      const bool ok = nonnegative ? (torch::isfinite(part) & part.ge(0)).all().item<bool>() : torch::isfinite(part).all().item<bool>();
      if (!ok)
        throw runtime_error(source, "'" + group + name + "' holds " + (nonnegative ? "negative or " : "") + "non-finite values",
                            "the file is damaged: resume from another checkpoint");
    }
  }
}
}  // namespace

void FlatAdamW::load_moments(const FlatGroup& g, Moments& mo, const std::vector<SavedShard>& shards,
                             const std::vector<SavedLayout>& layouts, Progress& progress) {
  std::map<std::string, int64_t> my_offset;  // parameter -> offset in this group's unpadded concatenation
  int64_t offset = 0;
  for (size_t i = 0; i < g.names.size(); ++i) my_offset[g.names[i]] = offset, offset += g.numels[i];
  const auto mine = params_->owned_ranges(g);  // ascending unpadded offsets
  int64_t needed = 0, covered = 0;
  for (const auto& r : mine) needed += r.numel;
  // Copies values [lo, lo + n) of this group (our coordinates), found at `from` in the saved m/v, into what we own.
  const auto copy_owned = [&](int64_t lo, int64_t n, int64_t from, const torch::Tensor& m, const torch::Tensor& v) {
    auto it = std::upper_bound(mine.begin(), mine.end(), lo,
                               [](int64_t x, const FlatRange& r) { return x < r.unpadded_offset + r.numel; });
    for (; it != mine.end() && it->unpadded_offset < lo + n; ++it) {
      const int64_t a = std::max(lo, it->unpadded_offset), b = std::min(lo + n, it->unpadded_offset + it->numel);
      if (b <= a) continue;
      mo.m.narrow(0, it->state_offset + a - it->unpadded_offset, b - a).copy_(m.narrow(0, from + a - lo, b - a));
      mo.v.narrow(0, it->state_offset + a - it->unpadded_offset, b - a).copy_(v.narrow(0, from + a - lo, b - a));
      covered += b - a;
      progress.advance((b - a) * (mo.m.element_size() + mo.v.element_size()));
    }
  };
  for (size_t k = 0; k < shards.size(); ++k) {
    const auto& sh = shards[k];
    auto lit = layouts[k].groups.find(g.name);
    if (lit == layouts[k].groups.end()) continue;  // this shard has no such group (e.g. experts have no norms)
    const auto& theirs = lit->second;
    const int64_t their_numel = theirs.empty() ? 0 : theirs.back().offset + theirs.back().numel;
    const auto& ranges = saved(sh, g.name + ".ranges");
    const auto& m = saved(sh, g.name + ".exp_avg");
    const auto& v = saved(sh, g.name + ".exp_avg_sq");
    if (ranges.dim() != 2 || ranges.size(1) != 3 || ranges.scalar_type() != torch::kInt64)
      throw runtime_error(sh.source, "'" + g.name + ".ranges' has the wrong shape or type", "restore the file");
    // Damaged moments would put NaN into the weights at the first step (and into every checkpoint after it).
    check_moments(sh.source, g.name, m, v);
    auto acc = ranges.accessor<int64_t, 2>();
    for (int64_t r = 0; r < ranges.size(0); ++r) {
      const int64_t so = acc[r][0], uo = acc[r][1], n = acc[r][2];
      if (so < 0 || n < 0 || so + n > m.numel() || so + n > v.numel() || uo < 0 || uo + n > their_numel)
        throw runtime_error(sh.source, "'" + g.name + ".ranges' points outside the saved state", "restore the file");
      // The saved parameters this range overlaps, each mapped to where it sits here.
      auto p = std::upper_bound(theirs.begin(), theirs.end(), uo,
                                [](int64_t x, const SavedLayout::Param& q) { return x < q.offset + q.numel; });
      for (; p != theirs.end() && p->offset < uo + n; ++p) {
        auto here = my_offset.find(p->name);
        if (here == my_offset.end()) continue;  // held by another rank
        const int64_t a = std::max(uo, p->offset), b = std::min(uo + n, p->offset + p->numel);
        if (b > a) copy_owned(here->second + a - p->offset, b - a, so + a - uo, m, v);
      }
    }
  }
  if (covered != needed) {
    // Which ranks wrote files: each records its rank and the world size of its run.
    std::string writers;
    for (const auto& sh : shards) {
      auto r = sh.metadata.find("dsopen.rank"), w = sh.metadata.find("dsopen.world_size");
      if (r != sh.metadata.end() && w != sh.metadata.end()) writers = w->second;
    }
    const std::string what = covered < needed ? "cover only " + std::to_string(covered) + " of the " : "overlap: they hold " +
                                                std::to_string(covered) + " values for the ";
    throw runtime_error(directory_of(shards), "the optimizer files (" + file_list(shards) + ") " + what +
                                                  std::to_string(needed) + " " + g.name + " values this rank needs" +
                                                  (writers.empty() ? "" : " (written by a run of " + writers + " ranks)"),
                        covered < needed ? "an optimizer file is missing: restore every rank_R.safetensors (and "
                                           "experts_rank_R.safetensors) the checkpoint was written with"
                                         : "a file is duplicated or comes from another run: keep one rank_R.safetensors "
                                           "per rank of the run that wrote the checkpoint");
  }
}

void FlatAdamW::load_state_dicts(const std::vector<SavedShard>& shards,
                                 const std::function<bool(const std::string&)>& foreign) {
  const auto layouts = read_layouts(shards, foreign);
  torch::NoGradGuard no_grad;
  const auto& groups = params_->groups();
  int64_t bytes = 0;
  for (const auto& mo : moments_) bytes += mo.m.numel() * mo.m.element_size() + mo.v.numel() * mo.v.element_size();
  Progress progress("loading optimizer state", bytes, "B", 30.0, /*quiet_below_s=*/2.0);
  for (size_t gi = 0; gi < groups.size(); ++gi) load_moments(groups[gi], moments_[gi], shards, layouts, progress);
  progress.finish();
  const auto& step = saved(shards.front(), "step");
  if (step.numel() != 1) throw runtime_error(shards.front().source, "'step' must hold one value", "restore the file");
  step_ = step.item<int64_t>();
  // Files of another checkpoint mixed in would restore moments of another step.
  for (const auto& sh : shards) {
    const auto& other = saved(sh, "step");
    if (other.numel() != 1 || other.item<int64_t>() != step_)
      throw runtime_error(sh.source, "holds the optimizer state of step " + std::to_string(other.numel() == 1 ? other.item<int64_t>() : -1) +
                                         ", " + shards.front().source + " of step " + std::to_string(step_),
                          "every optimizer file must come from the same checkpoint; restore it");
  }
  params_->refresh_master();  // the master copy follows the restored parameters
}

}  // namespace dsopen::train
