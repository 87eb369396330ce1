#include "train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <optional>
#include <set>
#include <nlohmann/json.hpp>

#include "model/expert_parallel.h"
#include "model/lora.h"
#include "model/model_dir.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/json.h"

namespace fs = std::filesystem;

namespace dsopen::train {

namespace {

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

void fsync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) ::fsync(fd), ::close(fd);
}

// Deleting a checkpoint takes many unlinks; a kill among them would leave a directory that still holds
// trainer_state.json (so it looks complete) without its optimizer shards. One rename first takes it out of the set of
// complete checkpoints atomically; the name it gets ends in ".tmp", so a later save sweeps it if the delete is cut.
void remove_checkpoint(const fs::path& step_dir) {
  const fs::path doomed = step_dir.parent_path() / (step_dir.filename().string() + ".deleting.tmp");
  fs::remove_all(doomed);
  fs::rename(step_dir, doomed);
  fsync_dir(step_dir.parent_path());
  fs::remove_all(doomed);
}

// Complete checkpoints under `dir`, newest first.
std::vector<fs::path> complete_checkpoints(const std::string& dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("step_", 0) != 0 || name.find(".tmp") != std::string::npos) continue;
    if (fs::exists(e.path() / "trainer_state.json")) out.push_back(e.path());
  }
  std::sort(out.rbegin(), out.rend());
  return out;
}

// model.safetensors.index.json over the shards the first expert-parallel group wrote.
void write_shard_index(const fs::path& tmp, int shards) {
  nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", nlohmann::json::object()}};
  int64_t total = 0;
  for (int k = 0; k < shards; ++k) {
    const std::string name = model::shard_file_name(k, shards);
    model::SafetensorsFile f((tmp / name).string());
    for (const auto& tensor : f.names()) {
      index["weight_map"][tensor] = name;
      const auto t = f.tensor(tensor);
      total += t.numel() * t.element_size();
    }
  }
  index["metadata"]["total_size"] = total;
  env::write_file_atomic((tmp / "model.safetensors.index.json").string(), index.dump(2) + "\n");
}

// The model's weights in HF layout. Under expert parallelism the first expert-parallel group (ranks 0..E-1) writes
// them as HF shards, rank r the routed experts it holds (rank 0 also everything replicated), and rank 0 the index
// after `barrier` — no rank gathers the experts of another. Otherwise rank 0 writes model.safetensors.
void write_model_weights(const fs::path& tmp, model::CausalLM& model, int rank, const std::function<void()>& barrier) {
  const model::ExpertPlacement placement = model->expert_placement();
  if (!placement.sharded()) {
    if (rank == 0) model::save_safetensors((tmp / "model.safetensors").string(), model::hf_state_dict(model), {{"format", "pt"}});
    return;
  }
  const int shards = placement.size;
  if (rank < shards) {
    std::map<std::string, torch::Tensor> mine;
    for (auto& [name, t] : model::hf_state_dict(model))
      if (rank == 0 || model::is_routed_expert_name(name)) mine[name] = t;
    model::save_safetensors((tmp / model::shard_file_name(rank, shards)).string(), mine, {{"format", "pt"}});
  }
  barrier();
  if (rank == 0) write_shard_index(tmp, shards);
}

// zero3: no rank holds whole parameters. The same files as write_model_weights, streamed one gathered unit at a
// time: rank 0 writes the buffers and parameters outside the units (whole everywhere), then the units (every rank
// takes part in each all-gather); under expert parallelism the routed experts are then gathered over the ranks
// holding the same experts and written by the one among ranks 0..E-1, into its shard.
void write_sharded_model_weights(const fs::path& tmp, model::CausalLM& model, ShardedUnits& units,
                                 ShardedUnits* expert_units, int rank, const std::function<void()>& barrier) {
  const model::ExpertPlacement placement = model->expert_placement();
  const int shards = placement.sharded() ? placement.size : 1;
  std::set<std::string> in_units;
  for (ShardedUnits* su : {&units, expert_units})
    if (su)
      for (int64_t u = 0; u < su->units(); ++u)
        for (const auto& p : su->parameters(u)) in_units.insert(p.name);
  std::vector<std::pair<std::string, torch::Tensor>> direct;  // HF name -> tensor, written as they are (rank 0)
  std::vector<model::SafetensorsWriter::Entry> entries;
  if (rank == 0) {
    for (const auto& p : model->named_parameters())
      if (!in_units.count(p.key()) && !model::is_lora_parameter(p.key()))
        for (const auto& hf : model::hf_names_of(*model, p.key())) direct.push_back({hf, p.value().detach()});
    for (const auto& b : model->named_buffers())
      for (const auto& hf : model::hf_names_of(*model, b.key())) direct.push_back({hf, b.value().detach()});
    for (const auto& [hf, t] : direct) entries.push_back({hf, t.scalar_type(), t.sizes().vec()});
    for (int64_t u = 0; u < units.units(); ++u)
      for (const auto& p : units.parameters(u))
        for (const auto& hf : model::hf_names_of(*model, p.name)) entries.push_back({hf, p.dtype, p.shape});
  }
  if (expert_units && rank < shards)
    for (int64_t u = 0; u < expert_units->units(); ++u)
      for (const auto& p : expert_units->parameters(u))
        for (const auto& hf : model::hf_names_of(*model, p.name)) entries.push_back({hf, p.dtype, p.shape});
  std::optional<model::SafetensorsWriter> writer;
  if (rank < shards) {
    // The names every other strategy writes from this rank.
    std::set<std::string> declared, expected;
    for (const auto& e : entries) declared.insert(e.name);
    for (const auto& [name, t] : model::hf_state_dict(model))
      if (rank == 0 || model::is_routed_expert_name(name)) expected.insert(name);
    if (declared != expected) throw std::logic_error("zero3 checkpoint: the units do not cover the model's tensors");
    const std::string file = shards > 1 ? model::shard_file_name(rank, shards) : "model.safetensors";
    writer.emplace((tmp / file).string(), entries, std::map<std::string, std::string>{{"format", "pt"}});
    for (const auto& [hf, t] : direct) writer->write(hf, t);
  }
  const auto stream = [&](ShardedUnits& su, bool write) {
    for (int64_t u = 0; u < su.units(); ++u) {
      const auto values = su.gather_values(u);  // a collective over su's group: each of its ranks
      if (write)
        for (const auto& [name, t] : values)
          for (const auto& hf : model::hf_names_of(*model, name)) writer->write(hf, t);
    }
  };
  stream(units, rank == 0);
  if (expert_units) stream(*expert_units, rank < shards);
  if (writer) writer->commit();
  if (shards == 1) return;
  barrier();
  if (rank == 0) write_shard_index(tmp, shards);
}

}  // namespace

std::string save_checkpoint(const std::string& dir, model::CausalLM& model, const FlatAdamW& optimizer,
                            const TrainerState& state, const CheckpointFiles& files, int64_t keep_last,
                            ProcessGroup* group, const FlatAdamW* expert_optimizer, ShardedUnits* sharded,
                            ShardedUnits* expert_sharded) {
  const int rank = group ? group->rank() : 0;
  const int world = group ? group->size() : 1;
  auto barrier = [&] {
    if (group) group->barrier();
  };
  const fs::path final_dir = fs::path(dir) / step_dir_name(state.step);
  const fs::path tmp = fs::path(dir) / (step_dir_name(state.step) + ".tmp");
  if (rank == 0) {
    fs::remove_all(tmp);
    fs::create_directories(tmp / "optimizer");
  }
  barrier();

  const bool lora = model::has_lora(*model);
  // A LoRA run saves only its adapter (PEFT layout); the frozen base stays in model.pretrained.
  if (!lora && sharded) write_sharded_model_weights(tmp, model, *sharded, expert_sharded, rank, barrier);
  else if (!lora) write_model_weights(tmp, model, rank, barrier);
  std::map<std::string, torch::Tensor> other_experts;  // adapters rank 0 does not hold whole (expert parallelism, zero3)
  std::map<std::string, torch::Tensor> own_experts;    // zero3 + expert parallelism: this rank's experts' adapters
  // zero3: the adapters are sharded; gathered whole (megabytes) for the adapter file, in fp32 from the slices.
  if (lora && sharded) {
    for (int64_t u = 0; u < sharded->units(); ++u)
      for (auto& [name, t] : sharded->gather_values(u, /*trainable_only=*/true))
        other_experts[model::peft_tensor_name(name)] = t;
    if (expert_sharded)
      for (int64_t u = 0; u < expert_sharded->units(); ++u)
        for (auto& [name, t] : expert_sharded->gather_values(u, /*trainable_only=*/true))
          (rank == 0 ? other_experts : own_experts)[model::peft_tensor_name(name)] = t;
  }
  const model::ExpertPlacement placement = model->expert_placement();
  if (lora && placement.sharded()) {
    // The adapter file is one PEFT file: the other expert-parallel ranks of the first group hand rank 0 their
    // experts' adapters (megabytes) through the directory being written.
    const auto part = [&](int r) { return tmp / ("expert_adapters.rank_" + std::to_string(r) + ".safetensors"); };
    if (rank > 0 && rank < placement.size)
      model::save_safetensors(part(rank).string(),
                              expert_sharded ? own_experts : model::adapter_tensors(*model, model::is_routed_expert_name), {});
    barrier();
    if (rank == 0)
      for (int r = 1; r < placement.size; ++r) {
        {
          model::SafetensorsFile f(part(r).string());
          for (const auto& name : f.names()) other_experts[name] = f.tensor(name).clone();
        }
        fs::remove(part(r));
      }
  }
  if (rank == 0) {
    if (lora) model::save_adapter(*model, tmp.string(), model->config().pretrained, other_experts);
    else env::write_file_atomic((tmp / "config.json").string(), model->config().to_hf_json().dump(2) + "\n");
    env::write_file_atomic((tmp / "dsopen.yaml").string(), files.resolved_config);
    if (!files.tokenizer_path.empty() && fs::exists(files.tokenizer_path))
      env::write_file_atomic((tmp / "tokenizer.model").string(), env::read_file(files.tokenizer_path));
  }
  // Replicated (unsharded) state is written once.
  if (rank == 0 || optimizer.sharding().shard_state) {
    auto opt_state = optimizer.state_dict();
    opt_state["rng.cpu"] = at::detail::getDefaultCPUGenerator().get_state();
    model::save_safetensors((tmp / "optimizer" / ("rank_" + std::to_string(rank) + ".safetensors")).string(), opt_state,
                            optimizer.state_metadata());
  }
  // The routed experts' state (expert parallelism): once per set of ranks holding the same experts, unless sharded.
  if (expert_optimizer && (expert_optimizer->sharding().rank == 0 || expert_optimizer->sharding().shard_state))
    model::save_safetensors((tmp / "optimizer" / ("experts_rank_" + std::to_string(rank) + ".safetensors")).string(),
                            expert_optimizer->state_dict(), expert_optimizer->state_metadata());
  barrier();

  if (rank == 0) {
    const nlohmann::json js = {{"step", state.step},
                               {"tokens", state.tokens},
                               {"data_epoch", state.cursor.epoch},
                               {"data_position", state.cursor.position * world},
                               {"loss_scale", state.loss_scale},
                               {"loss_scale_good_steps", state.loss_scale_good_steps},
                               {"world_size", world},
                               {"precision", state.precision}};
    env::write_file_atomic((tmp / "trainer_state.json").string(), js.dump(2) + "\n");  // last: marks completeness
    fsync_dir(tmp / "optimizer");
    fsync_dir(tmp);

    if (fs::exists(final_dir)) remove_checkpoint(final_dir);  // a re-save of the same step (after a resume) replaces it
    fs::rename(tmp, final_dir);
    fsync_dir(dir);
    model::write_latest(dir, final_dir.filename().string());

    // Retention: newest keep_last complete checkpoints stay (never the one just written, which `latest` names);
    // leftovers of interrupted writes go too.
    const auto all = complete_checkpoints(dir);
    for (size_t i = static_cast<size_t>(keep_last); i < all.size(); ++i)
      if (all[i].filename() != final_dir.filename()) remove_checkpoint(all[i]);
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().filename().string().find(".tmp") != std::string::npos) fs::remove_all(e.path());
  }
  barrier();
  return final_dir.string();
}

std::string find_latest_checkpoint(const std::string& dir, bool highest_step) {
  const auto all = complete_checkpoints(dir);
  if (all.empty()) return "";
  // The step `latest` names when it is complete: after a resume from an earlier step, checkpoints of the run it
  // rolled back from may lie past it.
  const std::string named = highest_step ? "" : model::read_latest(dir);
  for (const auto& c : all)
    if (!named.empty() && c.filename() == named) return c.string();
  return all.front().string();
}

TrainerState read_trainer_state(const std::string& path) {
  const std::string file = (fs::path(path) / "trainer_state.json").string();
  if (!fs::exists(file)) throw runtime_error(file, "missing", "not a complete checkpoint; pass another checkpoint.resume");
  nlohmann::json j;
  try {
    j = json::parse(env::read_file(file), file);
  } catch (const nlohmann::json::exception& e) {
    throw runtime_error(file, std::string("not valid JSON: ") + json::reason(e), "restore the file or resume from another checkpoint");
  }
  const std::string fix = "restore the file or resume from another checkpoint";
  if (!j.is_object()) throw runtime_error(file, "not a JSON object", fix);
  // Each field checked by name: an edited value is refused, never silently reinterpreted.
  const auto integer = [&](const char* key, int64_t min) {
    if (!j.contains(key)) throw runtime_error(file, std::string("field '") + key + "' is missing", fix);
    const auto& v = j.at(key);
    if (!v.is_number_integer() || v.get<int64_t>() < min)
      throw runtime_error(file, std::string("field '") + key + "' is " + v.dump() + ", not an integer >= " + std::to_string(min), fix);
    return v.get<int64_t>();
  };
  TrainerState s;
  s.step = integer("step", 0);
  s.tokens = integer("tokens", 0);
  s.cursor.epoch = integer("data_epoch", 0);
  s.cursor.position = integer("data_position", 0);
  s.loss_scale_good_steps = integer("loss_scale_good_steps", 0);
  s.world_size = integer("world_size", 1);
  if (!j.contains("loss_scale") || !j.at("loss_scale").is_number() || !(j.at("loss_scale").get<double>() > 0))
    throw runtime_error(file, "field 'loss_scale' is " + (j.contains("loss_scale") ? j.at("loss_scale").dump() : "missing") +
                                  ", not a number > 0", fix);
  s.loss_scale = j.at("loss_scale").get<double>();
  if (j.contains("precision")) {
    const auto& p = j.at("precision");
    if (!p.is_string() || (p != "fp32" && p != "bf16" && p != "fp16"))
      throw runtime_error(file, "field 'precision' is " + p.dump() + ", not \"fp32\", \"bf16\" or \"fp16\"", fix);
    s.precision = p.get<std::string>();
  }
  // The directory's name carries the step too (step_00001000): the two must agree.
  const std::string dir = fs::path(path).filename().string();
  if (dir.rfind("step_", 0) == 0 && dir.size() > 5 &&
      dir.find_first_not_of("0123456789", 5) == std::string::npos && std::stoll(dir.substr(5)) != s.step)
    throw runtime_error(file, "field 'step' is " + std::to_string(s.step) + " but the checkpoint is " + dir, fix);
  return s;
}

TrainerState load_checkpoint(const std::string& path, model::CausalLM& model, FlatAdamW& optimizer,
                             ProcessGroup* group, FlatAdamW* expert_optimizer) {
  TrainerState state = load_checkpoint_weights(path, model, group);
  load_optimizer_state_files(path, model, optimizer, group, expert_optimizer);
  return state;
}

TrainerState load_checkpoint_weights(const std::string& path, model::CausalLM& model, ProcessGroup* group) {
  const int world = group ? group->size() : 1;
  TrainerState state = read_trainer_state(path);
  if (state.cursor.position % world != 0)
    throw usage_error(path, "its data position (" + std::to_string(state.cursor.position) + " samples) does not divide among " +
                                std::to_string(world) + " ranks",
                      "resume with a world size that divides it (the global batch size does)");
  state.cursor.position /= world;
  const bool adapter_only = fs::exists(fs::path(path) / "adapter_model.safetensors");
  if (adapter_only != model::has_lora(*model))
    throw runtime_error(path, adapter_only ? "holds a LoRA adapter, not model weights" : "holds model weights, not a LoRA adapter",
                        adapter_only ? "resume it with lora.enabled: true" : "resume a LoRA run from its own checkpoints");
  if (adapter_only) model::load_adapter_weights(*model, path, model->expert_placement().sharded());
  else model::load_hf_state_dict(model, model::WeightFiles(path), /*strict=*/true);
  // A checkpoint saved by a run that had diverged would only give non-finite steps; say so at once.
  torch::NoGradGuard no_grad;
  for (const auto& p : model->named_parameters())
    if ((adapter_only == model::is_lora_parameter(p.key())) && !torch::isfinite(p.value()).all().item<bool>())
      throw runtime_error((fs::path(path) / (adapter_only ? "adapter_model.safetensors" : "model.safetensors")).string(),
                          "tensor " + (adapter_only ? p.key() : model::hf_names_of(*model, p.key()).front()) +
                              " holds NaN or infinite values",
                          "the run had diverged when it was saved: resume from an earlier checkpoint");
  return state;
}

void load_optimizer_state_files(const std::string& path, model::CausalLM& model, FlatAdamW& optimizer,
                                ProcessGroup* group, FlatAdamW* expert_optimizer) {
  const int rank = group ? group->rank() : 0;

  // Every rank reads the slices it needs from whichever files hold them.
  std::vector<fs::path> files;
  const fs::path opt_dir = fs::path(path) / "optimizer";
  std::error_code ec;
  if (fs::is_directory(opt_dir, ec))
    for (const auto& e : fs::directory_iterator(opt_dir)) {
      const std::string name = e.path().filename().string();
      const bool state = name.rfind("rank_", 0) == 0 || name.rfind("experts_rank_", 0) == 0;
      if (state && e.path().extension() == ".safetensors") files.push_back(e.path());
    }
  if (files.empty())
    throw runtime_error(opt_dir.string(), "holds no rank_R.safetensors", "not a complete checkpoint; resume from another one");
  std::sort(files.begin(), files.end());
  std::vector<model::SafetensorsFile> opened;
  std::vector<FlatAdamW::SavedShard> shards;
  for (const auto& f : files) {
    opened.emplace_back(f.string());
    FlatAdamW::SavedShard sh{f.string(), {}, opened.back().metadata()};
    for (const auto& name : opened.back().names()) sh.tensors[name] = opened.back().tensor(name);
    shards.push_back(std::move(sh));
  }
  // Values are matched by parameter name, so a run resumes on any expert-parallel layout: the replicated part
  // takes what it holds from every file (other ranks' experts are theirs), the experts' part likewise.
  const bool experts_elsewhere = model->expert_placement().sharded();
  optimizer.load_state_dicts(shards, experts_elsewhere ? std::function<bool(const std::string&)>(model::is_routed_expert_name)
                                                       : nullptr);
  if (expert_optimizer) expert_optimizer->load_state_dicts(shards, [](const std::string&) { return true; });
  // The optimizer files and trainer_state.json must describe the same run and step.
  const TrainerState state = read_trainer_state(path);
  const std::string state_file = (fs::path(path) / "trainer_state.json").string();
  if (optimizer.step_count() != state.step)
    throw runtime_error(state_file, "field 'step' is " + std::to_string(state.step) + " but the optimizer files hold the state after " +
                                        std::to_string(optimizer.step_count()) + " steps",
                        "restore the file or resume from another checkpoint");
  for (const auto& sh : shards) {
    auto w = sh.metadata.find("dsopen.world_size");
    if (w != sh.metadata.end() && fs::path(sh.source).filename().string().rfind("rank_", 0) == 0 &&
        w->second != std::to_string(state.world_size))
      throw runtime_error(state_file, "field 'world_size' is " + std::to_string(state.world_size) + " but " + sh.source +
                                          " was written by a run of " + w->second + " ranks",
                          "restore the file or resume from another checkpoint");
  }
  // This rank's RNG state, or rank 0's when the checkpoint had fewer ranks with their own files.
  const fs::path own = opt_dir / ("rank_" + std::to_string(rank) + ".safetensors");
  const auto& rng_source = fs::exists(own) ? shards[std::find(files.begin(), files.end(), own) - files.begin()] : shards.front();
  auto it = rng_source.tensors.find("rng.cpu");
  if (it != rng_source.tensors.end()) {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    gen.set_state(it->second.clone());
  }
}

}  // namespace dsopen::train
