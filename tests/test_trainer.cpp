// dsopen-train's loop, in process: exact resume (pretraining and SFT), accumulation equivalence, loss falling on
// real text, the NaN guard, partial checkpoints skipped, corrupt checkpoint files named.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <map>

#include "model/safetensors.h"
#include "model/info.h"
#include "model/model_dir.h"
#include "train/checkpoint.h"
#include "train/memory_plan.h"
#include "train/options.h"
#include "train/schedule.h"
#include "train/precision.h"
#include "train/trainer.h"
#include "utils/config.h"
#include "tests/test_helpers.h"
#include "utils/env.h"
#include "utils/errors.h"

using namespace dsopen;
namespace fs = std::filesystem;
using dsopen::testing::error_of;

namespace {

// Shared tokenizer and shards (built once per process by the first run that needs them).
const fs::path& workdir() {
  static fs::path dir = [] {
    auto d = fs::temp_directory_path() / ("dsopen_trainer_" + std::to_string(::getpid()));
    fs::create_directories(d);
    std::ofstream chat(d / "chat.jsonl");
    std::ifstream fortunes("/usr/share/games/fortunes/fortunes");
    std::string line;
    for (int i = 0; i < 60 && std::getline(fortunes, line);) {
      if (line.size() < 20) continue;
      nlohmann::json conv = {{"messages",
                              {{{"role", "user"}, {"content", "Say something wise."}},
                               {{"role", "assistant"}, {"content", line}}}}};
      chat << conv.dump() << "\n";
      ++i;
    }
    return d;
  }();
  return dir;
}

std::string config_text(const std::string& run, const std::string& extra = "") {
  const std::string w = workdir().string();
  return "run: {name: " + run + ", output_dir: " + w + "/" + run + ", seed: 7, log_every: 100, threads: 2}\n" +
         "model: {flavor: debug, vocab_size: 512}\n"
         "tokenizer:\n  path: " + w + "/tok.model\n"
         "  train: {inputs: [/usr/share/games/fortunes/fortunes], vocab_size: 512, character_coverage: 0.999,\n"
         "          user_symbols: [\"<|System|>\", \"<|User|>\", \"<|Assistant|>\", \"<|end|>\"]}\n"
         "data:\n  train: [" + w + "/shards/f_*.bin]\n  seq_len: 32\n  valid_fraction: 0.05\n"
         "  build: {inputs: [/usr/share/games/fortunes/fortunes], output: " + w + "/shards/f, doc_separator: \"%\"}\n"
         "train: {max_steps: 8, micro_batch_size: 4, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 2, eval_steps: 2}\n"
         "checkpoint: {every: 4, keep_last: 5}\n" + extra;
}

train::JobConfig job_of(const std::string& text, std::vector<std::string> sets = {}) {
  auto doc = config::Document::parse(text, "test.yaml");
  for (const auto& s : sets) doc.apply_set(s);
  return train::decode_job(doc);
}

train::TrainResult run(const std::string& text, std::vector<std::string> sets = {}) {
  auto job = job_of(text, sets);
  train::Trainer t(job, "# test\n");
  return t.run();
}

}  // namespace

TEST_CASE("resume is exact: straight run == resumed from the mid-run checkpoint (pretraining)", "[train][resume]") {
  const auto straight = run(config_text("straight"));
  REQUIRE(straight.losses.size() == 8);
  const std::string mid = (workdir() / "straight/checkpoints/step_00000004").string();
  REQUIRE(fs::exists(mid + "/trainer_state.json"));
  const auto resumed = run(config_text("resumed"), {"checkpoint.resume=" + mid});
  REQUIRE(resumed.losses.size() == 4);
  for (int i = 0; i < 4; ++i) CHECK(resumed.losses[i] == straight.losses[4 + i]);  // bitwise on the CPU
  // Resumed into its own output directory (as after a crash after step 8): metrics.jsonl keeps one record per step.
  run(config_text("straight"), {"checkpoint.resume=" + mid});
  std::map<int64_t, int> records;
  std::ifstream metrics(workdir() / "straight/metrics.jsonl");
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) ++records[j["step"].get<int64_t>()];
  }
  CHECK(records == std::map<int64_t, int>{{1, 1}, {8, 1}});  // log_every 100: the first and last steps
}

TEST_CASE("a resume from an earlier step into the run's directory: latest follows it, the later checkpoints stay",
          "[train][resume][checkpoint]") {
  run(config_text("rollback"), {"checkpoint.every=2"});
  const fs::path ckpts = workdir() / "rollback/checkpoints";
  const auto resumed = run(config_text("rollback"), {"checkpoint.every=2", "train.max_steps=4",
                                                    "checkpoint.resume=" + (ckpts / "step_00000002").string()});
  CHECK(resumed.losses.size() == 2);
  CHECK(model::read_latest(ckpts.string()) == "step_00000004");
  for (const char* later : {"step_00000006", "step_00000008"}) CHECK(fs::exists(ckpts / later / "trainer_state.json"));
  // resume: auto continues this run (the step latest names), not the one it rolled back from.
  CHECK(train::find_latest_checkpoint(ckpts.string()) == (ckpts / "step_00000004").string());
  const auto next = run(config_text("rollback"), {"checkpoint.every=2", "train.max_steps=5"});
  CHECK(next.losses.size() == 1);
  // A fresh start there would replace and prune that run's checkpoints: refused.
  const auto msg = error_of([&] { run(config_text("rollback"), {"checkpoint.resume=none"}); });
  CHECK(msg.find("checkpoint.dir: " + ckpts.string() + " holds step_00000008 of another run") == 0);
}

TEST_CASE("zero3 in one process: the same run as none, its checkpoint resumes under none bitwise", "[train][resume][zero3]") {
  // A zero3 run writes model.safetensors from its slices, unit by unit; an unsharded run continues from it.
  const auto plain = run(config_text("z3_plain"), {"train.precision=fp32"});
  const auto sharded = run(config_text("z3_sharded"), {"train.precision=fp32", "parallel.strategy=zero3",
                                                      "train.activation_checkpointing=true"});
  REQUIRE(sharded.losses.size() == 8);
  for (int i = 0; i < 8; ++i) CHECK(sharded.losses[i] == plain.losses[i]);
  // Evaluation runs other shapes, whose GEMMs may round differently with the gathered buffers' alignment.
  CHECK(sharded.eval_loss == Approx(plain.eval_loss).epsilon(1e-6));
  const std::string mid = (workdir() / "z3_sharded/checkpoints/step_00000004").string();
  const auto resumed = run(config_text("z3_resumed"), {"train.precision=fp32", "checkpoint.resume=" + mid});
  REQUIRE(resumed.losses.size() == 4);
  for (int i = 0; i < 4; ++i) CHECK(resumed.losses[i] == plain.losses[4 + i]);
}

TEST_CASE("precision auto resumes in the precision the checkpoint was trained in", "[train][resume]") {
  // Whatever auto measures on this machine, a run trained in fp32 continues in fp32: bitwise the straight run.
  const auto straight = run(config_text("prec_straight"), {"train.precision=fp32"});
  const std::string mid = (workdir() / "prec_straight/checkpoints/step_00000004").string();
  auto state_of = [](const std::string& dir) { return nlohmann::json::parse(std::ifstream(dir + "/trainer_state.json")); };
  CHECK(state_of(mid)["precision"] == "fp32");
  const auto resumed = run(config_text("prec_auto"), {"train.precision=auto", "checkpoint.resume=" + mid});
  REQUIRE(resumed.losses.size() == 4);
  for (int i = 0; i < 4; ++i) CHECK(resumed.losses[i] == straight.losses[4 + i]);
  CHECK(state_of(resumed.last_checkpoint)["precision"] == "fp32");
}

TEST_CASE("resume is exact for SFT data, padded and packed", "[train][resume][sft]") {
  const std::string chat = (workdir() / "chat.jsonl").string();
  for (const std::string pack : {"false", "true"}) {
    INFO("pack " << pack);
    std::vector<std::string> sets = {"data.format=sft", "data.train=[" + chat + "]", "data.valid_fraction=0",
                                     "data.seq_len=48", "data.pack=" + pack};
    const auto straight = run(config_text("sft_straight_" + pack), sets);
    sets.push_back("checkpoint.resume=" + (workdir() / ("sft_straight_" + pack) / "checkpoints/step_00000004").string());
    const auto resumed = run(config_text("sft_resumed_" + pack), sets);
    REQUIRE(resumed.losses.size() == 4);
    for (int i = 0; i < 4; ++i) CHECK(resumed.losses[i] == straight.losses[4 + i]);
  }
}

TEST_CASE("every family trains from a model: section spelled in its HF keys, and resumes exactly", "[train][resume][families]") {
  const std::string base = "vocab_size: 512, hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, "
                           "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64";
  const std::vector<std::pair<std::string, std::string>> families = {
      {"glm4", "model_type: glm4, head_dim: 16"},
      {"qwen3", "model_type: qwen3, head_dim: 24"},
      {"qwen2_moe", "model_type: qwen2_moe, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 32, "
                    "shared_expert_intermediate_size: 48, output_router_logits: true, router_aux_loss_coef: 0.01"},
      {"mixtral", "model_type: mixtral, num_local_experts: 4, num_experts_per_tok: 2, router_jitter_noise: 0.05"},
  };
  for (const auto& [name, keys] : families) {
    INFO(name);
    auto text_for = [&](const std::string& run_name) {
      std::string text = config_text(run_name);
      const std::string debug_model = "model: {flavor: debug, vocab_size: 512}";
      text.replace(text.find(debug_model), debug_model.size(), "model: {" + keys + ", " + base + "}");
      return text;
    };
    const auto straight = run(text_for("family_" + name));
    REQUIRE(straight.losses.size() == 8);
    CHECK(straight.losses.back() < straight.losses.front());
    const std::string mid = (workdir() / ("family_" + name) / "checkpoints/step_00000004").string();
    const auto resumed = run(text_for("family_resumed_" + name), {"checkpoint.resume=" + mid});
    REQUIRE(resumed.losses.size() == 4);
    for (int i = 0; i < 4; ++i) CHECK(resumed.losses[i] == straight.losses[4 + i]);
  }
}

TEST_CASE("the memory plan's weights, gradients and moments are the bytes the trainer holds", "[train][plan]") {
  for (const bool mtp : {false, true}) {
    INFO("use_mtp " << mtp);
    auto job = job_of(config_text("plan"), {"model.use_mtp=" + std::string(mtp ? "true" : "false")});
    const auto plan = train::plan_job(job, 1, 1);
    train::Trainer t(job, "# test\n");
    double n = 0;
    for (auto& p : t.model()->parameters()) n += static_cast<double>(p.numel());
    CHECK(plan.plan.weights == 4 * n);
    CHECK(plan.plan.grads == 4 * n);
    CHECK(plan.plan.optimizer == 8 * n);
    CHECK(plan.plan.weights + plan.plan.grads + plan.plan.optimizer == model::training_memory_per_rank(n, 1).ddp);
    CHECK(plan.plan.activations > 0);
    CHECK(plan.fits());
  }
  // Sharding divides what the plan says it divides.
  auto job = job_of(config_text("plan"));
  job.parallel.strategy = train::Strategy::Zero2;
  const auto one = train::plan_job(job, 1, 1), four = train::plan_job(job, 4, 1);
  CHECK(four.plan.weights == one.plan.weights);
  CHECK(four.plan.grads == Approx(one.plan.grads / 4));
  CHECK(four.plan.optimizer == Approx(one.plan.optimizer / 4));
  // zero3 divides the weights too, and adds two gathered units of the largest one.
  job.parallel.strategy = train::Strategy::Zero3;
  const auto z3 = train::plan_job(job, 4, 1);
  const double unit = static_cast<double>(model::count_parameters(job.model).largest_unit);
  CHECK(z3.plan.gathered_unit == 4 * unit);  // the plan's job trains in fp32 (auto planned as fp32)
  CHECK(z3.plan.weights == Approx(one.plan.weights / 4 + 2 * z3.plan.gathered_unit));
  CHECK(z3.plan.optimizer == Approx(four.plan.optimizer));
  CHECK(z3.plan.grads == Approx(four.plan.grads + 8 * unit));
}

TEST_CASE("micro_batch 4 x accum 1 and micro_batch 1 x accum 4 make the same update", "[train][accum]") {
  // eps 1e-6: Adam divides by sqrt(v) + eps, which turns last-bit differences of gradients summed in another order
  // into ~1e-5 weight differences where a gradient is ~1e-8 (which entries those are depends on the initialization).
  const std::vector<std::string> one_step = {"train.max_steps=1", "train.warmup_steps=0", "train.eps=1.0e-6"};
  auto a_sets = one_step, b_sets = one_step;
  b_sets.push_back("train.micro_batch_size=1");
  b_sets.push_back("train.grad_accum_steps=4");
  const auto a = run(config_text("accum_a"), a_sets), b = run(config_text("accum_b"), b_sets);
  CHECK(a.losses[0] == Approx(b.losses[0]).epsilon(1e-6));  // the same global-batch loss
  model::SafetensorsFile fa(a.last_checkpoint + "/model.safetensors"), fb(b.last_checkpoint + "/model.safetensors");
  REQUIRE(fa.names() == fb.names());
  double worst = 0;
  for (const auto& name : fa.names()) worst = std::max(worst, (fa.tensor(name) - fb.tensor(name)).abs().max().item<double>());
  CHECK(worst < 1e-5);
}

TEST_CASE("the loss falls on real text and evaluation reports it", "[train]") {
  const auto r = run(config_text("falls"), {"train.max_steps=30", "checkpoint.every=0", "train.eval_every=30"});
  REQUIRE(r.losses.size() == 30);
  CHECK(r.losses.back() < r.losses.front() - 1.0);
  CHECK(r.eval_loss > 0);
  CHECK(r.eval_loss < r.losses.front());
  std::ifstream metrics(workdir() / "falls/metrics.jsonl");
  std::string line;
  int lines = 0;
  bool has_eval = false;
  while (std::getline(metrics, line)) {
    auto j = nlohmann::json::parse(line);
    has_eval |= j.contains("eval_ppl");
    if (j.contains("loss")) CHECK(j.contains("tokens_per_s"));
    ++lines;
  }
  CHECK(has_eval);
  CHECK(lines >= 2);
}

TEST_CASE("a diverging run trips the NaN guard and the last checkpoint still loads", "[train][nan]") {
  auto text = config_text("nan");
  const std::string msg = error_of([&] {
    run(text, {"train.lr=1000", "train.min_lr=1000", "train.warmup_steps=0", "train.grad_clip=0",
               "train.max_steps=40", "checkpoint.every=1", "train.max_bad_steps=2"});
  });
  CHECK(msg.find("non-finite steps in a row") != std::string::npos);
  const std::string latest = train::find_latest_checkpoint((workdir() / "nan/checkpoints").string());
  REQUIRE(!latest.empty());
  auto job = job_of(text);
  model::CausalLM m(job.model);
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (auto& p : m->named_parameters()) named.push_back({p.key(), p.value()});
  train::FlatAdamW opt(named, {});
  CHECK_NOTHROW(train::load_checkpoint(latest, m, opt));
}

TEST_CASE("partial checkpoints are skipped; corrupt files are named", "[train][checkpoint]") {
  const auto r = run(config_text("partial"), {"train.max_steps=4", "checkpoint.every=2"});
  const fs::path ckpts = workdir() / "partial/checkpoints";
  // What a SIGKILL mid-write leaves: a .tmp directory, or (with a crash between rename steps) a step without
  // its trainer_state.json.
  fs::create_directories(ckpts / "step_00000006.tmp");
  std::ofstream(ckpts / "step_00000006.tmp/model.safetensors") << "partial";
  fs::create_directories(ckpts / "step_00000005");
  // A kill while pruning: the doomed checkpoint was renamed aside first, so its trainer_state.json no longer makes it
  // look complete although its optimizer shards are gone.
  fs::create_directories(ckpts / "step_00000009.deleting.tmp");
  fs::copy_file(ckpts / "step_00000004/trainer_state.json", ckpts / "step_00000009.deleting.tmp/trainer_state.json");
  CHECK(train::find_latest_checkpoint(ckpts.string()) == (ckpts / "step_00000004").string());
  // resume: auto picks step 4 and runs on to 6; its save sweeps every leftover.
  const auto resumed = run(config_text("partial"), {"train.max_steps=6", "checkpoint.every=2"});
  CHECK(resumed.losses.size() == 2);
  CHECK_FALSE(fs::exists(ckpts / "step_00000009.deleting.tmp"));
  CHECK_FALSE(fs::exists(ckpts / "step_00000006.tmp"));

  // A truncated model file.
  const fs::path step = ckpts / "step_00000006";
  fs::resize_file(step / "model.safetensors", fs::file_size(step / "model.safetensors") / 2);
  auto msg = error_of([&] { run(config_text("partial"), {"train.max_steps=8"}); });
  CHECK(msg.find((step / "model.safetensors").string()) == 0);
  // An edited trainer_state.json.
  std::ofstream(ckpts / "step_00000004/trainer_state.json") << "{\"step\": \"four\"}";
  msg = error_of([&] { run(config_text("partial"), {"train.max_steps=8", "checkpoint.resume=" + (ckpts / "step_00000004").string()}); });
  CHECK(msg.find((ckpts / "step_00000004/trainer_state.json").string() + ": field 'step' is \"four\"") == 0);
  // Edited values that parse: each refused by name, and the checkpoint left as it is.
  const auto state_file = ckpts / "step_00000002/trainer_state.json";
  const std::string good = env::read_file(state_file.string());
  const auto edited = [&](const std::string& key, const nlohmann::json& value) {
    auto j = nlohmann::json::parse(good);
    j[key] = value;
    std::ofstream(state_file) << j.dump();
    const auto m = error_of([&] { run(config_text("partial"), {"train.max_steps=8", "checkpoint.resume=" + state_file.parent_path().string()}); });
    std::ofstream(state_file) << good;
    return m;
  };
  CHECK(edited("step", 100).find("field 'step' is 100 but the checkpoint is step_00000002") != std::string::npos);
  CHECK(edited("step", 2.5).find("field 'step' is 2.5, not an integer") != std::string::npos);
  CHECK(edited("world_size", -2).find("field 'world_size' is -2, not an integer >= 1") != std::string::npos);
  CHECK(edited("world_size", 3).find("field 'world_size' is 3 but") != std::string::npos);
  CHECK(edited("precision", "fp8").find("field 'precision' is \"fp8\"") != std::string::npos);
  CHECK(edited("loss_scale", 0).find("field 'loss_scale' is 0, not a number > 0") != std::string::npos);
  CHECK_NOTHROW(run(config_text("partial_ok"), {"train.max_steps=3", "checkpoint.resume=" + state_file.parent_path().string()}));
  // A checkpoint of a diverged run: named at load, not after a few non-finite steps.
  const auto weights_file = (state_file.parent_path() / "model.safetensors").string();
  const std::string weights_bytes = env::read_file(weights_file);
  {
    std::map<std::string, torch::Tensor> tensors;
    {
      model::SafetensorsFile f(weights_file);
      for (const auto& name : f.names()) tensors[name] = f.tensor(name).clone();
    }
    tensors["model.norm.weight"][3] = std::numeric_limits<float>::quiet_NaN();
    model::save_safetensors(weights_file, tensors, {{"format", "pt"}});
  }
  msg = error_of([&] { run(config_text("partial"), {"train.max_steps=8", "checkpoint.resume=" + state_file.parent_path().string()}); });
  CHECK(msg.find(weights_file + ": tensor model.norm.weight holds NaN or infinite values") == 0);
  env::write_file_atomic(weights_file, weights_bytes);
  // Damaged AdamW moments (a negative second moment, an infinite first one): named at load, before a step would
  // carry them into the weights and every later checkpoint.
  const auto opt_file = (state_file.parent_path() / "optimizer/rank_0.safetensors").string();
  const std::string opt_bytes = env::read_file(opt_file);
  for (const auto& [key, value] : {std::pair<std::string, float>{"decay.exp_avg_sq", -1.0f},
                                   {"no_decay.exp_avg", std::numeric_limits<float>::infinity()}}) {
    std::map<std::string, torch::Tensor> tensors;
    std::map<std::string, std::string> meta;
    {
      model::SafetensorsFile f(opt_file);
      for (const auto& name : f.names()) tensors[name] = f.tensor(name).clone();
      meta = f.metadata();
    }
    tensors[key][0] = value;
    model::save_safetensors(opt_file, tensors, meta);
    msg = error_of([&] { run(config_text("partial"), {"train.max_steps=8", "checkpoint.resume=" + state_file.parent_path().string()}); });
    CHECK(msg.find(opt_file + ": '" + key + "' holds") == 0);
    env::write_file_atomic(opt_file, opt_bytes);
  }
  // An output path that is a file: refused before anything runs.
  std::ofstream(workdir() / "a_file") << "x";
  msg = error_of([&] { job_of(config_text("cfg"), {"checkpoint.dir=" + (workdir() / "a_file").string()}); });
  CHECK(msg.find("checkpoint.dir: " + (workdir() / "a_file").string() + " exists and is not a directory") == 0);
  (void)r;
}

TEST_CASE("job config: every section validated, errors together", "[train][config]") {
  auto msg = error_of([&] { job_of(config_text("cfg"), {"train.lrr=1", "train.precision=fp8", "checkpoint.keep_last=0"}); });
  CHECK(msg.find("train.lrr: unknown key (did you mean 'lr'?)") != std::string::npos);
  CHECK(msg.find("train.precision: 'fp8' is not one of fp32 | bf16 | fp16") != std::string::npos);
  CHECK(msg.find("checkpoint.keep_last: must be >= 1, got 0") != std::string::npos);
  msg = error_of([&] { job_of(config_text("cfg"), {"data.seq_len=512"}); });  // debug: 256 positions
  CHECK(msg.find("data.seq_len: 512 exceeds model.max_position_embeddings (256)") != std::string::npos);
  msg = error_of([&] { job_of("run: {name: x}\n", {}); });
  CHECK(msg.find("model: missing required section") != std::string::npos);
  CHECK(msg.find("tokenizer: missing required section") != std::string::npos);
}

TEST_CASE("flat AdamW equals LibTorch's AdamW (decay and no-decay groups)", "[train][optimizer]") {
  torch::manual_seed(11);
  auto w = torch::randn({5, 4}, torch::requires_grad()), b = torch::randn({4}, torch::requires_grad());
  auto w_ref = w.detach().clone().requires_grad_(), b_ref = b.detach().clone().requires_grad_();
  train::AdamWOptions o;
  o.weight_decay = 0.1;
  train::FlatAdamW flat({{"layer.weight", w}, {"layer.bias", b}}, o);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{w_ref},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(0.01).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.1)));
  groups.emplace_back(std::vector<torch::Tensor>{b_ref},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(0.01).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.0)));
  torch::optim::AdamW ref(groups);
  for (int step = 0; step < 5; ++step) {
    auto x = torch::randn({3, 5});
    flat.zero_grad();
    ((x.matmul(w) + b).pow(2).sum()).backward();
    flat.step(0.01);
    ref.zero_grad();
    ((x.matmul(w_ref) + b_ref).pow(2).sum()).backward();
    ref.step();
  }
  CHECK(torch::allclose(w, w_ref, 1e-6, 1e-6));
  CHECK(torch::allclose(b, b_ref, 1e-6, 1e-6));
  CHECK(flat.groups().size() == 2);
  CHECK(flat.groups()[0].decay);  // the 2-D weight decays, the bias does not
}

TEST_CASE("LR schedules: warmup, cosine, linear, constant and WSD endpoints", "[train][schedule]") {
  train::ScheduleOptions s{train::Schedule::Cosine, 1.0, 0.1, 10, 110, 0.2};
  CHECK(train::lr_at(0, s) == Approx(0.1));    // warmup: (step+1)/warmup * lr
  CHECK(train::lr_at(9, s) == Approx(1.0));
  CHECK(train::lr_at(10, s) == Approx(1.0));   // cosine starts at lr ...
  CHECK(train::lr_at(60, s) == Approx(0.55).epsilon(0.02));
  CHECK(train::lr_at(109, s) == Approx(0.1));  // ... and ends at min_lr on the last step
  s.kind = train::Schedule::Linear;
  CHECK(train::lr_at(109, s) == Approx(0.1));
  s.kind = train::Schedule::Constant;
  CHECK(train::lr_at(109, s) == Approx(1.0));
  s.kind = train::Schedule::Wsd;  // stable until the last 20% of the steps, then linear to min_lr
  CHECK(train::lr_at(80, s) == Approx(1.0));
  CHECK(train::lr_at(109, s) == Approx(0.1));
  CHECK(train::lr_at(100, s) < 1.0);
}

TEST_CASE("dynamic loss scaling backs off on overflow and grows after a run of good steps", "[train][precision]") {
  CHECK_THROWS_WITH(train::Precision("fp16", torch::kCPU), Catch::Contains("fp16 needs a CUDA device"));
  train::LossScaler s(1024.0, 3);
  s.update(false);
  CHECK(s.scale() == 512.0);  // overflow: halve
  s.update(true);
  s.update(true);
  CHECK(s.scale() == 512.0);
  s.update(true);
  CHECK(s.scale() == 1024.0);  // three good steps: double
  s.update(true);
  s.update(false);
  CHECK(s.good_steps() == 0);  // an overflow restarts the count
  train::Precision bf16("bf16", torch::kCPU);
  bf16.update(false);  // no loss scaling outside fp16
  CHECK(bf16.scale() == 1.0);
}

TEST_CASE("model.pretrained fine-tunes from a model directory's weights", "[train][pretrained]") {
  const auto base = run(config_text("pre_base"), {"train.max_steps=20", "checkpoint.every=0"});
  const auto fresh = run(config_text("pre_fresh"), {"train.max_steps=1"});
  const auto tuned = run(config_text("pre_tuned"), {"train.max_steps=1", "model.pretrained=" + base.last_checkpoint});
  // Starting from the trained weights, the first loss is where the base run ended, far below a fresh start.
  CHECK(tuned.losses[0] < fresh.losses[0] - 1.0);
  CHECK(tuned.losses[0] == Approx(base.losses.back()).margin(0.5));
  // A base that is not there yet (a fine-tune before its base run) says so, naming the key.
  auto msg = error_of([&] { run(config_text("pre_bad"), {"model.pretrained=/nonexistent"}); });
  CHECK(msg.find("model.pretrained: /nonexistent does not exist yet; run the training that writes it first") !=
        std::string::npos);
  // A directory that is not a model names the file it lacks.
  msg = error_of([&] { run(config_text("pre_bad"), {"model.pretrained=" + workdir().string()}); });
  CHECK(msg.find((workdir() / "config.json").string() + ": config.json not found") == 0);
}

namespace {

// metrics.jsonl rows of a run that carry a training loss, by step.
std::map<int64_t, nlohmann::json> step_metrics(const std::string& run) {
  std::map<int64_t, nlohmann::json> rows;
  std::ifstream in(workdir() / run / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) rows[j["step"].get<int64_t>()] = j;
  }
  return rows;
}

double max_weight_diff(const std::string& a, const std::string& b) {
  model::SafetensorsFile fa(a + "/model.safetensors"), fb(b + "/model.safetensors");
  REQUIRE(fa.names() == fb.names());
  double worst = 0;
  for (const auto& name : fa.names()) worst = std::max(worst, (fa.tensor(name) - fb.tensor(name)).abs().max().item<double>());
  return worst;
}

}  // namespace

TEST_CASE("the MTP module's MoE gate balances like the main stack's", "[train][moe]") {
  const auto r = run(config_text("mtp_bias"), {"model.use_mtp=true", "model.bias_update_speed=0.01",
                                               "train.max_steps=3", "checkpoint.every=0", "run.log_every=1"});
  model::SafetensorsFile f(r.last_checkpoint + "/model.safetensors");
  // debug flavor: layer 0 dense, layer 1 MoE, the MTP module stored as layer 2 (MoE).
  for (const std::string layer : {"1", "2"}) {
    INFO("layer " << layer);
    auto bias = f.tensor("model.layers." + layer + ".mlp.gate.e_score_correction_bias").to(torch::kFloat64);
    CHECK(bias.abs().max().item<double>() > 0);
    CHECK(bias.abs().max().item<double>() <= 0.03 + 1e-6);  // three steps of 0.01 at most
    CHECK(((bias / 0.01).round() * 0.01 - bias).abs().max().item<double>() < 1e-6);  // whole steps only
  }
  const auto rows = step_metrics("mtp_bias");
  REQUIRE(rows.count(1));
  const auto& per_block = rows.at(1)["moe_imbalance_per_block"];
  CHECK(per_block.contains("model.layers.1.mlp"));
  CHECK(per_block.contains("model.layers.2.mlp"));
}

TEST_CASE("padding changes nothing: SFT at seq_len 256 and 512 balance and train alike", "[train][moe][sft]") {
  const std::string chat = (workdir() / "chat.jsonl").string();
  std::vector<std::string> last;
  for (const char* len : {"256", "512"}) {
    run(config_text(std::string("pad_") + len),
        {"data.format=sft", "data.train=[" + chat + "]", "data.valid_fraction=0", std::string("data.seq_len=") + len,
         "model.aux_loss_alpha=0.01", "model.bias_update_speed=0.01", "model.max_position_embeddings=512",
         "train.max_steps=3", "checkpoint.every=0", "run.log_every=1"});
    last.push_back(train::find_latest_checkpoint((workdir() / (std::string("pad_") + len) / "checkpoints").string()));
  }
  const auto a = step_metrics("pad_256"), b = step_metrics("pad_512");
  REQUIRE(a.size() == 3);
  for (const auto& [step, row] : a) {
    INFO("step " << step);
    for (const char* key : {"loss", "moe_aux_loss", "moe_imbalance", "mtp_loss", "grad_norm"})
      CHECK(row[key].get<double>() == Approx(b.at(step)[key].get<double>()).epsilon(1e-5));
    CHECK(row["tokens"] == b.at(step)["tokens"]);  // tokens trained on, not padded positions
  }
  model::SafetensorsFile fa(last[0] + "/model.safetensors"), fb(last[1] + "/model.safetensors");
  for (const std::string layer : {"1", "2"}) {
    const std::string name = "model.layers." + layer + ".mlp.gate.e_score_correction_bias";
    CHECK(torch::equal(fa.tensor(name), fb.tensor(name)));
  }
}

TEST_CASE("any split of the global batch into micro-batches gives the same steps (MTP, z-loss, aux, bias)",
          "[train][accum]") {
  // SFT rows hold different numbers of targets (and MTP targets): per-micro-batch means would weigh them unevenly.
  const std::string chat = (workdir() / "chat.jsonl").string();
  const std::vector<std::string> common = {
      "data.format=sft",          "data.train=[" + chat + "]",   "data.valid_fraction=0",      "data.seq_len=48",
      "model.use_mtp=true",       "model.z_loss_coef=1.0e-3",    "model.aux_loss_alpha=0.01", "model.bias_update_speed=0.01",
      "train.max_steps=3",        "train.warmup_steps=0",        "checkpoint.every=0",         "run.log_every=1",
      "train.eps=1.0e-6"};  // as above: the summation order must not be amplified where gradients are ~1e-8
  std::vector<std::string> names, checkpoints;
  for (auto [micro, accum] : {std::make_pair(4, 1), std::make_pair(2, 2), std::make_pair(1, 4)}) {
    auto sets = common;
    sets.push_back("train.micro_batch_size=" + std::to_string(micro));
    sets.push_back("train.grad_accum_steps=" + std::to_string(accum));
    names.push_back("split_" + std::to_string(micro) + "x" + std::to_string(accum));
    checkpoints.push_back(run(config_text(names.back()), sets).last_checkpoint);
  }
  const auto ref = step_metrics(names[0]);
  REQUIRE(ref.size() == 3);
  for (size_t i = 1; i < names.size(); ++i) {
    INFO(names[i]);
    const auto got = step_metrics(names[i]);
    for (const auto& [step, row] : ref)
      for (const char* key : {"loss", "moe_aux_loss", "mtp_loss", "z_loss", "grad_norm"}) {
        INFO("step " << step << " " << key);
        CHECK(got.at(step)[key].get<double>() == Approx(row[key].get<double>()).margin(1e-6).epsilon(1e-6));
      }
    // Float rounding only: the fused kernels sum weight gradients in chunks of rows, so another split sums in
    // another order (a per-micro-batch mean would be off by ~1e-3 here).
    CHECK(max_weight_diff(checkpoints[0], checkpoints[i]) < 3e-6);
  }
}
