// LoRA: adapters leave the base's output unchanged at init, merging equals base + adapter, only adapters train
// (base hash unchanged), exact resume with adapter-only checkpoints, the PEFT file layout, per-module ranks and
// rsLoRA scaling, a bf16 base, optimizer-state bytes against full fine-tuning, and the error messages.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "inference/loader.h"
#include "model/linear.h"
#include "model/lora.h"
#include "model/registry.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "tests/test_helpers.h"
#include "train/optimizer.h"
#include "train/options.h"
#include "train/trainer.h"
#include "utils/config.h"

using namespace dsopen;
namespace fs = std::filesystem;
using dsopen::testing::error_of;
using dsopen::testing::TempDir;

namespace {

model::ModelConfig debug_config(int64_t vocab = 256) {
  model::ModelConfig c = *model::find_flavor("debug");  // V3-shaped: MLA with q_lora, layer 1 MoE (8 experts + shared)
  c.vocab_size = vocab;
  c.use_mtp = false;
  return c;
}

model::CausalLM debug_model(uint64_t seed = 1, int64_t vocab = 256) {
  torch::manual_seed(seed);
  model::CausalLM m(debug_config(vocab));
  m->eval();
  return m;
}

torch::Tensor some_ids(int64_t vocab = 256) {
  torch::manual_seed(99);
  return torch::randint(0, vocab, {2, 12}, torch::kLong);
}

torch::Tensor logits(model::CausalLM m, const torch::Tensor& ids) {  // a holder: copies share the module
  torch::NoGradGuard no_grad;
  return m->forward(ids).logits;
}

// Gives every adapter a non-zero B so the adapters change the output.
void randomize_b(model::CausalLM& m, uint64_t seed = 5) {
  torch::manual_seed(seed);
  torch::NoGradGuard no_grad;
  for (auto& p : m->named_parameters())
    if (p.key().find(".lora_B.") != std::string::npos) p.value().normal_(0.0, 0.05);
}

// FNV-1a over names and bytes of the base state dict (parameters and buffers, adapters excluded).
uint64_t base_hash(model::CausalLM& m) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  };
  for (const auto& [name, t] : model::hf_state_dict(m)) {
    mix(name.data(), name.size());
    auto c = t.contiguous().cpu();
    mix(c.data_ptr(), c.numel() * c.element_size());
  }
  return h;
}

model::LinearImpl& projection(model::CausalLM& m, const std::string& path) {
  for (const auto& item : m->named_modules("", false))
    if (item.key() == path) return *dynamic_cast<model::LinearImpl*>(item.value().get());
  FAIL("no module " << path);
  throw;
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// The layer and the model
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("with B = 0 the adapted model's output equals the base model's exactly", "[lora]") {
  auto m = debug_model();
  const auto ids = some_ids();
  const auto base = logits(m, ids);
  const auto names_before = model::hf_state_dict(m);
  model::LoraConfig c;
  c.target_regex = "all-linear";
  c.routed_experts = true;
  const auto adapted = model::inject_lora(*m, c);
  CHECK(adapted.size() == 2 * 5 + 3 + 3 + 8 * 3);  // MLA x2 layers, dense MLP, shared expert, 8 routed experts
  CHECK(torch::equal(logits(m, ids), base));
  // Base names are unchanged (HF loading still works); adapters sit under each projection with PEFT's names.
  const auto names_after = model::hf_state_dict(m);
  REQUIRE(names_after.size() == names_before.size());
  for (const auto& [name, t] : names_before) CHECK(names_after.count(name));
  const auto params = m->named_parameters();
  REQUIRE(params.contains("model.layers.0.self_attn.q_a_proj.lora_A.weight"));
  CHECK(params["model.layers.0.self_attn.q_a_proj.lora_A.weight"].sizes() == torch::IntArrayRef({8, 64}));
  CHECK(params["model.layers.0.self_attn.q_a_proj.lora_B.weight"].sizes() == torch::IntArrayRef({32, 8}));
  CHECK(params["model.layers.0.self_attn.q_a_proj.lora_B.weight"].abs().sum().item<double>() == 0);
  CHECK(params.contains("model.layers.1.mlp.experts.7.down_proj.lora_A.weight"));
  CHECK(!params.contains("lm_head.lora_A.weight"));  // all-linear leaves the output layer alone, as PEFT does
}

TEST_CASE("A follows nn.Linear's kaiming-uniform init and the scale is alpha / r (rsLoRA: alpha / sqrt(r))", "[lora]") {
  auto m = debug_model();
  model::LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.target_modules = {"o_proj", "kv_b_proj"};
  c.rank_pattern = {{"kv_b_proj", 16}};
  c.alpha_pattern = {{"layers\\.1\\.self_attn\\.o_proj", 2}};
  model::inject_lora(*m, c);
  auto& o0 = projection(m, "model.layers.0.self_attn.o_proj");
  auto& o1 = projection(m, "model.layers.1.self_attn.o_proj");
  auto& kv = projection(m, "model.layers.0.self_attn.kv_b_proj");
  CHECK(o0.lora_rank == 4);
  CHECK(o0.lora_scale == Approx(2.0));
  CHECK(o1.lora_scale == Approx(0.5));
  CHECK(kv.lora_rank == 16);
  CHECK(kv.lora_scale == Approx(8.0 / 16));
  // kaiming_uniform(a = sqrt(5)) on [r, in] is U(-1/sqrt(in), 1/sqrt(in)).
  const double bound = 1.0 / std::sqrt(static_cast<double>(o0.weight.size(1)));
  CHECK(o0.lora_A->weight.abs().max().item<double>() <= bound);
  CHECK(o0.lora_A->weight.abs().max().item<double>() > 0.5 * bound);

  auto r = debug_model();
  c.use_rslora = true;
  c.rank_pattern.clear();
  c.alpha_pattern.clear();
  model::inject_lora(*r, c);
  CHECK(projection(r, "model.layers.0.self_attn.o_proj").lora_scale == Approx(8.0 / 2.0));
}

TEST_CASE("the layer computes x W^T + scale * B A x, and merging folds exactly that into W", "[lora]") {
  auto m = debug_model();
  model::LoraConfig c;
  c.target_modules = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  c.routed_experts = true;
  model::inject_lora(*m, c);
  randomize_b(m);
  auto& lin = projection(m, "model.layers.0.self_attn.kv_b_proj");
  torch::manual_seed(3);
  auto x = torch::randn({3, lin.weight.size(1)});
  torch::NoGradGuard no_grad;
  auto ref = torch::mm(x, lin.weight.t()) + torch::mm(torch::mm(x, lin.lora_A->weight.t()), lin.lora_B->weight.t()) * lin.lora_scale;
  CHECK(max_abs_diff(lin.forward(x), ref) < 1e-6);
  const auto expected_w = lin.weight + torch::mm(lin.lora_B->weight, lin.lora_A->weight) * lin.lora_scale;

  const auto ids = some_ids();
  const auto unmerged = logits(m, ids);
  CHECK(max_abs_diff(unmerged, logits(debug_model(), ids)) > 1e-3);  // the adapters do change the output
  CHECK(model::merge_lora(*m) == 2 * 5 + 3 + 3 + 8 * 3);
  CHECK(!model::has_lora(*m));
  CHECK(m->named_parameters().size() == debug_model()->named_parameters().size());
  CHECK(max_abs_diff(lin.weight, expected_w) < 1e-7);
  const double err = max_abs_diff(logits(m, ids), unmerged);
  INFO("merged vs unmerged logits, max abs difference " << err);
  CHECK(err <= 1e-5);
}

TEST_CASE("decoding with the KV cache (absorbed MLA) sees the kv_b_proj adapter", "[lora]") {
  auto m = debug_model();
  model::LoraConfig c;
  c.target_modules = {"kv_b_proj", "o_proj"};
  model::inject_lora(*m, c);
  randomize_b(m);
  const auto ids = some_ids();
  const auto full = logits(m, ids);
  torch::NoGradGuard no_grad;
  auto cache = m->make_cache(ids.size(0), ids.size(1));
  auto prefix = m->forward({ids.narrow(1, 0, 8), {}, &cache}).logits;
  auto step = m->forward({ids.narrow(1, 8, 4), {}, &cache}).logits;
  CHECK(max_abs_diff(torch::cat({prefix, step}, 1), full) < 1e-5);
}

TEST_CASE("dropout acts on the adapter's input in training only", "[lora]") {
  auto m = debug_model();
  model::LoraConfig c;
  c.dropout = 0.5;
  c.target_modules = {"o_proj"};
  model::inject_lora(*m, c);
  randomize_b(m);
  auto& lin = projection(m, "model.layers.0.self_attn.o_proj");
  auto x = torch::randn({4, lin.weight.size(1)});
  torch::NoGradGuard no_grad;
  lin.train();
  CHECK(!torch::equal(lin.forward(x), lin.forward(x)));
  lin.eval();
  CHECK(torch::equal(lin.forward(x), lin.forward(x)));
}

TEST_CASE("targets: names, regexes, all-linear, routed experts only when asked, never MTP", "[lora]") {
  auto cfg = debug_config();
  cfg.use_mtp = true;
  torch::manual_seed(1);
  model::CausalLM m(cfg);
  model::LoraConfig c;
  c.target_modules = {"gate_proj"};
  CHECK(model::lora_targets(*m, c) ==
        std::vector<std::string>{"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.shared_experts.gate_proj"});
  c.routed_experts = true;
  CHECK(model::lora_targets(*m, c).size() == 2 + 8);
  c.target_modules = {"self_attn.o_proj"};  // a longer suffix selects the same way as PEFT
  CHECK(model::lora_targets(*m, c).size() == 2);
  c.target_regex = R"(model\.layers\.1\.self_attn\.(q_b_proj|o_proj))";
  CHECK(model::lora_targets(*m, c) ==
        std::vector<std::string>{"model.layers.1.self_attn.q_b_proj", "model.layers.1.self_attn.o_proj"});
  c.target_regex = "all-linear";
  for (const auto& t : model::lora_targets(*m, c)) {
    CHECK(t.rfind("mtp.", 0) != 0);
    CHECK(t != "lm_head");
  }
}

TEST_CASE("a bf16 base under fp32 training: adapters stay fp32 and get the only gradients", "[lora]") {
  auto m = debug_model();
  const auto ids = some_ids();
  const auto fp32 = logits(m, ids);
  model::LoraConfig c;
  c.target_modules = {"q_b_proj", "kv_b_proj", "o_proj"};
  model::inject_lora(*m, c);
  const auto n = model::freeze_base(*m, torch::kBFloat16);
  CHECK(n.trainable > 0);
  CHECK(n.trainable < n.total / 10);
  auto& lin = projection(m, "model.layers.0.self_attn.o_proj");
  CHECK(lin.weight.scalar_type() == torch::kBFloat16);
  CHECK(lin.lora_A->weight.scalar_type() == torch::kFloat32);
  const auto bf16 = logits(m, ids);
  CHECK(bf16.scalar_type() == torch::kFloat32);
  CHECK(max_abs_diff(bf16, fp32) < 0.05 * fp32.abs().max().item<double>());  // bf16 rounding of the weights only
  m->train();
  auto out = m->forward(ids, ids);
  out.loss.backward();
  for (const auto& p : m->named_parameters()) {
    INFO(p.key());
    CHECK(p.value().grad().defined() == model::is_lora_parameter(p.key()));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// PEFT files
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("save_adapter writes PEFT's layout; load_adapter gives the same model", "[lora][peft]") {
  TempDir tmp;
  auto m = debug_model();
  model::LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.target_modules = {"q_a_proj", "kv_b_proj", "o_proj"};
  c.rank_pattern = {{"kv_b_proj", 6}};
  c.alpha_pattern = {{"o_proj", 3.5}};
  model::inject_lora(*m, c);
  randomize_b(m);
  const auto ids = some_ids();
  const auto ref = logits(m, ids);
  model::save_adapter(*m, tmp / "adapter", "runs/tiny/checkpoints/step_00000300");

  auto j = nlohmann::json::parse(std::ifstream(tmp / "adapter/adapter_config.json"));
  CHECK(j["peft_type"] == "LORA");
  CHECK(j["task_type"] == "CAUSAL_LM");
  CHECK(j["r"] == 4);
  CHECK(j["lora_alpha"] == 8);
  CHECK(j["bias"] == "none");
  CHECK(j["fan_in_fan_out"] == false);
  CHECK(j["use_rslora"] == false);
  CHECK(j["base_model_name_or_path"] == "runs/tiny/checkpoints/step_00000300");
  CHECK(j["target_modules"] == nlohmann::json({"q_a_proj", "kv_b_proj", "o_proj"}));
  CHECK(j["rank_pattern"] == nlohmann::json({{"kv_b_proj", 6}}));
  CHECK(j["alpha_pattern"] == nlohmann::json({{"o_proj", 3.5}}));
  model::SafetensorsFile st(tmp / "adapter/adapter_model.safetensors");
  CHECK(st.names().size() == 2 * 3 * 2);
  CHECK(st.contains("base_model.model.model.layers.1.self_attn.kv_b_proj.lora_A.weight"));
  CHECK(st.shape("base_model.model.model.layers.1.self_attn.kv_b_proj.lora_A.weight") == std::vector<int64_t>{6, 16});
  CHECK(st.shape("base_model.model.model.layers.1.self_attn.kv_b_proj.lora_B.weight") == std::vector<int64_t>{64, 6});

  auto fresh = debug_model();
  CHECK(model::load_adapter(*fresh, tmp / "adapter").size() == 6);
  CHECK(projection(fresh, "model.layers.0.self_attn.o_proj").lora_scale == Approx(3.5 / 4));
  CHECK(torch::equal(logits(fresh, ids), ref));

  // A subset that names cannot express is written as full module paths.
  auto sub = debug_model();
  model::LoraConfig only1;
  only1.target_regex = R"(model\.layers\.1\.self_attn\.o_proj)";
  model::inject_lora(*sub, only1);
  model::save_adapter(*sub, tmp / "sub");
  auto js = nlohmann::json::parse(std::ifstream(tmp / "sub/adapter_config.json"));
  CHECK(js["target_modules"] == nlohmann::json({"model.layers.1.self_attn.o_proj"}));
}

TEST_CASE("bad input gives one-line errors", "[lora][errors]") {
  TempDir tmp;
  auto one_line = [](const std::string& msg) {
    INFO(msg);
    CHECK(msg.find('\n') == std::string::npos);
    return msg;
  };
  auto m = debug_model();
  model::LoraConfig c;
  c.target_modules = {"k_proj", "v_proj"};  // MHA names: an MLA model has neither
  std::string msg = one_line(error_of([&] { model::inject_lora(*m, c); }));
  CHECK(msg.find("lora.target_modules: selects no projection of this model") != std::string::npos);
  CHECK(msg.find("kv_b_proj") != std::string::npos);  // lists what there is
  c.target_modules = {"kv_b_projj"};
  msg = one_line(error_of([&] { model::inject_lora(*m, c); }));
  CHECK(msg.find("'kv_b_projj' is not a projection of this model (did you mean 'kv_b_proj'?)") != std::string::npos);
  c.target_modules = {"o_proj"};
  c.r = 0;
  msg = one_line(error_of([&] { model::inject_lora(*m, c); }));
  CHECK(msg.find("lora.r: must be >= 1, got 0") != std::string::npos);
  c.r = 8;
  c.rank_pattern = {{"o_proj", -2}};
  msg = one_line(error_of([&] { model::inject_lora(*m, c); }));
  CHECK(msg.find("lora.rank_pattern: 'o_proj': must be >= 1, got -2") != std::string::npos);
  c.rank_pattern.clear();
  c.target_regex = "model.layers.(";
  msg = one_line(error_of([&] { model::inject_lora(*m, c); }));
  CHECK(msg.find("is not a valid regular expression") != std::string::npos);

  msg = one_line(error_of([&] { model::load_adapter(*m, tmp / "nope"); }));
  CHECK(msg.find("nope: adapter directory not found") != std::string::npos);
  fs::create_directories(tmp / "empty");
  msg = one_line(error_of([&] { model::load_adapter(*m, tmp / "empty"); }));
  CHECK(msg.find("adapter_config.json: missing") != std::string::npos);

  // An adapter trained on another shape of base.
  auto cfg = debug_config();
  cfg.q_lora_rank = 48;
  torch::manual_seed(1);
  model::CausalLM other(cfg);
  model::LoraConfig q;
  q.target_modules = {"q_a_proj"};
  model::inject_lora(*other, q);
  model::save_adapter(*other, tmp / "other");
  auto fresh = debug_model();
  msg = one_line(error_of([&] { model::load_adapter(*fresh, tmp / "other"); }));
  CHECK(msg.find("model.layers.0.self_attn.q_a_proj: adapter shapes disagree with the base") != std::string::npos);
  CHECK(msg.find("[48, 64]") != std::string::npos);
  CHECK(msg.find("[32, 64]") != std::string::npos);
  CHECK(!model::has_lora(*fresh));  // nothing half-attached

  // An adapter of a module the model lacks, and a DoRA adapter.
  model::LoraConfig all;
  all.target_modules = {"o_proj"};
  auto three = debug_config();
  three.num_hidden_layers = 3;
  model::CausalLM bigger(three);
  model::inject_lora(*bigger, all);
  model::save_adapter(*bigger, tmp / "bigger");
  msg = one_line(error_of([&] { model::load_adapter(*fresh, tmp / "bigger"); }));
  CHECK(msg.find("adapts 'model.layers.2.self_attn.o_proj', which this model does not have") != std::string::npos);
  auto j = nlohmann::json::parse(std::ifstream(tmp / "bigger/adapter_config.json"));
  j["use_dora"] = true;
  std::ofstream(tmp / "bigger/adapter_config.json") << j.dump();
  msg = one_line(error_of([&] { model::load_adapter(*fresh, tmp / "bigger"); }));
  CHECK(msg.find("DoRA (use_dora: true) is not supported") != std::string::npos);
}

TEST_CASE("adapter_config.json keys that change what peft computes are implemented or refused", "[lora][errors]") {
  TempDir tmp;
  auto m = debug_model();
  model::LoraConfig c;
  c.target_modules = {"q_a_proj", "o_proj"};
  model::inject_lora(*m, c);
  model::save_adapter(*m, tmp / "a");
  const auto original = nlohmann::json::parse(std::ifstream(tmp / "a/adapter_config.json"));
  auto with = [&](const std::string& key, const nlohmann::json& value) {
    auto j = original;
    j[key] = value;
    std::ofstream(tmp / "a/adapter_config.json") << j.dump();
    auto fresh = debug_model();
    return error_of([&] { model::load_adapter(*fresh, tmp / "a"); });
  };
  CHECK(with("layers_to_transform", {0}).find("layers_to_transform [0] is not supported") != std::string::npos);
  CHECK(with("exclude_modules", {"o_proj"}).find("which exclude_modules in") != std::string::npos);
  CHECK(with("layer_replication", {{0, 1}}).find("layer_replication") != std::string::npos);
  CHECK(with("alora_invocation_tokens", {5}).find("alora_invocation_tokens") != std::string::npos);
  CHECK(with("lora_bias", true).find("lora_bias true is not supported") != std::string::npos);
  // peft adapts only what target_modules names: an adapter for another module is not silently applied.
  const std::string msg = with("target_modules", {"q_a_proj"});
  CHECK(msg.find("holds an adapter for model.layers.0.self_attn.o_proj, which target_modules") != std::string::npos);
  // Inert values load.
  auto j = original;
  j["layers_to_transform"] = nullptr;
  j["exclude_modules"] = nlohmann::json::array();
  j["init_lora_weights"] = "gaussian";
  std::ofstream(tmp / "a/adapter_config.json") << j.dump();
  auto fresh = debug_model();
  CHECK(model::load_adapter(*fresh, tmp / "a").size() == 4);
}

TEST_CASE("the lora: section decodes strictly", "[lora][config]") {
  // model.pretrained must hold a config.json; write one.
  TempDir tmp;
  auto base = debug_model();
  model::save_hf_model(base, tmp.path.string());
  auto decode_in = [&](const std::string& lora) {
    auto doc = config::Document::parse("model: {pretrained: " + tmp.path.string() +
                                           "}\ntokenizer: {path: x.model}\ndata: {train: [x]}\nlora: " + lora + "\n",
                                       "lora.yaml");
    return train::decode_job(doc);
  };
  auto job = decode_in("{enabled: true, r: 4, alpha: 8, target_modules: [q_a_proj, o_proj], rank_pattern: {o_proj: 2}, "
                       "alpha_pattern: {o_proj: 1.5}, use_rslora: true, routed_experts: true, base_dtype: bf16}");
  CHECK(job.lora.enabled);
  CHECK(job.lora.config.r == 4);
  CHECK(job.lora.config.target_modules == std::vector<std::string>{"q_a_proj", "o_proj"});
  CHECK(job.lora.config.rank_pattern == std::vector<std::pair<std::string, int64_t>>{{"o_proj", 2}});
  CHECK(job.lora.config.alpha_pattern == std::vector<std::pair<std::string, double>>{{"o_proj", 1.5}});
  CHECK(job.lora.config.use_rslora);
  CHECK(job.lora.base_dtype == torch::kBFloat16);  // decoded once into a dtype
  // A checkpoints directory stands for the checkpoint its `latest` file names.
  model::save_hf_model(base, (tmp.path / "ck" / "step_00000007").string());
  tmp.write("ck/latest", "step_00000007\n");
  {
    auto doc = config::Document::parse("model: {pretrained: " + (tmp.path / "ck").string() +
                                           "}\ntokenizer: {path: x.model}\ndata: {train: [x]}\nlora: {enabled: true}\n",
                                       "lora.yaml");
    CHECK(train::decode_job(doc).model.pretrained == (tmp.path / "ck" / "step_00000007").string());
  }
  job = decode_in("{enabled: true, target_modules: '.*\\.o_proj'}");
  CHECK(job.lora.config.target_regex == ".*\\.o_proj");
  CHECK(job.lora.config.target_modules.empty());

  std::string msg = error_of([&] { decode_in("{enabled: true, r: 0, rr: 3, dropout: 2, rank_pattern: {o_proj: 0}}"); });
  CHECK(msg.find("lora.yaml:4: lora.r: must be >= 1, got 0") != std::string::npos);
  CHECK(msg.find("lora.rr: unknown key (did you mean 'r'?)") != std::string::npos);
  CHECK(msg.find("lora.dropout:") != std::string::npos);
  CHECK(msg.find("lora.rank_pattern: 'o_proj': must be >= 1, got 0") != std::string::npos);
  msg = error_of([&] { decode_in("{base_dtype: fp8}"); });
  CHECK(msg.find("'fp8' is not one of fp32 | bf16") != std::string::npos);
  msg = error_of([&] {
    auto doc = config::Document::parse("model: {flavor: debug}\ntokenizer: {path: x.model}\ndata: {train: [x]}\n"
                                       "lora: {enabled: true}\n", "lora.yaml");
    train::decode_job(doc);
  });
  CHECK(msg.find("lora.enabled: LoRA adapts a pretrained model: set model.pretrained") != std::string::npos);
}

// ---------------------------------------------------------------------------------------------------------------
// Optimizer state
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("r = 8 LoRA needs under 5% of full fine-tuning's optimizer state on the tiny model", "[lora][memory]") {
  train::AdamWOptions ao;
  torch::manual_seed(1);
  model::CausalLM full(*model::find_flavor("tiny"));
  std::vector<std::pair<std::string, torch::Tensor>> all;
  for (auto& p : full->named_parameters()) all.push_back({p.key(), p.value()});
  const int64_t full_bytes = train::FlatAdamW(all, ao).state_bytes();

  torch::manual_seed(1);
  model::CausalLM lora(*model::find_flavor("tiny"));
  model::LoraConfig c;  // r = 8 on the projections configs/lora.yaml adapts: attention, dense MLP, shared experts
  c.target_modules = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  model::inject_lora(*lora, c);
  const auto counts = model::freeze_base(*lora);
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (auto& p : lora->named_parameters()) named.push_back({p.key(), p.value()});
  const int64_t lora_bytes = train::FlatAdamW(named, ao).state_bytes();
  const double ratio = static_cast<double>(lora_bytes) / full_bytes;
  WARN("optimizer state: full fine-tuning " << full_bytes << " bytes, LoRA r=8 " << lora_bytes << " bytes ("
                                            << 100 * ratio << "%), trainable " << counts.trainable << " of "
                                            << counts.total << " parameters");
  CHECK(lora_bytes == 8 * counts.trainable);
  CHECK(ratio < 0.05);
}

// ---------------------------------------------------------------------------------------------------------------
// Training runs
// ---------------------------------------------------------------------------------------------------------------

namespace {

// Tokenizer, shards and a saved base model, built once per process.
const fs::path& workdir() {
  static fs::path dir = [] {
    auto d = fs::temp_directory_path() / ("dsopen_lora_" + std::to_string(::getpid()));
    fs::create_directories(d);
    auto base = debug_model(11, 512);
    model::save_hf_model(base, (d / "base").string());
    return d;
  }();
  return dir;
}

std::string config_text(const std::string& run, const std::string& lora) {
  const std::string w = workdir().string();
  return "run: {name: " + run + ", output_dir: " + w + "/" + run + ", seed: 7, log_every: 100, threads: 2}\n" +
         "model: {pretrained: " + w + "/base}\n"
         "tokenizer:\n  path: " + w + "/tok.model\n"
         "  train: {inputs: [/usr/share/games/fortunes/fortunes], vocab_size: 512, character_coverage: 0.999,\n"
         "          user_symbols: [\"<|System|>\", \"<|User|>\", \"<|Assistant|>\", \"<|end|>\"]}\n"
         "data:\n  train: [" + w + "/shards/f_*.bin]\n  seq_len: 32\n  valid_fraction: 0.05\n"
         "  build: {inputs: [/usr/share/games/fortunes/fortunes], output: " + w + "/shards/f, doc_separator: \"%\"}\n"
         "train: {max_steps: 8, micro_batch_size: 4, lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 2, eval_steps: 2}\n"
         "checkpoint: {every: 4, keep_last: 5}\n"
         "lora: " + lora + "\n";
}

train::JobConfig job_of(const std::string& text, const std::vector<std::string>& sets = {}) {
  auto doc = config::Document::parse(text, "test.yaml");
  for (const auto& s : sets) doc.apply_set(s);
  return train::decode_job(doc);
}

const std::string kLora = "{enabled: true, r: 4, alpha: 8, target_modules: [q_a_proj, q_b_proj, kv_b_proj, o_proj, "
                          "gate_proj, up_proj, down_proj], routed_experts: true}";

}  // namespace

TEST_CASE("a LoRA run changes only the adapters, saves only them, and merging reproduces its model", "[lora][train]") {
  train::Trainer t(job_of(config_text("only_adapters", kLora)), "# test\n");
  auto& m = t.model();
  const uint64_t before = base_hash(m);
  std::map<std::string, torch::Tensor> adapters_before;
  for (const auto& p : m->named_parameters())
    if (model::is_lora_parameter(p.key())) adapters_before[p.key()] = p.value().detach().clone();
  REQUIRE(!adapters_before.empty());
  const auto r = t.run();
  REQUIRE(r.losses.size() == 8);
  CHECK(base_hash(m) == before);  // weights and the MoE correction biases
  int changed = 0;
  for (const auto& p : m->named_parameters())
    if (adapters_before.count(p.key())) changed += !torch::equal(p.value(), adapters_before[p.key()]);
  CHECK(changed == static_cast<int>(adapters_before.size()));

  // The checkpoint: the adapter in PEFT layout and the optimizer state, no model weights.
  const fs::path ck = r.last_checkpoint;
  CHECK(fs::exists(ck / "adapter_config.json"));
  CHECK(fs::exists(ck / "adapter_model.safetensors"));
  CHECK(fs::exists(ck / "optimizer"));
  CHECK(!fs::exists(ck / "model.safetensors"));
  model::SafetensorsFile st((ck / "adapter_model.safetensors").string());
  CHECK(st.names().size() == adapters_before.size());
  for (const auto& n : st.names()) CHECK(adapters_before.count(n.substr(std::string("base_model.model.").size())));
  const auto adapter_bytes = fs::file_size(ck / "adapter_model.safetensors");
  const auto base_bytes = fs::file_size(workdir() / "base/model.safetensors");
  CHECK(adapter_bytes < base_bytes / 4);

  // Base from its directory + the saved adapter == the trained model; merged == base + adapter.
  m->eval();
  const auto ids = some_ids(512);
  const auto trained = logits(m, ids);
  auto again = inference::load_model((workdir() / "base").string());
  model::load_adapter(*again, ck.string());
  again->eval();
  CHECK(max_abs_diff(logits(again, ids), trained) < 1e-6);
  model::merge_lora(*again);
  const double err = max_abs_diff(logits(again, ids), trained);
  INFO("merged vs trained logits " << err);
  CHECK(err <= 1e-5);
  auto base_only = inference::load_model((workdir() / "base").string());
  CHECK(max_abs_diff(trained, logits(base_only, ids)) > 1e-4);
}

TEST_CASE("LoRA resume is exact (pretraining and SFT data, with dropout)", "[lora][train][resume]") {
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"pretrain", {}},
      {"sft", {"data.format=sft", "data.train=[configs/data/chat.jsonl]", "data.valid=[configs/data/chat_valid.jsonl]",
               "data.seq_len=48", "lora.dropout=0.1"}},
  };
  for (const auto& [name, sets] : cases) {
    INFO(name);
    train::Trainer straight_t(job_of(config_text("resume_straight_" + name, kLora), sets), "# test\n");
    const auto straight = straight_t.run();
    auto resumed_sets = sets;
    resumed_sets.push_back("checkpoint.resume=" +
                           (workdir() / ("resume_straight_" + name) / "checkpoints/step_00000004").string());
    train::Trainer resumed_t(job_of(config_text("resume_resumed_" + name, kLora), resumed_sets), "# test\n");
    const auto resumed = resumed_t.run();
    REQUIRE(resumed.losses.size() == 4);
    for (int i = 0; i < 4; ++i) CHECK(resumed.losses[i] == straight.losses[4 + i]);
  }
}

TEST_CASE("a LoRA run starts from a saved adapter, and mixing run kinds is refused", "[lora][train]") {
  const auto first = train::Trainer(job_of(config_text("first", kLora)), "").run();
  // Continue training the saved adapter in a new run (its structure comes from the adapter files).
  train::Trainer cont(job_of(config_text("continued", "{enabled: true, adapter: " + first.last_checkpoint + "}"),
                             {"train.max_steps=2"}),
                      "");
  auto& m = cont.model();
  auto again = inference::load_model((workdir() / "base").string());
  model::load_adapter(*again, first.last_checkpoint);
  m->eval();
  const auto ids = some_ids(512);
  CHECK(torch::equal(logits(m, ids), logits(again, ids)));
  cont.run();

  // A full fine-tuning checkpoint cannot resume a LoRA run, nor the reverse.
  std::string msg = error_of([&] {
    train::Trainer(job_of(config_text("mixed", kLora), {"checkpoint.resume=" + first.last_checkpoint, "lora.enabled=false"}), "");
  });
  CHECK(msg.find("holds a LoRA adapter, not model weights") != std::string::npos);
  msg = error_of([&] {
    train::Trainer(job_of(config_text("mixed2", kLora), {"checkpoint.resume=" + first.last_checkpoint, "lora.r=2"}), "");
  });
  CHECK(msg.find("differ from this run's") != std::string::npos);
}

TEST_CASE("activation checkpointing gives the adapters the same gradients (frozen embedding, dropout)", "[lora][train]") {
  auto grads = [](bool checkpointing) {
    auto m = debug_model();
    model::LoraConfig c;
    c.dropout = 0.2;
    c.target_regex = "all-linear";
    model::inject_lora(*m, c);
    randomize_b(m);
    model::freeze_base(*m);
    m->set_activation_checkpointing(checkpointing);
    m->train();
    const auto ids = some_ids();
    torch::manual_seed(42);
    m->forward(ids, ids).loss.backward();
    std::map<std::string, torch::Tensor> out;
    for (const auto& p : m->named_parameters())
      if (model::is_lora_parameter(p.key())) out[p.key()] = p.value().grad().defined() ? p.value().grad().clone() : torch::Tensor();
    return out;
  };
  const auto plain = grads(false), checkpointed = grads(true);
  REQUIRE(plain.size() == checkpointed.size());
  for (const auto& [name, g] : plain) {
    INFO(name);
    REQUIRE(g.defined());
    REQUIRE(checkpointed.at(name).defined());
    CHECK(max_abs_diff(checkpointed.at(name), g) <= 1e-6 * std::max(1.0, g.abs().max().item<double>()));
  }
}

TEST_CASE("a LoRA run with a bf16 base trains under fp32 and bf16 precision", "[lora][train]") {
  for (const std::string precision : {"fp32", "bf16"}) {
    INFO(precision);
    train::Trainer t(job_of(config_text("bf16_base_" + precision, kLora),
                            {"lora.base_dtype=bf16", "train.precision=" + precision, "train.max_steps=6", "checkpoint.every=0"}),
                     "");
    CHECK(projection(t.model(), "model.layers.0.self_attn.o_proj").weight.scalar_type() == torch::kBFloat16);
    const auto r = t.run();
    REQUIRE(r.losses.size() == 6);
    for (double l : r.losses) CHECK(std::isfinite(l));
    CHECK(r.losses.back() < r.losses.front());
  }
}
