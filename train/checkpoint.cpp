#include "train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "model/safetensors.h"
#include "model/weights.h"
#include "utils/env.h"
#include "utils/errors.h"

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

}  // namespace

std::string save_checkpoint(const std::string& dir, model::CausalLM& model, const FlatAdamW& optimizer,
                            const TrainerState& state, const CheckpointFiles& files, int64_t keep_last) {
  const fs::path final_dir = fs::path(dir) / step_dir_name(state.step);
  const fs::path tmp = fs::path(dir) / (step_dir_name(state.step) + ".tmp");
  fs::remove_all(tmp);
  fs::create_directories(tmp / "optimizer");

  model::save_safetensors((tmp / "model.safetensors").string(), model::hf_state_dict(model), {{"format", "pt"}});
  env::write_file_atomic((tmp / "config.json").string(), model->config().to_hf_json().dump(2) + "\n");
  env::write_file_atomic((tmp / "dsopen.yaml").string(), files.resolved_config);
  if (!files.tokenizer_path.empty() && fs::exists(files.tokenizer_path))
    env::write_file_atomic((tmp / "tokenizer.model").string(), env::read_file(files.tokenizer_path));
  auto opt_state = optimizer.state_dict();
  opt_state["rng.cpu"] = at::detail::getDefaultCPUGenerator().get_state();
  model::save_safetensors((tmp / "optimizer" / "rank_0.safetensors").string(), opt_state);
  const nlohmann::json js = {{"step", state.step},
                             {"tokens", state.tokens},
                             {"data_epoch", state.cursor.epoch},
                             {"data_position", state.cursor.position},
                             {"loss_scale", state.loss_scale},
                             {"loss_scale_good_steps", state.loss_scale_good_steps},
                             {"world_size", state.world_size}};
  env::write_file_atomic((tmp / "trainer_state.json").string(), js.dump(2) + "\n");  // last: marks completeness
  fsync_dir(tmp / "optimizer");
  fsync_dir(tmp);

  fs::remove_all(final_dir);  // a re-save of the same step (after a resume) replaces it
  fs::rename(tmp, final_dir);
  fsync_dir(dir);
  env::write_file_atomic((fs::path(dir) / "latest").string(), final_dir.filename().string() + "\n");

  // Retention: newest keep_last complete checkpoints stay; leftovers of interrupted writes go too.
  const auto all = complete_checkpoints(dir);
  for (size_t i = static_cast<size_t>(keep_last); i < all.size(); ++i) fs::remove_all(all[i]);
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp") != std::string::npos) fs::remove_all(e.path());
  return final_dir.string();
}

std::string find_latest_checkpoint(const std::string& dir) {
  const auto all = complete_checkpoints(dir);
  return all.empty() ? "" : all.front().string();
}

TrainerState read_trainer_state(const std::string& path) {
  const std::string file = (fs::path(path) / "trainer_state.json").string();
  if (!fs::exists(file)) throw runtime_error(file, "missing", "not a complete checkpoint; pass another checkpoint.resume");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(env::read_file(file));
  } catch (const nlohmann::json::exception& e) {
    throw runtime_error(file, std::string("not valid JSON: ") + e.what(), "restore the file or resume from another checkpoint");
  }
  TrainerState s;
  try {
    s.step = j.at("step").get<int64_t>();
    s.tokens = j.at("tokens").get<int64_t>();
    s.cursor.epoch = j.at("data_epoch").get<int64_t>();
    s.cursor.position = j.at("data_position").get<int64_t>();
    s.loss_scale = j.at("loss_scale").get<double>();
    s.loss_scale_good_steps = j.at("loss_scale_good_steps").get<int64_t>();
    s.world_size = j.at("world_size").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw runtime_error(file, std::string("bad field: ") + e.what(), "restore the file or resume from another checkpoint");
  }
  if (s.step < 0 || s.tokens < 0 || s.cursor.epoch < 0 || s.cursor.position < 0 || s.world_size < 1 || !(s.loss_scale > 0))
    throw runtime_error(file, "a field is out of range", "restore the file or resume from another checkpoint");
  return s;
}

TrainerState load_checkpoint(const std::string& path, model::CausalLM& model, FlatAdamW& optimizer) {
  TrainerState state = read_trainer_state(path);
  if (state.world_size != 1)
    throw runtime_error(path, "written by " + std::to_string(state.world_size) + " ranks; this run has 1",
                        "resume with the same number of ranks");
  model::load_hf_state_dict(model, model::WeightFiles(path), /*strict=*/true);
  model::SafetensorsFile opt((fs::path(path) / "optimizer" / "rank_0.safetensors").string());
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& name : opt.names()) tensors[name] = opt.tensor(name).clone();
  optimizer.load_state_dict(tensors, opt.path());
  if (tensors.count("rng.cpu")) {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    gen.set_state(tensors["rng.cpu"]);
  }
  return state;
}

}  // namespace dsopen::train
