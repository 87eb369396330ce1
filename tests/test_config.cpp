// Strict config loading: every bad input names file, line and key; all errors of a file are reported together.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "model/config.h"
#include "model/info.h"
#include "utils/json.h"
#include "utils/config.h"
#include "tests/test_helpers.h"
#include "utils/errors.h"

using namespace dsopen;
namespace fs = std::filesystem;
using dsopen::testing::TempDir;

namespace {

// A section struct decoded the way every folder decodes its own.
struct Train {
  double lr = 3e-4;
  int max_steps = 0;
  std::string schedule = "cosine";
  bool flag = false;
  std::vector<double> betas{0.9, 0.95};
};

Train decode_train(const config::Document& doc) {
  config::ErrorList errors;
  config::Reader root(doc, doc.root(), "", errors);
  Train t;
  config::Reader r = root.child("train");
  r.optional("lr", t.lr, config::greater_than(0));
  r.required("max_steps", t.max_steps, config::at_least(1));
  r.choice("schedule", t.schedule, {"cosine", "linear", "constant", "wsd"});
  r.optional("flag", t.flag);
  r.optional("betas", t.betas, 2);
  r.finish();
  root.finish();
  errors.throw_if_any();
  return t;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    CHECK(e.exit_code() == 2);  // config errors are usage errors
    return e.what();
  }
  FAIL("expected a dsopen::Error");
  return "";
}

}  // namespace

TEST_CASE("a valid config decodes into typed values", "[config]") {
  TempDir dir;
  auto path = dir.write("ok.yaml", "train:\n  lr: 1e-3\n  max_steps: 10\n  schedule: wsd\n  betas: [0.8, 0.9]\n");
  Train t = decode_train(config::Document::load(path));
  CHECK(t.lr == Approx(1e-3));
  CHECK(t.max_steps == 10);
  CHECK(t.schedule == "wsd");
  CHECK(t.betas == std::vector<double>{0.8, 0.9});
}

TEST_CASE("unknown key: file, line, key path and a suggestion", "[config]") {
  TempDir dir;
  auto path = dir.write("x.yaml", "train:\n  max_steps: 5\n  lrr: 0.1\n");
  auto msg = error_of([&] { decode_train(config::Document::load(path)); });
  CHECK(msg == path + ":3: train.lrr: unknown key (did you mean 'lr'?)");
}

TEST_CASE("unknown top-level section is reported with a suggestion", "[config]") {
  TempDir dir;
  auto path = dir.write("x.yaml", "train:\n  max_steps: 5\ntrian:\n  lr: 1\n");
  auto msg = error_of([&] { decode_train(config::Document::load(path)); });
  CHECK(msg == path + ":3: trian: unknown key (did you mean 'train'?)");
}

TEST_CASE("wrong type names the key and the bad value", "[config]") {
  TempDir dir;
  auto path = dir.write("x.yaml", "train:\n  max_steps: ten\n");
  auto msg = error_of([&] { decode_train(config::Document::load(path)); });
  CHECK(msg == path + ":2: train.max_steps: expected an integer, got 'ten'");
  auto path2 = dir.write("y.yaml", "train:\n  max_steps: 3\n  lr: [1, 2]\n");
  CHECK(error_of([&] { decode_train(config::Document::load(path2)); }) ==
        path2 + ":3: train.lr: expected a number, got a list");
}

TEST_CASE("missing required key names the section's location", "[config]") {
  TempDir dir;
  auto path = dir.write("x.yaml", "run: {}\ntrain:\n  lr: 0.1\n");
  auto msg = error_of([&] {
    config::Document doc = config::Document::load(path);
    config::ErrorList errors;
    config::Reader root(doc, doc.root(), "", errors);
    root.accept("run");
    Train t;
    config::Reader r = root.child("train");
    r.optional("lr", t.lr);
    r.required("max_steps", t.max_steps);
    r.finish();
    errors.throw_if_any();
  });
  CHECK(msg == path + ":2: train.max_steps: missing required key");
}

TEST_CASE("out of range and bad choice", "[config]") {
  TempDir dir;
  auto path = dir.write("x.yaml", "train:\n  max_steps: 0\n  lr: -1\n  schedule: cosin\n");
  auto msg = error_of([&] { decode_train(config::Document::load(path)); });
  // All three errors of the file come together, one per line, in file order of decoding.
  CHECK(msg.find(path + ":3: train.lr: must be > 0, got -1") != std::string::npos);
  CHECK(msg.find(path + ":2: train.max_steps: must be >= 1, got 0") != std::string::npos);
  CHECK(msg.find(path + ":4: train.schedule: 'cosin' is not one of cosine | linear | constant | wsd "
                        "(did you mean 'cosine'?)") != std::string::npos);
  CHECK(std::count(msg.begin(), msg.end(), '\n') == 2);
}

TEST_CASE("base: inheritance, later keys win, origins follow the file that set them", "[config]") {
  TempDir dir;
  dir.write("base.yaml", "train:\n  lr: 0.5\n  max_steps: 7\n  schedule: linear\n");
  auto child = dir.write("child.yaml", "base: base.yaml\ntrain:\n  max_steps: 9\n  lrr: 1\n");
  config::Document doc = config::Document::load(child);
  CHECK(doc.root()["train"]["lr"].as<double>() == 0.5);
  CHECK(doc.root()["train"]["max_steps"].as<int>() == 9);
  CHECK(doc.origin("train.lr").file == (dir.path / "base.yaml").string());
  CHECK(doc.origin("train.lr").line == 2);
  CHECK(doc.origin("train.max_steps").file == child);
  auto msg = error_of([&] { decode_train(doc); });
  CHECK(msg == child + ":4: train.lrr: unknown key (did you mean 'lr'?)");
}

TEST_CASE("missing base: file names the including file and line", "[config]") {
  TempDir dir;
  auto path = dir.write("x.yaml", "# comment\nbase: nope.yaml\n");
  auto msg = error_of([&] { config::Document::load(path); });
  CHECK(msg.rfind(path + ":2: base: file 'nope.yaml' not found", 0) == 0);
}

TEST_CASE("base: cycles are refused", "[config]") {
  TempDir dir;
  dir.write("a.yaml", "base: b.yaml\n");
  auto b = dir.write("b.yaml", "base: a.yaml\n");
  auto msg = error_of([&] { config::Document::load(b); });
  CHECK(msg.find("loops back") != std::string::npos);
}

TEST_CASE("YAML syntax error gives file:line:column", "[config]") {
  TempDir dir;
  auto path = dir.write("x.yaml", "train:\n  lr: [1, 2\n  max_steps: 3\n");
  auto msg = error_of([&] { config::Document::load(path); });
  CHECK(msg.rfind(path + ":", 0) == 0);
  CHECK(msg.find("YAML syntax error") != std::string::npos);
  auto missing = error_of([&] { config::Document::load((dir.path / "absent.yaml").string()); });
  CHECK(missing.find("absent.yaml: config file not found") != std::string::npos);
}

TEST_CASE("--set overrides are typed and validated like file keys", "[config]") {
  TempDir dir;
  auto path = dir.write("x.yaml", "train:\n  max_steps: 5\n");
  config::Document doc = config::Document::load(path);
  doc.apply_set("train.lr=2e-3");
  doc.apply_set("train.betas=[0.5, 0.6]");
  Train t = decode_train(doc);
  CHECK(t.lr == Approx(2e-3));
  CHECK(t.betas == std::vector<double>{0.5, 0.6});

  doc.apply_set("train.max_steps=abc");
  CHECK(error_of([&] { decode_train(doc); }) == "--set train.max_steps=abc: train.max_steps: expected an integer, got 'abc'");
  config::Document doc2 = config::Document::load(path);
  doc2.apply_set("train.lrr=1");
  CHECK(error_of([&] { decode_train(doc2); }) == "--set train.lrr=1: train.lrr: unknown key (did you mean 'lr'?)");
}

TEST_CASE("bad --set syntax is a usage error naming the argument", "[config]") {
  config::Document doc = config::Document::parse("train: {max_steps: 1}", "inline");
  CHECK(error_of([&] { doc.apply_set("train.lr"); }) ==
        "--set train.lr: missing '=' (write --set KEY=VALUE, for example --set train.lr=3e-4)");
  CHECK(error_of([&] { doc.apply_set("=3"); }).find("bad key ''") != std::string::npos);
  CHECK(error_of([&] { doc.apply_set("train..lr=3"); }).find("bad key 'train..lr'") != std::string::npos);
  CHECK(error_of([&] { doc.apply_set("train.max_steps.x=3"); }).find("'train.max_steps' is a value") !=
        std::string::npos);
}

TEST_CASE("dump() round-trips the resolved config", "[config]") {
  TempDir dir;
  dir.write("base.yaml", "train:\n  lr: 0.5\n  max_steps: 7\n");
  auto child = dir.write("child.yaml", "base: base.yaml\ntrain:\n  max_steps: 9\n");
  config::Document doc = config::Document::load(child);
  doc.apply_set("train.flag=true");
  config::Document again = config::Document::parse(doc.dump(), "dump");
  Train t = decode_train(again);
  CHECK(t.lr == 0.5);
  CHECK(t.max_steps == 9);
  CHECK(t.flag);
  CHECK(!again.root()["base"]);
}

TEST_CASE("model section: flavor plus overrides, validation names the key", "[config][model]") {
  TempDir dir;
  auto path = dir.write("m.yaml", "model:\n  flavor: tiny\n  hidden_size: 128\n");
  auto c = model::model_config_from_document(config::Document::load(path));
  CHECK(c.model_type == "deepseek_v3");
  CHECK(c.hidden_size == 128);
  CHECK(c.n_routed_experts == 8);

  auto bad = dir.write("b.yaml", "model:\n  flavor: tiny\n  num_experts_per_tok: 9\n");
  auto msg = error_of([&] { model::model_config_from_document(config::Document::load(bad)); });
  CHECK(msg.find("model.num_experts_per_tok: must be in [1, n_routed_experts=8]") != std::string::npos);

  auto typo = dir.write("t.yaml", "model:\n  flavor: tinny\n  hiden_size: 3\n");
  msg = error_of([&] { model::model_config_from_document(config::Document::load(typo)); });
  CHECK(msg.find(typo + ":2: model.flavor: unknown flavor 'tinny'") != std::string::npos);
  CHECK(msg.find("(did you mean 'tiny'?)") != std::string::npos);
  CHECK(msg.find(typo + ":3: model.hiden_size: unknown key (did you mean 'hidden_size'?)") != std::string::npos);

  auto groups = dir.write("g.yaml", "model:\n  flavor: tiny\n  n_group: 3\n");
  msg = error_of([&] { model::model_config_from_document(config::Document::load(groups)); });
  CHECK(msg.find("model.n_group: must divide n_routed_experts (8)") != std::string::npos);
}

TEST_CASE("the resolved config is saved into the run directory", "[config]") {
  TempDir dir;
  dir.write("base.yaml", "train:\n  lr: 0.5\n  max_steps: 7\n");
  auto child = dir.write("child.yaml", "base: base.yaml\ntrain:\n  max_steps: 9\n");
  config::Document doc = config::Document::load(child);
  doc.apply_set("train.lr=0.25");
  auto path = doc.save_resolved((dir.path / "run").string());
  CHECK(path == (dir.path / "run" / "config.resolved.yaml").string());
  Train t = decode_train(config::Document::load(path));  // what ran, loadable as a config again
  CHECK(t.lr == 0.25);
  CHECK(t.max_steps == 9);
}

TEST_CASE("repeated keys are refused: YAML configs, config.json and every JSON file we read", "[config]") {
  TempDir dir;
  auto yaml = dir.write("d.yaml", "train:\n  lr: 0.1\n  max_steps: 3\n  lr: 0.2\n");
  auto msg = error_of([&] { config::Document::load(yaml); });
  CHECK(msg.find(yaml + ":4: train.lr: duplicate key") != std::string::npos);
  // JSON read through the same loader (config.json): the value tools disagree on is named.
  auto hf = dir.write("config.json", R"({"model_type": "llama", "hidden_size": 64, "hidden_size": 128})");
  msg = error_of([&] { model::ModelConfig::from_hf_json_file(hf); });
  CHECK(msg.find(hf + ":1: hidden_size: duplicate key") != std::string::npos);
  // The strict JSON parser names the path of the repeated key.
  const std::string nested = R"({"a": {"b": 1, "c": {"d": 2, "d": 3}}})";
  try {
    json::parse(nested, "x.json");
    FAIL("a repeated key was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("x.json: duplicate key 'a.c.d'") != std::string::npos);
  }
  CHECK(json::parse(R"({"a": {"b": 1}, "c": {"b": 2}})", "y.json")["c"]["b"] == 2);  // same key, other objects
}

TEST_CASE("HF config.json: keys that change the math are implemented or refused by name", "[config][model]") {
  TempDir dir;
  auto load = [&](const std::string& body) {
    return model::ModelConfig::from_hf_json_file(dir.write("config.json", body));
  };
  const std::string v3 = R"("model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "v_head_dim": 16, "n_routed_experts": 8, "moe_intermediate_size": 32, "num_experts_per_tok": 2, "n_group": 4,
    "topk_group": 2, "first_k_dense_replace": 1)";
  CHECK(load("{" + v3 + "}").rope_interleave);
  CHECK_FALSE(load("{" + v3 + R"(, "rope_interleave": false})").rope_interleave);
  CHECK(load("{" + v3 + R"(, "qk_head_dim": 24})").qk_head_dim() == 24);
  auto msg = error_of([&] { load("{" + v3 + R"(, "qk_head_dim": 32})"); });
  CHECK(msg.find("qk_head_dim: is 32 but qk_nope_head_dim + qk_rope_head_dim = 24") != std::string::npos);
  msg = error_of([&] { load("{" + v3 + R"(, "attention_bias": true})"); });
  CHECK(msg.find("attention_bias: biases on MLA projections") != std::string::npos);
  msg = error_of([&] {
    load("{" + v3 + R"(, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})");
  });
  CHECK(msg.find("quantization_config: the weights are quantized (quant_method fp8)") != std::string::npos);

  std::string v2 = v3;
  v2.replace(v2.find("deepseek_v3"), 11, "deepseek_v2");
  msg = error_of([&] { load("{" + v2 + R"(, "topk_method": "group_limited_greedy", "rope_interleave": false})"); });
  CHECK(msg.find("rope_interleave: deepseek_v2 always uses the interleaved rope layout") != std::string::npos);

  const std::string llama = R"("model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2)";
  CHECK_NOTHROW(load("{" + llama + R"(, "mlp_bias": false, "pretraining_tp": 1})"));
  msg = error_of([&] { load("{" + llama + R"(, "mlp_bias": true})"); });
  CHECK(msg.find("mlp_bias: biases on gate/up/down projections are not supported") != std::string::npos);
  msg = error_of([&] { load("{" + llama + R"(, "rope_interleave": true})"); });
  CHECK(msg.find("rope_interleave: llama uses the rotate-half rope layout") != std::string::npos);

  std::string qwen = llama;
  qwen.replace(qwen.find("llama"), 5, "qwen2");
  CHECK_NOTHROW(load("{" + qwen + R"(, "use_sliding_window": false, "sliding_window": 4096, "max_window_layers": 28})"));
  msg = error_of([&] { load("{" + qwen + R"(, "use_sliding_window": true})"); });
  CHECK(msg.find("use_sliding_window: sliding-window attention is not supported") != std::string::npos);
  msg = error_of([&] { load("{" + qwen + R"(, "layer_types": ["full_attention", "sliding_attention"]})"); });
  CHECK(msg.find("layer_types: only full_attention layers are supported, found 'sliding_attention'") != std::string::npos);

  // eos_token_id: one id, a list (Llama 3.1, DeepSeek), or null; a list is written back as a list.
  CHECK(load("{" + llama + R"(, "eos_token_id": 7})").eos_token_id == std::vector<int64_t>{7});
  auto listed = load("{" + llama + R"(, "eos_token_id": [7, 9, 11]})");
  CHECK(listed.eos_token_id == std::vector<int64_t>{7, 9, 11});
  CHECK(listed.to_hf_json()["eos_token_id"] == nlohmann::json({7, 9, 11}));
  CHECK(load("{" + llama + R"(, "eos_token_id": null})").eos_token_id.empty());
  msg = error_of([&] { load("{" + llama + R"(, "eos_token_id": [7, "x"]})"); });
  CHECK(msg.find("eos_token_id: expected a token id") != std::string::npos);
  msg = error_of([&] { load("{" + llama + R"(, "eos_token_id": [7, 300]})"); });
  CHECK(msg.find("eos_token_id: 300 must be < vocab_size") != std::string::npos);
}
