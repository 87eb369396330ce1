// Whole-model behaviour: HF parameter names, causality, cached decoding == full forward (MHA, GQA, MLA),
// MLA absorbed == expanded, MoE == per-token loop, gradients everywhere, activation checkpointing.
#include <catch2/catch.hpp>

#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstring>
#include <optional>

#include "model/decode_step.h"
#include "model/fused_ops.h"
#include "model/registry.h"
#include "model/tile_rows.h"
#include "model/transformer.h"
#include "utils/compat.h"

using namespace dsopen::model;

namespace {

ModelConfig small(const std::string& kind) {
  ModelConfig c = *find_flavor("debug");  // V3-style MLA + MoE + MTP
  if (kind == "mla_v2") {
    c.model_type = "deepseek_v2";
    c.scoring_func = "softmax";
    c.topk_method = "group_limited_greedy";
    c.q_lora_rank = 0;
    c.use_mtp = false;
    c.norm_topk_prob = false;
    c.rope_scaling.type = "yarn";
    c.rope_scaling.factor = 4;
    c.rope_scaling.original_max_position_embeddings = 64;
    c.rope_scaling.mscale = 0.707;
    c.rope_scaling.mscale_all_dim = 0.707;
  } else if (kind == "mha" || kind == "gqa" || kind == "qwen2") {
    c = *find_flavor("tiny-dense");
    c.vocab_size = 256;
    c.hidden_size = 64;
    c.intermediate_size = 96;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = kind == "gqa" ? 2 : 4;
    c.max_position_embeddings = 128;
    if (kind == "qwen2") c.model_type = "qwen2";
  } else if (kind != "mla_v3") {
    // The other families on the same small dense base; each one's own components switched on.
    c = small("gqa");
    c.model_type = kind;
    if (kind == "glm4" || kind == "glm") {
      c.attention_bias = true;
      c.partial_rotary_factor = 0.5;
    } else if (kind == "qwen3") {
      c.head_dim = 24;
      c.attention_bias = true;
    } else if (kind == "qwen2_moe" || kind == "qwen3_moe" || kind == "mixtral") {
      c.num_hidden_layers = 3;
      c.n_routed_experts = 4;
      c.num_experts_per_tok = 2;
      c.moe_intermediate_size = kind == "mixtral" ? c.intermediate_size : 32;
      c.shared_expert_intermediate_size = kind == "qwen2_moe" ? 40 : 0;
      c.attention_bias = kind == "qwen2_moe";
      c.norm_topk_prob = kind != "qwen2_moe";
      if (kind == "qwen3_moe") c.decoder_sparse_step = 2;  // layer 1 MoE, 0 and 2 dense
      if (kind == "qwen2_moe") c.mlp_only_layers = {2};
    } else if (kind == "llama3") {
      c.model_type = "llama";
      c.rope_scaling.type = "llama3";
      c.rope_scaling.factor = 8;
      c.rope_scaling.original_max_position_embeddings = 16;
    }
  }
  return c;
}

// Every family the architecture table knows, on small shapes.
const std::vector<const char*> kFamilies = {"mha",  "gqa", "qwen2", "qwen3", "glm", "glm4", "mla_v2", "mla_v3",
                                            "qwen2_moe", "qwen3_moe", "mixtral", "llama3"};

CausalLM make(const ModelConfig& c, uint64_t seed = 0) {
  torch::manual_seed(seed);
  CausalLM m(c);
  m->eval();
  return m;
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

TEST_CASE("parameter names are HuggingFace checkpoint names and counts agree", "[model][forward]") {
  ModelConfig c = small("mla_v3");
  CausalLM m = make(c);
  auto params = m->named_parameters();
  for (const char* name : {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                           "model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_a_layernorm.weight",
                           "model.layers.0.self_attn.q_b_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                           "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.0.self_attn.kv_b_proj.weight",
                           "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                           "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
                           "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.1.input_layernorm.weight",
                           "mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.eh_proj.weight",
                           "mtp.0.shared_head.norm.weight", "mtp.0.mlp.experts.0.gate_proj.weight"}) {
    INFO(name);
    CHECK(params.contains(name));
  }
  CHECK(m->named_buffers().contains("model.layers.1.mlp.gate.e_score_correction_bias"));
  int64_t total = 0;
  for (auto& p : m->parameters()) total += p.numel();
  CHECK(total == count_parameters(c).total);  // the formula and the built module agree

  for (const char* kind : kFamilies) {
    ModelConfig ck = small(kind);
    CausalLM mk = make(ck);
    int64_t n = 0;
    for (auto& p : mk->parameters()) n += p.numel();
    INFO(kind);
    CHECK(n == count_parameters(ck).total);
  }
  CHECK(make(small("qwen2"))->named_parameters().contains("model.layers.0.self_attn.k_proj.bias"));
  CHECK(!make(small("mha"))->named_parameters().contains("model.layers.0.self_attn.k_proj.bias"));
  // Each family's HF names (transformers' save_pretrained spelling).
  const std::vector<std::pair<const char*, std::vector<const char*>>> names = {
      {"qwen3", {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight",
                 "model.layers.0.self_attn.o_proj.bias"}},
      {"glm", {"model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.self_attn.q_proj.bias"}},
      {"glm4", {"model.layers.0.post_self_attn_layernorm.weight", "model.layers.0.post_mlp_layernorm.weight"}},
      {"qwen2_moe", {"model.layers.0.mlp.shared_expert.gate_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                     "model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.2.mlp.up_proj.weight",
                     "model.layers.0.mlp.gate.weight"}},
      {"qwen3_moe", {"model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.experts.0.down_proj.weight"}},
      {"mixtral", {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.2.block_sparse_moe.experts.3.w1.weight",
                   "model.layers.0.block_sparse_moe.experts.0.w2.weight", "model.layers.0.block_sparse_moe.experts.0.w3.weight"}},
  };
  for (const auto& [kind, list] : names) {
    auto params = make(small(kind))->named_parameters();
    for (const char* n : list) {
      INFO(kind << " " << n);
      CHECK(params.contains(n));
    }
  }
  CHECK(!make(small("glm"))->named_parameters().contains("model.layers.0.self_attn.o_proj.bias"));
  CHECK(!make(small("glm"))->named_parameters().contains("model.layers.0.post_mlp_layernorm.weight"));
}

TEST_CASE("Linear initialises as torch::nn::Linear; SkipWeightInit leaves weights to the loader", "[model][forward]") {
  for (bool bias : {false, true}) {
    torch::manual_seed(3);
    torch::nn::Linear reference(torch::nn::LinearOptions(48, 20).bias(bias));
    torch::manual_seed(3);
    Linear ours(torch::nn::LinearOptions(48, 20).bias(bias));
    CHECK(torch::equal(ours->weight, reference->weight));
    CHECK(ours->bias.defined() == bias);
    if (bias) CHECK(torch::equal(ours->bias, reference->bias));
    CHECK(ours->named_parameters().size() == reference->named_parameters().size());
  }
  // Under the guard no module draws from the generator (nothing is initialised), and the guard restores the
  // previous state when it ends.
  torch::manual_seed(9);
  const auto expected_next = torch::rand({4});
  torch::manual_seed(9);
  {
    SkipWeightInit outer;
    {
      SkipWeightInit inner;
    }
    CHECK(SkipWeightInit::active());
    Linear skipped(torch::nn::LinearOptions(48, 20).bias(true));
    CHECK(skipped->weight.sizes() == torch::IntArrayRef({20, 48}));
    CausalLM whole(*find_flavor("debug"));  // embedding, MoE, MTP: nothing draws
    CHECK(whole->model->embed_tokens->weight.requires_grad());
  }
  CHECK_FALSE(SkipWeightInit::active());
  CHECK(torch::equal(torch::rand({4}), expected_next));
  torch::manual_seed(9);
  Linear initialised(torch::nn::LinearOptions(48, 20));  // draws: the generator moves on
  CHECK_FALSE(torch::equal(torch::rand({4}), expected_next));
}

TEST_CASE("causality: changing token t never changes logits before t", "[model][forward]") {
  for (const char* kind : kFamilies) {
    INFO(kind);
    CausalLM m = make(small(kind));
    torch::NoGradGuard ng;
    auto ids = torch::randint(3, 256, {2, 24}, torch::kLong);
    auto changed = ids.clone();
    const int64_t t = 13;
    changed.index_put_({torch::indexing::Slice(), t}, (ids.index({torch::indexing::Slice(), t}) + 7) % 256);
    auto a = m->forward(ids).logits, b = m->forward(changed).logits;
    CHECK(max_abs_diff(a.narrow(1, 0, t), b.narrow(1, 0, t)) < 1e-5);
    CHECK(max_abs_diff(a.narrow(1, t, 1), b.narrow(1, t, 1)) > 1e-4);  // position t itself does change
  }
}

TEST_CASE("cached incremental decoding equals the full forward (every family)", "[model][forward][cache]") {
  for (const char* kind : kFamilies) {
    INFO(kind);
    CausalLM m = make(small(kind), 3);
    torch::NoGradGuard ng;
    auto ids = torch::randint(3, 256, {2, 20}, torch::kLong);
    auto full = m->forward(ids).logits;  // [2, 20, V]
    KVCache cache = m->make_cache(2, 32);
    std::vector<torch::Tensor> parts;
    parts.push_back(m->forward({ids.narrow(1, 0, 7), {}, &cache}).logits);   // prefill
    parts.push_back(m->forward({ids.narrow(1, 7, 3), {}, &cache}).logits);   // a chunk with a prefix
    for (int64_t t = 10; t < 20; ++t) parts.push_back(m->forward({ids.narrow(1, t, 1), {}, &cache}).logits);
    CHECK(cache.length == 20);
    CHECK(max_abs_diff(torch::cat(parts, 1), full) < 1e-5);
  }
}

TEST_CASE("MLA absorbed attention equals the expanded formulation", "[model][forward][mla]") {
  ModelConfig c = small("mla_v3");
  torch::manual_seed(4);
  MLA mla(c);
  RopeTable table(c.qk_rope_head_dim, 64, c.rope_theta, c.rope_scaling);
  auto x = torch::randn({2, 9, c.hidden_size});
  auto [cos, sin] = table.slice(0, 9, torch::kCPU);
  torch::NoGradGuard ng;
  auto expanded = mla->forward(x, AttentionInput{cos, sin, {}, 0, nullptr});
  LayerKVCache cache;
  mla->init_cache(cache, 2, 16, torch::TensorOptions().dtype(torch::kFloat32));
  auto absorbed = mla->forward(x, AttentionInput{cos, sin, {}, 0, &cache});
  CHECK(max_abs_diff(expanded, absorbed) < 1e-5);
  // The cache holds kv_lora_rank + qk_rope_head_dim numbers per token, nothing per head.
  CHECK(cache.a.size(2) == c.kv_lora_rank);
  CHECK(cache.b.size(2) == c.qk_rope_head_dim);
}

TEST_CASE("rope_interleave: false is the rotate-half layout of the same model (weights permuted)", "[model][forward][mla]") {
  // A checkpoint converted to rotate-half stores the rope rows of q_b_proj and kv_a_proj_with_mqa de-interleaved:
  // row i holds what was row 2i, row rope/2 + i what was row 2i + 1. With rope_interleave: false it must compute
  // exactly what the interleaved original computes.
  ModelConfig c = small("mla_v3");
  c.use_mtp = false;
  CausalLM a = make(c, 11);
  ModelConfig half_cfg = c;
  half_cfg.rope_interleave = false;
  CausalLM b = make(half_cfg, 12);
  const int64_t nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, H = c.num_attention_heads;
  std::vector<int64_t> perm(rope);
  for (int64_t i = 0; i < rope / 2; ++i) perm[i] = 2 * i, perm[rope / 2 + i] = 2 * i + 1;
  auto order = torch::tensor(perm, torch::kLong);
  {
    torch::NoGradGuard ng;
    auto pb = b->named_parameters();
    for (auto& p : a->named_parameters()) pb[p.key()].copy_(p.value());
    for (auto& p : b->named_parameters()) {
      const std::string& n = p.key();
      auto& w = p.value();
      if (n.find("q_b_proj.weight") != std::string::npos) {
        auto heads = w.view({H, nope + rope, -1});
        heads.narrow(1, nope, rope).copy_(heads.narrow(1, nope, rope).index_select(0 + 1, order));
      } else if (n.find("kv_a_proj_with_mqa.weight") != std::string::npos) {
        w.narrow(0, c.kv_lora_rank, rope).copy_(w.narrow(0, c.kv_lora_rank, rope).index_select(0, order));
      }
    }
  }
  torch::NoGradGuard ng;
  auto ids = torch::randint(3, 256, {2, 20}, torch::kLong);
  auto ref = a->forward(ids).logits;
  CHECK(max_abs_diff(b->forward(ids).logits, ref) < 1e-5);
  KVCache cache = b->make_cache(2, 32);  // decoding (absorbed attention) uses the same layout
  std::vector<torch::Tensor> parts{b->forward({ids.narrow(1, 0, 12), {}, &cache}).logits};
  for (int64_t t = 12; t < 20; ++t) parts.push_back(b->forward({ids.narrow(1, t, 1), {}, &cache}).logits);
  CHECK(max_abs_diff(torch::cat(parts, 1), ref) < 1e-5);
  // Without the permutation the layouts disagree: the key is not inert.
  ModelConfig again = c;
  again.rope_interleave = false;
  CausalLM unpermuted = make(again, 11);
  CHECK(max_abs_diff(unpermuted->forward(ids).logits, ref) > 1e-4);
}

TEST_CASE("MoE output equals a slow per-token loop", "[model][moe]") {
  ModelConfig c = small("mla_v3");
  torch::manual_seed(5);
  MoE moe(c);
  moe->gate->e_score_correction_bias.copy_(torch::randn({c.n_routed_experts}) * 0.1);
  moe->eval();
  torch::NoGradGuard ng;
  auto x = torch::randn({3, 11, c.hidden_size});
  auto out = moe->forward(x);
  auto flat = x.view({-1, c.hidden_size});
  auto logits = torch::nn::functional::linear(flat, moe->gate->weight);
  Routing r = route(logits, moe->gate->e_score_correction_bias, c);
  auto expected = torch::zeros_like(flat);
  for (int64_t n = 0; n < flat.size(0); ++n) {
    auto xn = flat[n].unsqueeze(0);
    auto yn = moe->shared_experts->forward(xn);
    for (int64_t k = 0; k < c.num_experts_per_tok; ++k) {
      auto e = r.indices[n][k].item<int64_t>();
      yn = yn + r.weights[n][k] * moe->expert(e)->forward(xn);
    }
    expected[n] = yn[0];
  }
  CHECK(max_abs_diff(out.y.view({-1, c.hidden_size}), expected) < 1e-5);
  CHECK(out.load.sum().item<int64_t>() == 33 * c.num_experts_per_tok);
}

TEST_CASE("expert blocks: low-precision CPU blocks above 64 rows are padded to a multiple of 64", "[model][moe]") {
  auto b = expert_blocks({3, 65, 128, 0, 200}, true);
  CHECK(b.sizes == std::vector<int64_t>{3, 128, 128, 0, 256});
  CHECK(b.rows == 515);
  CHECK(b.padded);
  CHECK(torch::equal(b.shift, torch::tensor({0, 0, 63, 63, 63}, torch::kLong)));
  auto plain = expert_blocks({3, 65, 128, 0, 200}, false);
  CHECK(plain.sizes == std::vector<int64_t>{3, 65, 128, 0, 200});
  CHECK(!plain.padded);
  CHECK(!expert_blocks({64, 1}, true).padded);  // decoding-sized blocks keep their height
}

TEST_CASE("padded expert dispatch (bf16 autocast) equals unpadded dispatch in values and gradients", "[model][moe]") {
  ModelConfig c = small("mla_v3");
  torch::manual_seed(6);
  MoE moe(c);
  moe->train();
  auto x = torch::randn({4, 100, c.hidden_size});
  // Reference: 16 tokens per call, so no block exceeds 64 rows and nothing is padded; tokens are independent.
  std::vector<torch::Tensor> ys, grads_x;
  std::vector<std::vector<torch::Tensor>> grads_w;
  for (bool chunked : {false, true}) {
    dsopen::compat::AutocastScope autocast(c10::DeviceType::CPU, true, torch::kBFloat16);
    moe->zero_grad();
    auto xl = x.clone().requires_grad_(true);
    auto flat = xl.view({1, -1, c.hidden_size});
    torch::Tensor y;
    if (!chunked) {
      y = moe->forward(flat).y;
    } else {
      std::vector<torch::Tensor> parts;
      for (int64_t s = 0; s < flat.size(1); s += 16) parts.push_back(moe->forward(flat.narrow(1, s, std::min<int64_t>(16, flat.size(1) - s))).y);
      y = torch::cat(parts, 1);
    }
    (y.to(torch::kFloat32) * torch::linspace(-1, 1, y.numel()).view(y.sizes())).sum().backward();
    ys.push_back(y.detach().to(torch::kFloat32));
    grads_x.push_back(xl.grad());
    grads_w.emplace_back();
    for (auto& p : moe->experts->parameters()) grads_w.back().push_back(p.grad().clone());
  }
  {
    torch::NoGradGuard ng;
    REQUIRE(moe->forward(x.view({1, -1, c.hidden_size})).load.max().item<int64_t>() > kExpertRowMultiple);  // padded
  }
  CHECK(max_abs_diff(ys[0], ys[1]) < 2e-2 * ys[1].abs().max().item<double>());
  CHECK(max_abs_diff(grads_x[0], grads_x[1]) < 3e-2 * grads_x[1].abs().max().item<double>());
  for (size_t i = 0; i < grads_w[0].size(); ++i)
    CHECK(max_abs_diff(grads_w[0][i], grads_w[1][i]) <= 3e-2 * grads_w[1][i].abs().max().item<double>() + 1e-6);
}

TEST_CASE("aux-loss-free bias update moves towards balance", "[model][moe]") {
  ModelConfig c = small("mla_v3");
  MoE moe(c);
  auto load = torch::tensor({10, 0, 5, 5, 5, 5, 5, 5}, torch::kLong);  // mean 5
  moe->update_bias(load, 0.01);
  auto b = moe->gate->e_score_correction_bias;
  CHECK(b[0].item<float>() == Approx(-0.01));  // overloaded: down
  CHECK(b[1].item<float>() == Approx(0.01));   // starved: up
  CHECK(b[2].item<float>() == 0.0f);           // at the mean: unchanged
}

TEST_CASE("one backward with MoE and MTP on reaches every trainable parameter", "[model][forward][grad]") {
  ModelConfig c = small("mla_v3");
  c.aux_loss_alpha = 0.01;
  CausalLM m = make(c, 6);
  m->train();
  auto ids = torch::randint(3, 256, {4, 32}, torch::kLong);
  auto labels = torch::cat({ids.narrow(1, 1, 31), torch::full({4, 1}, -100, torch::kLong)}, 1);
  auto out = m->forward(ids, labels);
  CHECK(out.mtp_loss.item<double>() > 0);
  CHECK(out.aux_loss.item<double>() > 0);
  CHECK(out.expert_load.size() == 2);  // the main stack's MoE layer and the MTP module's
  out.loss.backward();
  for (auto& p : m->named_parameters()) {
    INFO(p.key());
    REQUIRE(p.value().grad().defined());
    CHECK(p.value().grad().abs().sum().item<double>() > 0);
  }
  // The loss is the documented sum of its parts.
  const double expect = out.ce_sum.item<double>() / out.n_targets.item<double>() + out.aux_loss.item<double>() +
                        c.mtp_loss_weight * out.mtp_loss.item<double>();
  CHECK(out.loss.item<double>() == Approx(expect).epsilon(1e-6));
  // Untrained model: cross-entropy near ln(vocab).
  CHECK(out.ce_sum.item<double>() / out.n_targets.item<double>() == Approx(std::log(256.0)).epsilon(0.05));
}

TEST_CASE("every family: one backward reaches every trainable parameter, jitter moves only training", "[model][forward][grad]") {
  for (const char* kind : kFamilies) {
    INFO(kind);
    ModelConfig c = small(kind);
    if (c.is_mla()) continue;  // the MLA families: the test above (group-limited routing leaves experts idle here)
    if (c.n_routed_experts > 0) c.num_experts_per_tok = c.n_routed_experts;  // every expert gets tokens
    if (std::string(kind) == "mixtral") c.router_jitter_noise = 0.1;
    CausalLM m = make(c, 6);
    m->train();
    auto ids = torch::randint(3, 256, {2, 16}, torch::kLong);
    auto labels = torch::cat({ids.narrow(1, 1, 15), torch::full({2, 1}, -100, torch::kLong)}, 1);
    m->forward(ids, labels).loss.backward();
    for (auto& p : m->named_parameters()) {
      INFO(p.key());
      REQUIRE(p.value().grad().defined());
      CHECK(p.value().grad().abs().sum().item<double>() > 0);
    }
    if (c.router_jitter_noise > 0) {
      torch::NoGradGuard ng;
      auto train_a = m->forward(ids).logits, train_b = m->forward(ids).logits;
      CHECK(max_abs_diff(train_a, train_b) > 1e-6);  // noise in training ...
      m->eval();
      CHECK(max_abs_diff(m->forward(ids).logits, m->forward(ids).logits) == 0.0);  // ... none in evaluation
    }
  }
}

TEST_CASE("activation checkpointing gives the same loss and gradients", "[model][forward][grad]") {
  ModelConfig c = small("mla_v3");
  c.aux_loss_alpha = 0.01;
  auto ids = torch::randint(3, 256, {2, 16}, torch::kLong);
  auto labels = torch::cat({ids.narrow(1, 1, 15), torch::full({2, 1}, -100, torch::kLong)}, 1);
  // Under bf16 autocast too: the checkpointed forward (run without grad) must compute what its recomputation does
  // (a GEMV path taken without grad once computed the small expert blocks in fp32 there).
  for (const bool bf16 : {false, true}) {
    INFO("bf16 autocast " << bf16);
    std::vector<std::pair<double, std::map<std::string, torch::Tensor>>> runs;
    for (bool ckpt : {false, true}) {
      CausalLM m = make(c, 7);
      m->train();
      m->set_activation_checkpointing(ckpt);
      std::optional<dsopen::compat::AutocastScope> autocast;
      if (bf16) autocast.emplace(c10::DeviceType::CPU, true, torch::kBFloat16);
      auto out = m->forward(ids, labels);
      autocast.reset();
      out.loss.backward();
      std::map<std::string, torch::Tensor> grads;
      for (auto& p : m->named_parameters()) grads[p.key()] = p.value().grad().clone();
      runs.push_back({out.loss.item<double>(), grads});
      CHECK(out.expert_load.size() == 2);  // the main stack's MoE layer and the MTP module's
    }
    CHECK(runs[0].first == runs[1].first);
    for (auto& [name, g] : runs[0].second) {
      INFO(name);
      CHECK(max_abs_diff(g, runs[1].second.at(name)) < 1e-6);
    }
  }
}

TEST_CASE("z-loss and ignore_index", "[model][forward]") {
  ModelConfig c = small("gqa");
  c.z_loss_coef = 1e-3;
  CausalLM m = make(c, 8);
  auto ids = torch::randint(3, 256, {2, 8}, torch::kLong);
  auto labels = torch::full({2, 8}, -100, torch::kLong);
  labels.index_put_({0, 2}, 5);
  auto out = m->forward(ids, labels);  // the fused head + loss: no logits formed
  CHECK(out.n_targets.item<int64_t>() == 1);
  const auto logits = m->forward(ids).logits;  // without labels: the logits, from the plain head
  auto lse = logits[0][2].logsumexp(-1).item<double>();
  CHECK(out.z_loss.item<double>() == Approx(1e-3 * lse * lse).epsilon(1e-5));
  auto expect_ce = lse - logits[0][2][5].item<double>();
  CHECK(out.ce_sum.item<double>() == Approx(expect_ce).epsilon(1e-5));
}

TEST_CASE("tied embeddings: the head is the embedding matrix", "[model][forward]") {
  ModelConfig c = small("mha");
  c.tie_word_embeddings = true;
  CausalLM m = make(c, 9);
  CHECK(!m->named_parameters().contains("lm_head.weight"));  // as in HF checkpoints of tied models
  int64_t n = 0;
  for (auto& p : m->parameters()) n += p.numel();
  CHECK(n == count_parameters(c).total);
  // The head really is the embedding: logits of the last position are h . E^T.
  torch::NoGradGuard ng;
  auto ids = torch::randint(3, 256, {1, 5}, torch::kLong);
  auto logits = m->forward(ids).logits;
  m->model->embed_tokens->weight.mul_(2.0);
  CHECK(max_abs_diff(m->forward(ids).logits, logits) > 1e-3);
}

TEST_CASE("packed documents: each document's logits equal running it alone", "[model][forward][packing]") {
  for (const char* kind : {"mla_v3", "gqa"}) {
    INFO(kind);
    ModelConfig c = small(kind);
    CausalLM m = make(c, 10);
    torch::NoGradGuard ng;
    auto a = torch::randint(3, 256, {1, 10}, torch::kLong), b = torch::randint(3, 256, {1, 6}, torch::kLong);
    auto packed = torch::cat({a, b}, 1);  // [1, 16]
    auto segments = torch::cat({torch::full({1, 10}, 1, torch::kLong), torch::full({1, 6}, 2, torch::kLong)}, 1);
    auto positions = torch::cat({torch::arange(10).unsqueeze(0), torch::arange(6).unsqueeze(0)}, 1);
    auto out = m->forward({packed, {}, nullptr, positions, segments}).logits;
    CHECK(max_abs_diff(out.narrow(1, 0, 10), m->forward(a).logits) < 1e-5);
    CHECK(max_abs_diff(out.narrow(1, 10, 6), m->forward(b).logits) < 1e-5);
    // Without the layout the second document would see the first.
    CHECK(max_abs_diff(m->forward(packed).logits.narrow(1, 10, 6), m->forward(b).logits) > 1e-3);
  }
}

TEST_CASE("every family: fused ops give the unfused loss and gradients", "[model][forward][fused]") {
  for (const char* kind : kFamilies) {
    for (bool bf16 : {false, true}) {
      if (bf16 && std::string(kind) != "mla_v3" && std::string(kind) != "glm") continue;
      INFO(kind << (bf16 ? " bf16 autocast" : " fp32"));
      ModelConfig c = small(kind);
      c.z_loss_coef = 1e-3;
      auto ids = torch::randint(3, 256, {2, 16}, torch::kLong);
      auto labels = torch::cat({ids.narrow(1, 1, 15), torch::full({2, 1}, -100, torch::kLong)}, 1);
      std::vector<double> losses;
      std::vector<std::vector<torch::Tensor>> grads;
      for (bool on : {true, false}) {
        fused::Scope scope(on);
        CausalLM m = make(c, 7);
        m->train();
        std::optional<dsopen::compat::AutocastScope> autocast;
        if (bf16) autocast.emplace(c10::DeviceType::CPU, true, torch::kBFloat16);
        auto out = m->forward(ids, labels);
        CHECK(out.logits.defined() == !on);  // the fused loss never forms the logits
        out.loss.backward();
        losses.push_back(out.loss.item<double>());
        grads.emplace_back();
        for (auto& p : m->parameters()) grads.back().push_back(p.grad().defined() ? p.grad() : torch::zeros_like(p));
      }
      CHECK(losses[0] == Approx(losses[1]).epsilon(bf16 ? 1e-2 : 1e-5));
      const auto names = CausalLM(c)->named_parameters().keys();
      for (size_t i = 0; i < grads[0].size(); ++i) {
        INFO(names[i]);
        const double scale = grads[1][i].abs().max().item<double>();
        CHECK(max_abs_diff(grads[0][i], grads[1][i]) <= (bf16 ? 0.1 : 1e-4) * scale + 1e-7);
      }
    }
  }
}

namespace {

KVCache copy_cache(const KVCache& c) {
  KVCache out = c;
  for (auto& l : out.layers) l.a = l.a.clone(), l.b = l.b.clone();
  if (c.key_valid.defined()) out.key_valid = c.key_valid.clone();
  return out;
}

// One forward of `in` through the decode step (required to apply) and through the general path, each on its own
// copy of the cache; returns both logits and leaves the caches for comparison.
std::pair<torch::Tensor, torch::Tensor> both_paths(CausalLM& m, ForwardInput in, KVCache& fast, KVCache& general) {
  in.cache = &fast;
  REQUIRE(decode_step_applies(*m, in));
  auto a = m->forward(in).logits;
  set_decode_step_enabled(false);
  in.cache = &general;
  auto b = m->forward(in).logits;
  set_decode_step_enabled(true);
  return {a, b};
}

// Counts the CPU allocator's allocations while installed (the default allocator does the work).
struct CountingAllocator final : c10::Allocator {
  c10::Allocator* inner = c10::GetCPUAllocator();
  std::atomic<int64_t> count{0};
  c10::DataPtr allocate(size_t n) override {
    ++count;
    return inner->allocate(n);
  }
  c10::DeleterFnPtr raw_deleter() const override { return inner->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

}  // namespace

TEST_CASE("the CPU decode step equals the general path (every family; uniform, per-row and padded rows)",
          "[model][forward][decode]") {
  for (const char* kind : kFamilies) {
    INFO(kind);
    CausalLM m = make(small(kind), 11);
    torch::NoGradGuard ng;
    const int64_t B = 3;
    auto ids = torch::randint(3, 256, {B, 14}, torch::kLong);
    KVCache fast = m->make_cache(B, 32);
    m->forward({ids.narrow(1, 0, 8), {}, &fast});  // prefill through the general path
    KVCache general = copy_cache(fast);
    // Uniform rows: four steps.
    for (int64_t t = 8; t < 12; ++t) {
      auto [a, b] = both_paths(m, {ids.narrow(1, t, 1)}, fast, general);
      CHECK(max_abs_diff(a, b) < 1e-5);
    }
    CHECK(fast.length == 12);
    CHECK(general.length == 12);
    for (size_t l = 0; l < fast.layers.size(); ++l) {
      CHECK(max_abs_diff(fast.layers[l].a, general.layers[l].a) < 1e-5);
      CHECK(max_abs_diff(fast.layers[l].b, general.layers[l].b) < 1e-5);
    }
    // Continuous batching: each row at its own length.
    ForwardInput rows;
    rows.input_ids = ids.narrow(1, 12, 1);
    rows.row_lengths = {12, 9, 5};
    auto [a, b] = both_paths(m, rows, fast, general);
    CHECK(max_abs_diff(a, b) < 1e-5);
    CHECK(fast.length == 12);
    // A left-padded batch: row 1 starts with three padding positions.
    auto segments = torch::ones({B, 6}, torch::kLong);
    segments[1].narrow(0, 0, 3).fill_(0);
    auto positions = torch::arange(6, torch::kLong).repeat({B, 1});
    positions[1] = torch::tensor({0, 0, 0, 0, 1, 2}, torch::kLong);
    KVCache padded = m->make_cache(B, 16);
    m->forward({ids.narrow(1, 0, 6), {}, &padded, positions, segments});
    KVCache padded_general = copy_cache(padded);
    for (int64_t t = 0; t < 3; ++t) {
      auto pos = torch::tensor({6 + t, 3 + t, 6 + t}, torch::kLong).view({B, 1});
      auto [pa, pb] = both_paths(m, {ids.narrow(1, 6 + t, 1), {}, nullptr, pos, torch::ones({B, 1}, torch::kLong)},
                                 padded, padded_general);
      CHECK(max_abs_diff(pa, pb) < 1e-5);
    }
  }
}

TEST_CASE("a prompt's prefill through the decode step equals the general path (every family, chunks, bf16)",
          "[model][forward][decode]") {
  // Both sides of a machine's tiles/GEMM crossover (model/tile_rows.h): 32, where the 45-row chunk and the 40-row
  // bf16 prompt go to LibTorch's GEMMs, and 64, where they stay in the tiles.
  struct Restore {
    TileRows measured = tile_rows();
    ~Restore() { set_tile_rows(measured.f32, measured.bf16); }
  } restore;
  for (const int64_t limit : {kTileRowsAlways, int64_t{64}})
  for (const char* kind : kFamilies) {
    INFO(kind << ", tiles up to " << limit << " rows");
    set_tile_rows(limit, limit);
    CausalLM m = make(small(kind), 17);
    torch::NoGradGuard ng;
    auto ids = torch::randint(3, 256, {1, 60}, torch::kLong);
    KVCache fast = m->make_cache(1, 64), general = m->make_cache(1, 64);
    // A first chunk, a second continuing it past 32 rows, a short third.
    int64_t at = 0;
    for (const int64_t n : {7, 45, 5}) {
      INFO("chunk of " << n << " at " << at);
      ForwardInput in{ids.narrow(1, at, n)};
      in.last_logits = n == 5 ? 2 : 1;
      auto [a, b] = both_paths(m, in, fast, general);
      REQUIRE(a.sizes() == b.sizes());
      CHECK(a.size(1) == in.last_logits);
      CHECK(max_abs_diff(a, b) < 1e-4);
      at += n;
      CHECK(fast.length == at);
      CHECK(general.length == at);
      for (size_t l = 0; l < fast.layers.size(); ++l) {
        CHECK(max_abs_diff(fast.layers[l].a.narrow(m->config().is_mla() ? 1 : 2, 0, at),
                           general.layers[l].a.narrow(m->config().is_mla() ? 1 : 2, 0, at)) < 1e-4);
        CHECK(max_abs_diff(fast.layers[l].b.narrow(m->config().is_mla() ? 1 : 2, 0, at),
                           general.layers[l].b.narrow(m->config().is_mla() ? 1 : 2, 0, at)) < 1e-4);
      }
    }
    // What it does not take: all positions' logits, several prompts, packed positions.
    KVCache other = m->make_cache(2, 64);
    CHECK_FALSE(decode_step_applies(*m, {ids.narrow(1, 0, 4), {}, &fast}));
    ForwardInput two{ids.narrow(1, 0, 4).repeat({2, 1})};
    two.cache = &other;
    two.last_logits = 1;
    CHECK_FALSE(decode_step_applies(*m, two));
    // bfloat16 weights: short prompts through the tiles, longer ones (limit 32) through LibTorch's bf16 GEMM inside
    // the step; both as close to the float32 prompt as the general path's bf16 forward is (which rounds every activation).
    const auto want = m->forward({ids.narrow(1, 0, 40)}).logits.select(1, 39);
    m->to(torch::kBFloat16);
    for (const int64_t n : {20, 40}) {
      INFO("bf16 prompt of " << n);
      KVCache half = m->make_cache(1, 64, torch::kBFloat16), half_general = m->make_cache(1, 64, torch::kBFloat16);
      ForwardInput p{ids.narrow(1, 0, n)};
      p.last_logits = 1;
      auto [a, b] = both_paths(m, p, half, half_general);
      if (n == 40) {
        const auto ref = m->forward({ids.narrow(1, 0, 40)}).logits.select(1, 39).to(torch::kFloat32);
        CHECK(max_abs_diff(a.select(1, 0), want) <= max_abs_diff(ref, want) + 1e-3);
      }
      CHECK(max_abs_diff(a, b) < 0.05 * want.abs().max().item<double>());
    }
  }
}

TEST_CASE("a sequence decodes to the same bits alone and among 32 rows (dsopen-serve's default batch)",
          "[model][forward][decode]") {
  // Greedy serving must not depend on the load: up to 32 rows every product of the step keeps each row's sums in
  // the same order whatever rows share it (a GEMM above that may block rows differently).
  for (const char* kind : kFamilies) {
    INFO(kind);
    CausalLM m = make(small(kind), 13);
    torch::NoGradGuard ng;
    const int64_t B = 32;
    auto ids = torch::randint(3, 256, {B, 9}, torch::kLong);
    KVCache batch = m->make_cache(B, 16);
    m->forward({ids.narrow(1, 0, 8), {}, &batch});
    KVCache alone = m->make_cache(1, 16);
    for (int64_t r : {0, 17, 31}) {
      INFO("row " << r);
      for (size_t l = 0; l < alone.layers.size(); ++l) {
        alone.layers[l].a.copy_(batch.layers[l].a.narrow(0, r, 1));
        alone.layers[l].b.copy_(batch.layers[l].b.narrow(0, r, 1));
      }
      alone.length = batch.length;
      ForwardInput one{ids.narrow(0, r, 1).narrow(1, 8, 1)};
      one.cache = &alone;
      REQUIRE(decode_step_applies(*m, one));
      const auto got = m->forward(one).logits;
      KVCache all = copy_cache(batch);
      ForwardInput many{ids.narrow(1, 8, 1)};
      many.cache = &all;
      REQUIRE(decode_step_applies(*m, many));
      CHECK(torch::equal(m->forward(many).logits[r], got[0]));
    }
  }
}

TEST_CASE("the decode step with bfloat16 weights is at least as close to float32 as the general path", "[model][forward][decode]") {
  for (const char* kind : {"mla_v3", "gqa", "qwen2_moe"}) {
    INFO(kind);
    CausalLM m = make(small(kind), 12);
    torch::NoGradGuard ng;
    auto ids = torch::randint(3, 256, {2, 10}, torch::kLong);
    KVCache ref = m->make_cache(2, 16);
    m->forward({ids.narrow(1, 0, 6), {}, &ref});
    std::vector<torch::Tensor> want;
    for (int64_t t = 6; t < 10; ++t) want.push_back(m->forward({ids.narrow(1, t, 1), {}, &ref}).logits);
    m->to(torch::kBFloat16);
    KVCache fast = m->make_cache(2, 16, torch::kBFloat16);
    m->forward({ids.narrow(1, 0, 6), {}, &fast});
    KVCache general = copy_cache(fast);
    double err_fast = 0, err_general = 0;
    for (int64_t t = 6; t < 10; ++t) {
      auto [a, b] = both_paths(m, {ids.narrow(1, t, 1)}, fast, general);
      err_fast = std::max(err_fast, max_abs_diff(a.to(torch::kFloat32), want[t - 6]));
      err_general = std::max(err_general, max_abs_diff(b.to(torch::kFloat32), want[t - 6]));
    }
    const double scale = want.back().abs().max().item<double>();
    CHECK(err_fast <= 1.5 * err_general + 1e-3 * scale);
    CHECK(err_fast < 0.05 * scale);
  }
}

TEST_CASE("a decode step allocates only its logits", "[model][forward][decode]") {
  static CountingAllocator counting;
  c10::Allocator* before = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&counting, /*priority=*/100);
  for (const char* kind : {"mla_v3", "qwen3", "mixtral"}) {
    INFO(kind);
    CausalLM m = make(small(kind), 13);
    torch::NoGradGuard ng;
    auto ids = torch::randint(3, 256, {1, 12}, torch::kLong);
    KVCache cache = m->make_cache(1, 16);
    m->forward({ids.narrow(1, 0, 6), {}, &cache});
    m->forward({ids.narrow(1, 6, 1), {}, &cache});  // warms the step's buffers
    std::vector<torch::Tensor> inputs;
    for (int64_t t = 7; t < 12; ++t) inputs.push_back(ids.narrow(1, t, 1).contiguous());
    counting.count = 0;
    for (const auto& x : inputs) m->forward({x, {}, &cache});
    CHECK(counting.count == 5);  // one logits tensor per step
  }
  c10::SetCPUAllocator(before, /*priority=*/101);
}
