// dsopen-train's loop, in process: exact resume (pretraining and SFT), accumulation equivalence, loss falling on
// real text, the NaN guard, partial checkpoints skipped, corrupt checkpoint files named.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "model/safetensors.h"
#include "train/checkpoint.h"
#include "train/options.h"
#include "train/precision.h"
#include "train/trainer.h"
#include "utils/config.h"
#include "tests/test_helpers.h"
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

TEST_CASE("micro_batch 4 x accum 1 and micro_batch 1 x accum 4 make the same update", "[train][accum]") {
  const std::vector<std::string> one_step = {"train.max_steps=1", "train.warmup_steps=0"};
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
  CHECK(train::find_latest_checkpoint(ckpts.string()) == (ckpts / "step_00000004").string());
  // resume: auto picks step 4 and runs on to 6.
  const auto resumed = run(config_text("partial"), {"train.max_steps=6", "checkpoint.every=2"});
  CHECK(resumed.losses.size() == 2);

  // A truncated model file.
  const fs::path step = ckpts / "step_00000006";
  fs::resize_file(step / "model.safetensors", fs::file_size(step / "model.safetensors") / 2);
  auto msg = error_of([&] { run(config_text("partial"), {"train.max_steps=8"}); });
  CHECK(msg.find((step / "model.safetensors").string()) == 0);
  // An edited trainer_state.json.
  std::ofstream(ckpts / "step_00000004/trainer_state.json") << "{\"step\": \"four\"}";
  msg = error_of([&] { run(config_text("partial"), {"train.max_steps=8", "checkpoint.resume=" + (ckpts / "step_00000004").string()}); });
  CHECK(msg.find((ckpts / "step_00000004/trainer_state.json").string() + ": bad field") == 0);
  (void)r;
}

TEST_CASE("job config: every section validated, errors together", "[train][config]") {
  auto msg = error_of([&] { job_of(config_text("cfg"), {"train.lrr=1", "train.precision=fp8", "checkpoint.keep_last=0"}); });
  CHECK(msg.find("train.lrr: unknown key (did you mean 'lr'?)") != std::string::npos);
  CHECK(msg.find("train.precision: 'fp8' is not one of fp32 | bf16 | fp16") != std::string::npos);
  CHECK(msg.find("checkpoint.keep_last: must be >= 1, got 0") != std::string::npos);
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
  train::ScheduleOptions s{"cosine", 1.0, 0.1, 10, 110, 0.2};
  CHECK(train::lr_at(0, s) == Approx(0.1));    // warmup: (step+1)/warmup * lr
  CHECK(train::lr_at(9, s) == Approx(1.0));
  CHECK(train::lr_at(10, s) == Approx(1.0));   // cosine starts at lr ...
  CHECK(train::lr_at(60, s) == Approx(0.55).epsilon(0.02));
  CHECK(train::lr_at(109, s) == Approx(0.1));  // ... and ends at min_lr on the last step
  s.kind = "linear";
  CHECK(train::lr_at(109, s) == Approx(0.1));
  s.kind = "constant";
  CHECK(train::lr_at(109, s) == Approx(1.0));
  s.kind = "wsd";  // stable until the last 20% of the steps, then linear to min_lr
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
  auto msg = error_of([&] { run(config_text("pre_bad"), {"model.pretrained=/nonexistent"}); });
  CHECK(msg.find("/nonexistent/config.json: config.json not found") == 0);
}
