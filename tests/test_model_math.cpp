// Model math checked against hand-computed values and slow references: RoPE, YaRN, routing, balance loss,
// published parameter counts.
#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>
#include <set>

#include "model/config.h"
#include "model/gemv.h"
#include "model/gemv_int4.h"
#include "model/tile_rows.h"
#include "test_helpers.h"
#include "model/info.h"
#include "model/layers.h"
#include "model/moe.h"
#include "model/registry.h"

using namespace dsopen::model;

namespace {
ModelConfig flavor(const std::string& name) { return *find_flavor(name); }
double rel(double a, double b) { return std::abs(a - b) / std::abs(b); }
}  // namespace

TEST_CASE("published parameter counts", "[model][counts]") {
  // DeepSeek-LLM 7B: 6.91B total.
  CHECK(rel(count_parameters(flavor("7b")).total, 6.91e9) < 0.01);
  // DeepSeek-V2-Lite: 15.7B total, 2.4B active.
  auto lite = count_parameters(flavor("v2-lite"));
  CHECK(rel(lite.total, 15.7e9) < 0.01);
  CHECK(rel(lite.active, 2.4e9) < 0.03);
  // DeepSeek-V2: 236B total, 21B active.
  auto v2 = count_parameters(flavor("v2"));
  CHECK(rel(v2.total, 236e9) < 0.01);
  CHECK(rel(v2.active, 21e9) < 0.03);
  // DeepSeek-V3: 671B total, 37B active, without the MTP module.
  auto v3 = count_parameters(flavor("v3"));
  CHECK(rel(v3.total, 671e9) < 0.01);
  CHECK(rel(v3.active, 37e9) < 0.03);
  // DeepSeek-LLM 67B.
  CHECK(rel(count_parameters(flavor("67b")).total, 67e9) < 0.02);
}

TEST_CASE("published parameter counts of the other families", "[model][counts]") {
  // Totals from the models' cards and safetensors indexes; within 0.5%.
  CHECK(count_parameters(flavor("llama3-8b")).total == 8030261248);    // Llama 3.1 8B, exact
  CHECK(count_parameters(flavor("llama3.2-1b")).total == 1235814400);  // Llama 3.2 1B (tied), exact
  CHECK(rel(count_parameters(flavor("qwen3-8b")).total, 8.19e9) < 0.005);       // "8.2B, non-embedding 6.95B"
  const int64_t q8_embed = 151936LL * 4096 * 2;
  CHECK(rel(count_parameters(flavor("qwen3-8b")).total - q8_embed, 6.95e9) < 0.005);
  auto a3b = count_parameters(flavor("qwen3-30b-a3b"));
  CHECK(rel(a3b.total, 30.5e9) < 0.005);                                // "30.5B in total, 3.3B activated"
  CHECK(rel(a3b.active + a3b.embedding, 3.3e9) < 0.02);                 // 3.35B: the card rounds to 0.1B
  auto q15 = count_parameters(flavor("qwen1.5-moe-a2.7b"));
  CHECK(rel(q15.total, 14.3e9) < 0.005);                                // "14.3B total, 2.7B activated"
  CHECK(rel(q15.active + q15.embedding, 2.7e9) < 0.005);
  CHECK(rel(count_parameters(flavor("glm4-9b")).total, 9.4e9) < 0.005);             // "9.4B params"
  auto mixtral = count_parameters(flavor("mixtral-8x7b"));
  CHECK(rel(mixtral.total, 46.7e9) < 0.005);                            // "46.7B total, 12.9B per token"
  CHECK(rel(mixtral.active + mixtral.embedding, 12.9e9) < 0.005);
}

TEST_CASE("KV cache bytes: MLA caches the latent and the rope key only", "[model][counts]") {
  // V3: (512 + 64) * 61 layers * 2 bytes.
  CHECK(kv_cache_bytes_per_token(flavor("v3"), 2) == (512 + 64) * 61 * 2);
  // 7B MHA: 2 * 32 heads * 128 dims * 30 layers * 2 bytes.
  CHECK(kv_cache_bytes_per_token(flavor("7b"), 2) == 2 * 32 * 128 * 30 * 2);
}

TEST_CASE("ZeRO memory formulas", "[model][counts]") {
  // fp32 weights, gradients and moments, as the trainer holds them (its logged bytes are checked in test_trainer).
  auto m = training_memory_per_rank(1000, 4);
  CHECK(m.ddp == 16000);
  CHECK(m.zero1 == 8000 + 2000);
  CHECK(m.zero2 == 4000 + 3000);
  // zero3: everything sharded, plus two gathered units and two units' gradients in flight (fp32).
  CHECK(training_memory_per_rank(1000, 4, 0, 1, 100).zero3 == 16000 / 4 + 16 * 100);
}

TEST_CASE("the ZeRO-3 plan shards the weights and adds two gathered units", "[model][counts]") {
  const ModelConfig c = flavor("7b");
  const ParamCounts p = count_parameters(c);
  // 7B: the head (lm_head, 102400 x 4096) is its largest unit, larger than a decoder layer.
  CHECK(p.largest_unit == c.vocab_size * c.hidden_size);
  TrainingPlanInput in;
  in.world_size = 8;
  in.seq_len = 2048;
  in.activation_bytes = 2;
  in.zero_stage = 2;
  const TrainingPlan z2 = plan_training(c, in);
  in.zero_stage = 3;
  const TrainingPlan z3 = plan_training(c, in);
  CHECK(z2.weights == 4.0 * p.total);
  // The head is gathered in fp32; decoder layers (whose projections are gathered in bf16 here) are smaller.
  CHECK(z3.gathered_unit == 4.0 * p.largest_unit);
  CHECK(2.0 * p.largest_layer < 4.0 * p.largest_unit);
  CHECK(z3.weights == Approx(4.0 * p.total / 8 + 2 * z3.gathered_unit));
  CHECK(z3.grads == Approx(z2.grads + 8.0 * p.largest_unit));
  CHECK(z3.optimizer == z2.optimizer);
  CHECK(z3.activations == z2.activations);
}

TEST_CASE("YaRN inverse frequencies match hand-computed values", "[model][rope]") {
  RopeScaling s;
  s.type = "yarn";
  s.factor = 40;
  s.original_max_position_embeddings = 4096;
  s.beta_fast = 32;
  s.beta_slow = 1;
  auto f = rope_inv_freq(64, 10000.0, s);
  auto base = [](int i) { return std::pow(10000.0, -2.0 * i / 64.0); };
  // correction dims: beta_fast=32 -> floor(10.47) = 10, beta_slow=1 -> ceil(22.51) = 23.
  CHECK(f[5].item<double>() == Approx(base(5)).epsilon(1e-6));          // high frequency: kept
  CHECK(f[10].item<double>() == Approx(base(10)).epsilon(1e-6));        // ramp starts at 10
  CHECK(f[30].item<double>() == Approx(base(30) / 40).epsilon(1e-6));   // low frequency: interpolated
  const double ramp = (16.0 - 10.0) / 13.0;                              // i=16 blends
  CHECK(f[16].item<double>() == Approx(base(16) / 40 * ramp + base(16) * (1 - ramp)).epsilon(1e-6));
  // Without scaling: plain RoPE.
  auto plain = rope_inv_freq(64, 10000.0, RopeScaling{});
  CHECK(plain[30].item<double>() == Approx(base(30)).epsilon(1e-6));
}

TEST_CASE("llama3, linear and dynamic rope scaling follow transformers' formulas", "[model][rope]") {
  auto base = [](int i, double theta = 10000.0) { return std::pow(theta, -2.0 * i / 16.0); };
  RopeScaling s;
  s.type = "llama3";
  s.factor = 8;
  s.low_freq_factor = 1;
  s.high_freq_factor = 4;
  s.original_max_position_embeddings = 64;  // wavelengths: below 16 kept, above 64 divided by 8, a blend between
  auto f = rope_inv_freq(16, 10000.0, s);
  CHECK(f[0].item<double>() == Approx(base(0)).epsilon(1e-6));  // wavelength 6.3: kept
  for (int i : {1, 2}) {                                         // 19.9 and 62.8: blended
    const double smooth = (64.0 / (2 * M_PI / base(i)) - 1.0) / 3.0;
    CHECK(f[i].item<double>() == Approx((1 - smooth) * base(i) / 8 + smooth * base(i)).epsilon(1e-6));
  }
  CHECK(f[3].item<double>() == Approx(base(3) / 8).epsilon(1e-6));  // 198.7: interpolated
  CHECK(f[7].item<double>() == Approx(base(7) / 8).epsilon(1e-6));

  s = RopeScaling{};
  s.type = "linear";
  s.factor = 4;
  CHECK(rope_inv_freq(16, 10000.0, s)[5].item<double>() == Approx(base(5) / 4).epsilon(1e-6));

  // Dynamic NTK: within the trained 32 positions the plain rope; a call reaching 40 positions rotates all of them
  // with the base 10000 * (2 * 40 / 32 - 1)^(16 / 14).
  s = RopeScaling{};
  s.type = "dynamic";
  s.factor = 2;
  RopeTable table(16, 64, 10000.0, s, 32);
  auto [c_short, s_short] = table.slice(0, 20, torch::kCPU);
  CHECK(c_short[19][3].item<double>() == Approx(std::cos(19 * base(3))).epsilon(1e-5));
  auto [c_long, s_long] = table.slice(0, 40, torch::kCPU);
  const double grown = 10000.0 * std::pow(2.0 * 40 / 32 - 1.0, 16.0 / 14.0);
  CHECK(c_long[19][3].item<double>() == Approx(std::cos(19 * base(3, grown))).epsilon(1e-5));
  CHECK(s_long[39][1].item<double>() == Approx(std::sin(39 * base(1, grown))).epsilon(1e-5));
  auto [c_gather, s_gather] = table.gather(torch::arange(40, torch::kLong).view({1, 40}));
  CHECK(torch::allclose(c_gather[0], c_long));
  CHECK_THROWS(table.slice(60, 5, torch::kCPU));  // beyond max_position_embeddings * factor
}

TEST_CASE("YaRN mscale and softmax scale", "[model][rope]") {
  CHECK(yarn_get_mscale(40, 1.0) == Approx(1.0 + 0.1 * std::log(40.0)));
  CHECK(yarn_get_mscale(1.0, 1.0) == 1.0);
  RopeScaling s;
  s.type = "yarn";
  s.factor = 40;
  s.mscale = 1.0;
  s.mscale_all_dim = 1.0;
  CHECK(attention_softmax_scale(192, s) == Approx(0.1352329).epsilon(1e-5));  // 192^-0.5 * 1.368888^2
  CHECK(rope_cos_sin_scale(s) == Approx(1.0));
  s.mscale = 0.707;
  s.mscale_all_dim = 0.0;  // V2 configs without mscale_all_dim: cos/sin carry the whole factor
  CHECK(rope_cos_sin_scale(s) == Approx(1.0 + 0.0707 * std::log(40.0)));
  CHECK(attention_softmax_scale(192, s) == Approx(1.0 / std::sqrt(192.0)));
}

TEST_CASE("RoPE scores depend only on the relative offset (both layouts)", "[model][rope]") {
  torch::manual_seed(0);
  RopeTable table(16, 64, 10000.0, RopeScaling{});
  auto q = torch::randn({1, 1, 1, 16}), k = torch::randn({1, 1, 1, 16});
  for (auto apply : {apply_rope_half, apply_rope_interleaved}) {
    auto score = [&](int64_t m, int64_t n) {
      auto [cm, sm] = table.slice(m, 1, torch::kCPU);
      auto [cn, sn] = table.slice(n, 1, torch::kCPU);
      return (apply(q, cm, sm) * apply(k, cn, sn)).sum().item<double>();
    };
    CHECK(score(7, 3) == Approx(score(30, 26)).epsilon(1e-5));
    CHECK(score(10, 0) == Approx(score(50, 40)).epsilon(1e-5));
    CHECK(std::abs(score(7, 3) - score(7, 5)) > 1e-4);  // and it does depend on the offset
  }
}

TEST_CASE("interleaved RoPE equals rotate-half RoPE on de-interleaved dimensions", "[model][rope]") {
  // HF DeepSeek-V2/V3 permutes (2i, 2i+1) pairs to (i, i + d/2) before a rotate-half rotation.
  torch::manual_seed(1);
  RopeTable table(8, 16, 10000.0, RopeScaling{});
  auto x = torch::randn({2, 5, 3, 8});
  auto [c, s] = table.slice(3, 5, torch::kCPU);
  auto inter = apply_rope_interleaved(x, c, s);
  auto perm = x.view({2, 5, 3, 4, 2}).transpose(3, 4).reshape({2, 5, 3, 8});
  auto half = apply_rope_half(perm, c, s);
  CHECK(torch::allclose(inter.view({2, 5, 3, 4, 2}).transpose(3, 4).reshape({2, 5, 3, 8}), half, 1e-6, 1e-6));
}

namespace {
// Slow per-token routing written from the DeepSeek papers, independent of route().
std::vector<int64_t> slow_route(const std::vector<float>& logits, const std::vector<float>& bias,
                                const ModelConfig& c) {
  const int64_t E = c.n_routed_experts, G = c.n_group, per = E / G;
  std::vector<double> score(E), choice(E);
  double denom = 0;
  for (int64_t e = 0; e < E; ++e) denom += std::exp(logits[e]);
  for (int64_t e = 0; e < E; ++e) {
    score[e] = c.scoring_func == "sigmoid" ? 1.0 / (1.0 + std::exp(-logits[e])) : std::exp(logits[e]) / denom;
    choice[e] = score[e] + (bias.empty() ? 0.0 : bias[e]);
  }
  std::vector<std::pair<double, int64_t>> groups;
  for (int64_t g = 0; g < G; ++g) {
    std::vector<double> v(choice.begin() + g * per, choice.begin() + (g + 1) * per);
    std::sort(v.rbegin(), v.rend());
    groups.push_back({c.topk_method == "noaux_tc" ? v[0] + v[1] : v[0], g});
  }
  std::sort(groups.rbegin(), groups.rend());
  std::vector<std::pair<double, int64_t>> cands;
  for (int64_t i = 0; i < c.topk_group; ++i)
    for (int64_t e = groups[i].second * per; e < (groups[i].second + 1) * per; ++e) cands.push_back({choice[e], e});
  std::sort(cands.rbegin(), cands.rend());
  std::vector<int64_t> chosen;
  for (int64_t k = 0; k < c.num_experts_per_tok; ++k) chosen.push_back(cands[k].second);
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}
}  // namespace

TEST_CASE("group-limited routing matches a per-token reference and stays inside the top groups", "[model][moe]") {
  torch::manual_seed(2);
  for (const char* kind : {"v2", "v3"}) {
    ModelConfig c = flavor("tiny");
    c.n_routed_experts = 16;
    c.n_group = 4;
    c.topk_group = 2;
    c.num_experts_per_tok = 3;
    if (std::string(kind) == "v2") {
      c.model_type = "deepseek_v2";
      c.scoring_func = "softmax";
      c.topk_method = "group_limited_greedy";
    }
    auto logits = torch::randn({64, 16});
    torch::Tensor bias = std::string(kind) == "v3" ? torch::randn({16}) * 0.5 : torch::Tensor();
    Routing r = route(logits, bias, c);
    for (int64_t n = 0; n < 64; ++n) {
      auto row = logits[n].contiguous();
      std::vector<float> l(row.data_ptr<float>(), row.data_ptr<float>() + 16), b;
      if (bias.defined()) b.assign(bias.data_ptr<float>(), bias.data_ptr<float>() + 16);
      auto got = std::vector<int64_t>(r.indices[n].data_ptr<int64_t>(), r.indices[n].data_ptr<int64_t>() + 3);
      std::sort(got.begin(), got.end());
      REQUIRE(got == slow_route(l, b, c));
      std::set<int64_t> groups;
      for (auto e : got) groups.insert(e / 4);
      CHECK(groups.size() <= 2);
    }
  }
}

TEST_CASE("the correction bias changes which experts are chosen, not the combine weights", "[model][moe]") {
  ModelConfig c = flavor("tiny");  // sigmoid, noaux_tc, norm_topk_prob, scale 2.5
  c.n_group = 1;
  c.topk_group = 1;
  auto logits = torch::tensor({{2.0f, 1.0f, 0.0f, -1.0f, -2.0f, -3.0f, -4.0f, -5.0f}});
  auto no_bias = route(logits, torch::zeros({8}), c);
  auto chosen0 = std::set<int64_t>{no_bias.indices[0][0].item<int64_t>(), no_bias.indices[0][1].item<int64_t>()};
  CHECK(chosen0 == std::set<int64_t>{0, 1});
  auto bias = torch::zeros({8});
  bias[7] = 10.0;  // pushes expert 7 in
  auto biased = route(logits, bias, c);
  auto idx = biased.indices[0];
  std::set<int64_t> chosen1{idx[0].item<int64_t>(), idx[1].item<int64_t>()};
  CHECK(chosen1 == std::set<int64_t>{0, 7});
  // Weights: unbiased sigmoid scores of the chosen experts, normalized, times the scaling factor.
  const double s0 = 1 / (1 + std::exp(-2.0)), s7 = 1 / (1 + std::exp(5.0));
  for (int k = 0; k < 2; ++k) {
    const int64_t e = idx[k].item<int64_t>();
    const double expect = (e == 0 ? s0 : s7) / (s0 + s7) * 2.5;
    CHECK(biased.weights[0][k].item<double>() == Approx(expect).epsilon(1e-5));
  }
}

TEST_CASE("sequence-wise balance loss on a hand-computed case", "[model][moe]") {
  ModelConfig c = flavor("tiny");
  c.scoring_func = "softmax";
  c.aux_loss_alpha = 0.1;
  c.seq_aux = true;
  // One sequence, two tokens, two experts, top-1: both tokens pick expert 0.
  auto scores = torch::tensor({{0.7f, 0.3f}, {0.4f, 0.6f}});
  auto indices = torch::tensor({{0}, {0}}, torch::kLong);
  // f = E/(K*T) * counts = [2, 0]; P = mean scores = [0.55, 0.45]; loss = 0.1 * 2 * 0.55.
  CHECK(balance_loss(scores, indices, 1, c).item<double>() == Approx(0.11));
  // Balanced routing gives alpha * sum(P) = alpha.
  auto balanced = torch::tensor({{0}, {1}}, torch::kLong);
  CHECK(balance_loss(scores, balanced, 1, c).item<double>() == Approx(0.1));
  // Sigmoid scores are normalized per token first.
  c.scoring_func = "sigmoid";
  auto sig = torch::tensor({{0.5f, 0.5f}, {0.2f, 0.6f}});  // normalized: [.5,.5], [.25,.75]
  CHECK(balance_loss(sig, indices, 1, c).item<double>() == Approx(0.1 * 2 * 0.375));
}

TEST_CASE("dropped expert groups are filled with -inf, as DeepSeek's reference does", "[model][moe]") {
  // DeepSeek-V3 inference/model.py masks the groups that lose with -inf; some transformers versions fill them with
  // 0.0 instead. The two differ when every bias-corrected score of the winning group is negative: a 0 fill would
  // route to the losing group's experts. We follow the reference; this case pins the difference.
  ModelConfig c = flavor("tiny");
  c.n_routed_experts = 4;
  c.n_group = 2;
  c.topk_group = 1;
  c.num_experts_per_tok = 2;
  auto logits = torch::tensor({{0.0f, 0.0f, -4.0f, -4.0f}});  // sigmoid: 0.5, 0.5, 0.018, 0.018
  auto bias = torch::tensor({-2.0f, -2.0f, -2.0f, -2.0f});      // choice scores: -1.5, -1.5, -1.98, -1.98
  Routing r = route(logits, bias, c);
  std::set<int64_t> chosen{r.indices[0][0].item<int64_t>(), r.indices[0][1].item<int64_t>()};
  CHECK(chosen == std::set<int64_t>{0, 1});  // group 0 wins and keeps both picks; a 0 fill would pick 2 and 3
}

TEST_CASE("decode GEMV equals torch::linear for fp32 and bf16 weights on every instruction set of this CPU",
          "[model][gemv]") {
  torch::manual_seed(11);
  torch::NoGradGuard no_grad;
  std::vector<const char*> isas = {"portable"};
  if (std::string(dsopen::model::gemv_isa()) != "portable") isas.push_back("avx2");
  if (std::string(dsopen::model::gemv_isa()) == "avx512") isas.push_back("avx512");
  for (const char* isa : isas)
    for (auto wdtype : {torch::kFloat32, torch::kBFloat16})
      for (int64_t rows : {1, 3, 4})
        for (int64_t in : {77, 768}) {  // a tail shorter than any vector, and whole blocks
          INFO(isa << " weight " << c10::toString(wdtype) << " rows " << rows << " in " << in);
          auto W = torch::randn({37, in}).to(wdtype);
          auto b = torch::randn({37});
          auto x = torch::randn({rows, 1, in});
          REQUIRE(dsopen::model::gemv_applies(x, W));
          auto got = dsopen::model::gemv(x, W, b, isa);
          auto want = torch::nn::functional::linear(x.to(torch::kFloat64), W.to(torch::kFloat64), b.to(torch::kFloat64));
          CHECK(got.sizes() == torch::IntArrayRef({rows, 1, 37}));
          CHECK(torch::allclose(got.to(torch::kFloat64), want, 1e-5, 1e-4));
          // bf16 activations come back in bf16 (the sums in float32)
          auto got_bf16 = dsopen::model::gemv(x.to(torch::kBFloat16), W, torch::Tensor(), isa);
          CHECK(got_bf16.scalar_type() == torch::kBFloat16);
        }
  // Per-channel int8 codes: scale * (codes . x) + offset * sum(x), exactly as the dequantized weight gives it.
  for (const char* isa : isas) {
    auto codes = torch::randint(-128, 128, {37, 77}, torch::kInt8);
    auto scale = torch::rand({37}) * 0.01, offset = torch::randn({37}) * 0.1;
    auto W = codes.to(torch::kFloat64) * scale.to(torch::kFloat64).unsqueeze(1) + offset.to(torch::kFloat64).unsqueeze(1);
    for (int64_t rows : {3, 9, 40}) {  // decode rows one dot each; a prompt's (more than 4) in tiles
      auto x = torch::randn({rows, 77});
      auto got = dsopen::model::gemv_int8(x, codes, scale, offset, isa);
      INFO(isa << ", " << rows << " rows");
      CHECK(torch::allclose(got.to(torch::kFloat64), torch::mm(x.to(torch::kFloat64), W.t()), 1e-5, 1e-4));
      if (rows > 4 || std::string(isa) == "avx2") {  // tiles: a row's result does not depend on the rows beside it
        // (AVX2: within decode batches of up to 32 rows, and within a prompt's rows past that)
        const int64_t n = rows > 32 ? 35 : std::min<int64_t>(5, rows - 1);
        auto first = dsopen::model::gemv_int8(x.narrow(0, 0, n), codes, scale, offset, isa);
        CHECK(torch::equal(first, got.narrow(0, 0, n)));
      }
    }
  }
  // Raw rows (the decode step's form): blocks of 4 rows share each weight load, and a row's result is the same bits
  // whatever rows stand beside it — also where a lone row streams long weight rows one at a time (1000 inputs).
  for (auto wdtype : {torch::kFloat32, torch::kBFloat16})
    for (int64_t in : {200, 1000}) {
      INFO(c10::toString(wdtype) << " in " << in);
      auto W = torch::randn({29, in}).to(wdtype);
      auto x = torch::randn({9, in});
      auto y = torch::empty({9, 29});
      dsopen::model::gemv_rows(x.data_ptr<float>(), 9, in, W.data_ptr(), wdtype == torch::kBFloat16, 29, nullptr,
                               y.data_ptr<float>());
      CHECK(torch::allclose(y.to(torch::kFloat64), torch::mm(x.to(torch::kFloat64), W.to(torch::kFloat64).t()), 1e-5,
                            1e-4));
      for (int64_t r = 0; r < 9; ++r) {
        auto alone = torch::empty({1, 29});
        dsopen::model::gemv_rows(x[r].data_ptr<float>(), 1, in, W.data_ptr(), wdtype == torch::kBFloat16, 29, nullptr,
                                 alone.data_ptr<float>());
        CHECK(torch::equal(alone[0], y[r]));
      }
      // The same on every instruction set of this CPU (AVX2: up to 4 rows one weight row at a time, more in 1 x 3
      // tiles): 1, 2, 4 and 11 rows, each row's bits as alone.
      for (const char* isa : isas) {
        INFO(isa);
        auto many = torch::randn({11, in});
        const auto all = dsopen::model::gemv(many, W, torch::Tensor(), isa);
        CHECK(torch::allclose(all.to(torch::kFloat64), torch::mm(many.to(torch::kFloat64), W.to(torch::kFloat64).t()),
                              1e-5, 1e-4));
        for (int64_t n : {1, 2, 4})
          CHECK(torch::equal(dsopen::model::gemv(many.narrow(0, 11 - n, n), W, torch::Tensor(), isa),
                             all.narrow(0, 11 - n, n)));
        // A prompt's rows (more than any decode batch; AVX2: 4 x 3 tiles of their own): right, and each row's
        // bits independent of how many prompt rows share the product.
        auto prompt = torch::randn({40, in});
        const auto p40 = dsopen::model::gemv(prompt, W, torch::Tensor(), isa);
        CHECK(torch::allclose(p40.to(torch::kFloat64),
                              torch::mm(prompt.to(torch::kFloat64), W.to(torch::kFloat64).t()), 1e-5, 1e-4));
        CHECK(torch::equal(dsopen::model::gemv(prompt.narrow(0, 0, 35), W, torch::Tensor(), isa), p40.narrow(0, 0, 35)));
      }
    }
  // More rows than a decode step, autograd, or a non-contiguous weight go to the GEMM.
  CHECK_FALSE(dsopen::model::gemv_applies(torch::randn({5, 8}), torch::randn({4, 8})));
  CHECK_FALSE(dsopen::model::gemv_applies(torch::randn({1, 8}), torch::randn({8, 4}).t()));
  {
    torch::AutoGradMode grad(true);
    CHECK_FALSE(dsopen::model::gemv_applies(torch::randn({1, 8}), torch::randn({4, 8})));
  }
}

TEST_CASE("the tiles/GEMM crossover is measured once per machine and read back from its cache file",
          "[model][gemv]") {
  using namespace dsopen::model;
  dsopen::testing::TempDir dir;
  const std::string folder = dir.path.string(), path = tile_rows_cache_path(folder);
  const std::set<int64_t> candidates = {32, 64, 128, 256, 512};
  const auto read = [&] {
    std::ifstream in(path);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const TileRows first = load_or_measure_tile_rows(folder);
  REQUIRE(std::filesystem::exists(path));
  CHECK(first.source == path);
  CHECK(candidates.count(first.f32) == 1);
  CHECK(candidates.count(first.bf16) == 1);
  const std::string written = read();
  const std::string key = written.substr(written.find("key "), written.find('\n', written.find("key ")) - written.find("key "));
  CHECK(key.find("isa=") != std::string::npos);
  // Every later process reads the file rather than measuring: values put there come back as they are.
  dir.write(path.substr(folder.size() + 1), "# by hand\n" + key + "\nf32 256\nbf16 64\n");
  const TileRows cached = load_or_measure_tile_rows(folder);
  CHECK(cached.f32 == 256);
  CHECK(cached.bf16 == 64);
  // Another machine's file, one cut short, or one below the rows the tiles always take: measured again, replaced.
  for (const std::string& bad : {std::string("key cpu=another;isa=avx2\nf32 512\nbf16 512\n"), key + "\nf32 512\n",
                                key + "\nf32 8\nbf16 64\n"}) {
    INFO(bad);
    dir.write(path.substr(folder.size() + 1), bad);
    const TileRows again = load_or_measure_tile_rows(folder);
    CHECK(candidates.count(again.f32) == 1);
    CHECK(again.source == path);
    CHECK(read().find(key + "\n") != std::string::npos);
  }
  // A folder that cannot be made: measured in this process, nothing thrown, nothing written.
  const TileRows nowhere = load_or_measure_tile_rows("/proc/dsopen-no-such-folder");
  CHECK(candidates.count(nowhere.f32) == 1);
  CHECK(nowhere.source.rfind("measured", 0) == 0);
}

TEST_CASE("attention over a cache: scores (gemv_rows_serial) and weighted sums (pv_rows) equal float64 and are "
          "batch invariant", "[model][gemv]") {
  // The decode step's attention takes a block of query heads at once: scores = Q [rows, in] . K [T, in]^T and
  // out = P [rows, T] . V [T, n] over a cache of T positions (V rows ldv apart). Each must match a float64 product
  // and give a head the same bits whatever heads share its block.
  torch::manual_seed(12);
  for (auto dt : {torch::kFloat32, torch::kBFloat16})
    for (int64_t rows : {1, 3, 4, 5, 9})
      for (int64_t T : {1, 7, 77})
        for (int64_t n : {16, 45, 77, 128}) {
          INFO(c10::toString(dt) << " rows " << rows << " T " << T << " n " << n);
          const bool b16 = dt == torch::kBFloat16;
          auto Q = torch::randn({rows, n});
          auto K = torch::randn({T, n}).to(dt);
          auto S = torch::empty({rows, T});
          dsopen::model::gemv_rows_serial(Q.data_ptr<float>(), rows, n, K.data_ptr(), b16, T, S.data_ptr<float>());
          CHECK(torch::allclose(S.to(torch::kFloat64), torch::mm(Q.to(torch::kFloat64), K.to(torch::kFloat64).t()),
                                1e-5, 1e-4));
          const int64_t ldv = n + 3;  // V is a column slice of a wider cache
          auto Vwide = torch::randn({T, ldv}).to(dt);
          auto P = torch::rand({rows, T});
          auto O = torch::empty({rows, n});
          dsopen::model::pv_rows(P.data_ptr<float>(), rows, T, Vwide.data_ptr(), b16, ldv, n, O.data_ptr<float>());
          auto V = Vwide.slice(1, 0, n).to(torch::kFloat64);
          CHECK(torch::allclose(O.to(torch::kFloat64), torch::mm(P.to(torch::kFloat64), V), 1e-5, 1e-4));
          // Every instruction set of this CPU sums the same terms in the same order: the same bits.
          for (const char* isa : {"portable", "avx2", "avx512"}) {
            const std::string best = dsopen::model::gemv_isa();
            if (std::string(isa) == "avx512" && best != "avx512") continue;
            if (std::string(isa) == "avx2" && best == "portable") continue;
            auto Oi = torch::empty({rows, n});
            dsopen::model::pv_rows(P.data_ptr<float>(), rows, T, Vwide.data_ptr(), b16, ldv, n, Oi.data_ptr<float>(), isa);
            INFO(isa);
            CHECK(torch::equal(Oi, O));
          }
          for (int64_t r = 0; r < rows; ++r) {
            auto s1 = torch::empty({1, T}), o1 = torch::empty({1, n});
            dsopen::model::gemv_rows_serial(Q[r].data_ptr<float>(), 1, n, K.data_ptr(), b16, T, s1.data_ptr<float>());
            dsopen::model::pv_rows(P[r].data_ptr<float>(), 1, T, Vwide.data_ptr(), b16, ldv, n, o1.data_ptr<float>());
            CHECK(torch::equal(s1[0], S[r]));
            CHECK(torch::equal(o1[0], O[r]));
          }
        }
}

TEST_CASE("int4 GEMV: exact integer products of the int8-rounded activations, the same bits on every kernel and "
          "in any batch", "[model][gemv]") {
  if (!dsopen::model::gemv_int4_supported()) {
    WARN("no AVX2 + FMA on this CPU: the int4 kernel is not used here");
    return;
  }
  // Every kernel this CPU runs: AVX2, and with AVX-512 both the BW and (where present) the VNNI kernel.
  std::vector<std::pair<const char*, std::string>> kernels = {{"avx2", "avx2"}};
  if (std::string(dsopen::model::gemv_int4_isa()) == "avx512") {
    kernels.push_back({"avx512bw", "avx512-bw"});
    __builtin_cpu_init();
    kernels.push_back({"avx512", __builtin_cpu_supports("avx512vnni") ? "avx512-vnni" : "avx512-bw"});
  }
  torch::manual_seed(12);
  torch::NoGradGuard no_grad;
  for (int64_t out : {37, 64})  // 37: a last block of 5 outputs
    for (auto [in, group] : std::vector<std::pair<int64_t, int64_t>>{{96, 32}, {256, 32}, {384, 64}, {640, 128}, {768, 256}}) {
      const int64_t groups = in / group, rows = 11;  // 11: tiles of 4 rows and a last one of 3 (AVX2: 2 and 1)
      auto codes = torch::randint(0, 16, {out, in}, torch::kUInt8);
      // low nibble = even column, high nibble = odd column (the file's layout)
      auto pairs = codes.view({out, in / 2, 2});
      auto packed = (pairs.select(2, 0) + pairs.select(2, 1) * 16).contiguous();
      auto scales = torch::rand({out, groups}) * 0.02 + 0.001;
      auto zeros = torch::randint(0, 16, {out, groups}).to(torch::kFloat32);
      const auto w = dsopen::model::pack_int4(packed, scales, zeros, group);
      auto x = torch::randn({rows, in});
      x[4].mul_(1e-30);  // a tiny row: its blocks' scales are tiny but not zero
      x[5].zero_();      // a zero row: d = 0, every product 0
      // W = (code - zero) * scale, per group; x rounded as the kernel rounds it: per block of 32,
      // q = round_half_even(x * (127 / max|x|)), x ~ q * max / 127.
      auto W = (codes.to(torch::kFloat64).view({out, groups, group}) - zeros.to(torch::kFloat64).unsqueeze(2)) *
               scales.to(torch::kFloat64).unsqueeze(2);
      W = W.view({out, in});
      auto xb = x.view({rows, in / 32, 32});
      auto amax = xb.abs().amax(2, true);
      auto q = torch::where(amax > 0, (xb * (127.0f / amax)).round(), torch::zeros_like(xb));
      auto xr = (q.to(torch::kFloat64) * (amax / 127.0f).to(torch::kFloat64)).view({rows, in});
      auto exact = torch::mm(xr, W.t());
      torch::Tensor first;
      for (const auto& [isa, kernel] : kernels) {
        INFO(isa << ": out " << out << " in " << in << " group " << group);
        auto y = torch::full({rows, out}, 7.0f);
        const std::string ran = dsopen::model::gemv_int4_rows(x.data_ptr<float>(), rows, w, y.data_ptr<float>(), isa);
        // The kernel asked for is the one that ran (an AVX-512 CPU once ran the AVX2 kernel for every int4 product).
        CHECK(ran == kernel);
        CHECK(torch::allclose(y.to(torch::kFloat64), exact, 1e-5, 1e-4));
        CHECK(torch::equal(y[5], torch::zeros({out})));
        auto fl = torch::mm(x.to(torch::kFloat64), W.t());
        CHECK((y.to(torch::kFloat64) - fl).abs().max().item<double>() < 0.02 * fl.abs().max().item<double>());
        // The same bits on every kernel, and for each row alone, in a pair, or among all 11 (other tile shapes).
        if (!first.defined()) first = y;
        CHECK(torch::equal(y, first));
        for (int64_t r : {0, 3, 10}) {
          auto one = torch::empty({1, out});
          dsopen::model::gemv_int4_rows(x[r].data_ptr<float>(), 1, w, one.data_ptr<float>(), isa);
          CHECK(torch::equal(one[0], y[r]));
        }
        auto two = torch::empty({2, out});
        dsopen::model::gemv_int4_rows(x[9].data_ptr<float>(), 2, w, two.data_ptr<float>(), isa);
        CHECK(torch::equal(two, y.narrow(0, 9, 2)));
      }
    }
  CHECK_THROWS(dsopen::model::pack_int4(torch::zeros({4, 24}, torch::kUInt8), torch::ones({4, 1}), torch::zeros({4, 1}), 48));
}
