// Generation and sampling: cached greedy decoding equals repeated full forwards; the sampler respects top-k and
// top-p, is greedy at temperature 0, and is reproducible from its seed; multi-turn chat keeps the conversation.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>
#include <sstream>

#include "data/tokenizer.h"
#include "inference/chat.h"
#include "inference/generation_setup.h"
#include "inference/generator.h"
#include "inference/sampler.h"
#include "model/generation_config.h"
#include "model/registry.h"
#include "utils/errors.h"

using namespace dsopen;

namespace {

// A tokenizer stand-in is not needed for ids; generate() only decodes for streaming, so use a real one.
const data::SentencePieceTokenizer& tok() {
  static auto t = [] {
    data::SentencePieceTrainOptions o;
    o.inputs = {"/usr/share/games/fortunes/fortunes"};
    o.output = "/tmp/dsopen_inference_tok_" + std::to_string(::getpid()) + ".model";
    o.vocab_size = 400;
    o.character_coverage = 0.99;
    data::SentencePieceTokenizer::train(o);
    auto loaded = data::SentencePieceTokenizer::load(o.output);
    std::remove(o.output.c_str());
    return loaded;
  }();
  return *t;
}

}  // namespace

TEST_CASE("greedy generation with the KV cache equals argmax of repeated full forwards", "[inference]") {
  for (const char* flavor : {"debug", "tiny-dense"}) {
    INFO(flavor);
    model::ModelConfig c = *model::find_flavor(flavor);
    c.vocab_size = 400;
    c.use_mtp = false;
    c.max_position_embeddings = 64;
    if (std::string(flavor) == "tiny-dense") c.hidden_size = 64, c.intermediate_size = 96, c.num_hidden_layers = 2;
    torch::manual_seed(1);
    model::CausalLM m(c);
    m->eval();
    inference::Sampler greedy({0.0, 0, 1.0, 1.0, 0});
    std::vector<int32_t> prompt = {1, 17, 42, 99, 5};
    inference::GenerateOptions o;
    o.max_new_tokens = 12;
    o.stop_at_eos = false;
    auto r = inference::generate(m, tok(), prompt, greedy, o);
    REQUIRE(r.tokens.size() == 12);
    std::vector<int64_t> seq(prompt.begin(), prompt.end());
    torch::NoGradGuard ng;
    for (int i = 0; i < 12; ++i) {
      auto logits = m->forward(torch::tensor(seq, torch::kLong).unsqueeze(0)).logits[0][-1];
      const int64_t next = logits.argmax().item<int64_t>();
      CHECK(r.tokens[i] == next);
      seq.push_back(next);
    }
    // A prompt that does not fit the context is refused.
    std::vector<int32_t> long_prompt(64, 7);
    CHECK_THROWS_WITH(inference::generate(m, tok(), long_prompt, greedy, o), Catch::Contains("model's context is 64"));
  }
}

TEST_CASE("a batch of prompts of different lengths equals each prompt generated alone", "[inference]") {
  for (const char* flavor : {"debug", "tiny-dense"}) {
    INFO(flavor);
    model::ModelConfig c = *model::find_flavor(flavor);
    c.vocab_size = 400;
    c.use_mtp = false;
    c.max_position_embeddings = 64;
    if (std::string(flavor) == "tiny-dense") c.hidden_size = 64, c.intermediate_size = 96, c.num_hidden_layers = 2;
    torch::manual_seed(2);
    model::CausalLM m(c);
    m->eval();
    const std::vector<std::vector<int32_t>> prompts = {{1, 17, 42}, {1, 5, 99, 23, 7, 61, 8}, {1, 250}};
    inference::GenerateOptions o;
    o.max_new_tokens = 10;
    o.stop_at_eos = false;
    inference::Sampler greedy({0.0, 0, 1.0, 1.0, 0});
    auto batch = inference::generate_batch(m, tok(), prompts, greedy, o);
    REQUIRE(batch.size() == 3);
    for (size_t i = 0; i < prompts.size(); ++i) {
      auto alone = inference::generate(m, tok(), prompts[i], greedy, o);
      CHECK(batch[i].tokens == alone.tokens);
    }
  }
}

TEST_CASE("sampler: top-k and top-p never emit excluded tokens; seeds reproduce", "[inference][sampler]") {
  auto logits = torch::tensor({3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0});
  inference::Sampler topk({1.0, 3, 1.0, 1.0, 42});
  std::set<int64_t> seen;
  for (int i = 0; i < 2000; ++i) seen.insert(topk.sample(logits, {}));
  CHECK(seen == std::set<int64_t>{0, 1, 2});  // all of the top 3 appear, nothing else

  // softmax of the logits: p0 ≈ .441, p1 ≈ .267, p2 ≈ .162 -> top_p 0.75 keeps {0, 1, 2} (cumulative .441,
  // .708, .870) and top_p 0.7 keeps {0, 1}.
  inference::Sampler topp({1.0, 0, 0.75, 1.0, 7});
  seen.clear();
  for (int i = 0; i < 2000; ++i) seen.insert(topp.sample(logits, {}));
  CHECK(seen == std::set<int64_t>{0, 1, 2});
  inference::Sampler topp_two({1.0, 0, 0.7, 1.0, 7});
  seen.clear();
  for (int i = 0; i < 2000; ++i) seen.insert(topp_two.sample(logits, {}));
  CHECK(seen == std::set<int64_t>{0, 1});
  inference::Sampler topp_small({1.0, 0, 0.4, 1.0, 7});
  for (int i = 0; i < 200; ++i) CHECK(topp_small.sample(logits, {}) == 0);

  // Frequencies follow the probabilities (seeded, so this cannot flake).
  inference::Sampler plain({1.0, 0, 1.0, 1.0, 3});
  int zero = 0;
  for (int i = 0; i < 4000; ++i) zero += plain.sample(logits, {}) == 0;
  const double p0 = std::exp(3.0) / logits.exp().sum().item<double>();
  CHECK(zero / 4000.0 == Approx(p0).margin(0.03));

  inference::Sampler a({0.9, 5, 0.9, 1.0, 123}), b({0.9, 5, 0.9, 1.0, 123});
  for (int i = 0; i < 100; ++i) CHECK(a.sample(logits, {}) == b.sample(logits, {}));
  inference::Sampler greedy({0.0, 0, 1.0, 1.0, 9});
  CHECK(greedy.sample(logits, {}) == 0);
  // Repetition penalty: the repeated best token loses to the next one.
  inference::Sampler penal({0.0, 0, 1.0, 2.0, 0});
  CHECK(penal.sample(logits, {0}) == 1);
  CHECK_THROWS(inference::Sampler({1.0, 0, 0.0, 1.0, 0}));
}

namespace {
// The candidate list as a plain implementation computes it: every logit sorted (stable: ties by id), softmax at the
// temperature over the top-k, then min-p and top-p on the sorted probabilities, renormalised.
std::vector<std::pair<int64_t, double>> reference_candidates(const std::vector<double>& v, double temperature,
                                                             size_t top_k, double top_p, double min_p) {
  std::vector<int64_t> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return v[a] > v[b]; });
  size_t keep = top_k ? std::min(top_k, v.size()) : v.size();
  std::vector<double> p(keep);
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += p[i] = std::exp((v[order[i]] - v[order[0]]) / temperature);
  for (auto& q : p) q /= sum;
  double kept = 1;  // min-p renormalises what it keeps
  if (min_p > 0) {
    size_t n = 1;
    while (n < keep && p[n] >= min_p * p[0]) ++n;
    keep = n;
    kept = 0;
    for (size_t i = 0; i < keep; ++i) kept += p[i];
  }
  if (top_p < 1) {
    double cum = 0;
    size_t n = 0;
    while (n < keep && cum < top_p) cum += p[n++] / kept;
    keep = std::max<size_t>(n, 1);
  }
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += p[i];
  std::vector<std::pair<int64_t, double>> out;
  for (size_t i = 0; i < keep; ++i) out.push_back({order[i], p[i] / total});
  return out;
}
}  // namespace

TEST_CASE("sampler: candidates over a large vocabulary equal a full stable sort's, ties by id", "[inference][sampler]") {
  // The sampler orders only the prefix it can keep; the set, its order (ties included) and the probabilities must
  // be those of sorting the whole vocabulary.
  torch::manual_seed(5);
  auto logits = (torch::randn({50000}, torch::kFloat64) * 4).round() / 4;  // many exact ties
  const std::vector<double> v(logits.data_ptr<double>(), logits.data_ptr<double>() + logits.numel());
  struct Case { double temperature; int64_t top_k; double top_p, min_p; };
  for (const Case c : {Case{1.0, 0, 1.0, 0.0}, Case{0.7, 50, 1.0, 0.0}, Case{1.0, 0, 0.9, 0.0}, Case{0.3, 0, 0.5, 0.0},
                       Case{1.0, 0, 1.0, 0.05}, Case{1.2, 0, 0.95, 0.01}, Case{1.0, 3000, 0.99, 0.0},
                       Case{0.05, 0, 0.999, 0.0}, Case{2.0, 70000, 1.0, 0.0}}) {
    INFO("temperature " << c.temperature << " top_k " << c.top_k << " top_p " << c.top_p << " min_p " << c.min_p);
    inference::SamplingOptions o;
    o.temperature = c.temperature, o.top_k = c.top_k, o.top_p = c.top_p, o.min_p = c.min_p;
    const auto got = inference::Sampler(o).candidates(logits, {});
    const auto want = reference_candidates(v, c.temperature, static_cast<size_t>(c.top_k), c.top_p, c.min_p);
    REQUIRE(got.size() == want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      REQUIRE(got[i].first == want[i].first);
      REQUIRE(got[i].second == Approx(want[i].second).epsilon(1e-9));
    }
  }
  // Greedy: the lowest id among the tied maxima, from float32 and bfloat16 logits alike.
  auto tied = torch::zeros({1000});
  tied[700] = 2.0f, tied[300] = 2.0f;
  for (auto dt : {torch::kFloat32, torch::kBFloat16}) {
    const auto g = inference::Sampler({0.0, 0, 1.0, 1.0, 0}).candidates(tied.to(dt), {});
    REQUIRE(g.size() == 1);
    CHECK(g[0].first == 300);
  }
}

TEST_CASE("sampler: the repetition penalty applies once per distinct context token", "[inference][sampler]") {
  // transformers' RepetitionPenaltyLogitsProcessor gathers the context's tokens and scatters one penalized value:
  // a token seen three times is divided by the penalty once, not cubed.
  auto logits = torch::tensor({4.0, 3.0, -1.0});
  inference::Sampler s({1.0, 0, 1.0, 2.0, 0});
  const auto once = s.candidates(logits, {0});
  const auto thrice = s.candidates(logits, {0, 0, 0, 2, 2});
  auto prob = [](const std::vector<std::pair<int64_t, double>>& c, int64_t id) {
    for (const auto& [t, p] : c)
      if (t == id) return p;
    return 0.0;
  };
  // logits after the penalty: {2, 3, -2} (token 2 is negative: multiplied).
  const double z = std::exp(2.0) + std::exp(3.0) + std::exp(-2.0);
  CHECK(prob(thrice, 0) == Approx(std::exp(2.0) / z));
  CHECK(prob(thrice, 2) == Approx(std::exp(-2.0) / z));
  CHECK(prob(once, 0) == Approx(std::exp(2.0) / (std::exp(2.0) + std::exp(3.0) + std::exp(-1.0))));
}

TEST_CASE("chat renders turns as SFT data does and keeps the conversation across turns", "[inference][chat]") {
  data::ChatTemplate tmpl;
  CHECK(inference::chat_stop(tmpl) == "<|end|>");
  data::Conversation conv;
  conv.messages = {{"system", "Be brief."}, {"user", "Hi"}};
  auto ids = inference::chat_prompt(conv, tok(), tmpl);
  REQUIRE(ids.front() == tok().bos_id());
  CHECK(tok().decode(std::vector<int32_t>(ids.begin() + 1, ids.end())) == "<|System|>Be brief.\n<|User|>Hi\n<|Assistant|>");
  tmpl.add_eos = false;
  auto head = data::tokenize_conversation(conv, tok(), tmpl).ids;  // the training tokenization, piece by piece
  CHECK(std::vector<int32_t>(ids.begin(), ids.begin() + head.size()) == head);

  model::ModelConfig c = *model::find_flavor("debug");
  c.vocab_size = 400;
  c.use_mtp = false;
  c.max_position_embeddings = 96;
  torch::manual_seed(3);
  model::CausalLM m(c);
  m->eval();
  inference::Sampler greedy({0.0, 0, 1.0, 1.0, 0});
  inference::ChatOptions o;
  o.generate.max_new_tokens = 6;
  std::istringstream in("Hello there\nAnd then?\n");
  std::ostringstream out;
  auto end = inference::chat_loop(m, tok(), greedy, o, in, out);
  REQUIRE(end.messages.size() == 4);
  CHECK(end.messages[0].content == "Hello there");
  CHECK(end.messages[1].role == "assistant");
  CHECK(end.messages[2].content == "And then?");
  // The second reply is the one generated after the whole conversation, first exchange included.
  data::Conversation upto(end);
  upto.messages.pop_back();
  auto o2 = o.generate;
  o2.stop.push_back("<|end|>");
  CHECK(end.messages[3].content == inference::generate(m, tok(), o.format.prompt_ids(upto, tok()), greedy, o2).text);
  CHECK(out.str() == end.messages[1].content + "\n" + end.messages[3].content + "\n");

  // /reset starts over; a long conversation drops its oldest exchanges instead of overflowing the context.
  std::string many = "/reset\n";
  for (int i = 0; i < 8; ++i) many += "Tell me one more thing about the sea, number " + std::to_string(i) + "\n";
  std::istringstream in2(many);
  o.system = "Be brief.";
  auto long_conv = inference::chat_loop(m, tok(), greedy, o, in2, out);
  REQUIRE(long_conv.messages.size() >= 3);
  CHECK(long_conv.messages.front().role == "system");
  CHECK(long_conv.messages.size() < 1 + 2 * 8);
  CHECK(long_conv.messages.back().role == "assistant");
}

TEST_CASE("generation_config.json: max_length and stop_strings apply, controls we lack are refused", "[inference]") {
  const auto dir = std::filesystem::temp_directory_path() / ("dsopen_gencfg_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto write = [&](const std::string& text) { std::ofstream(dir / "generation_config.json") << text; };
  write(R"({"do_sample": false, "max_length": 9, "stop_strings": ["xyz"], "num_beams": 1, "min_length": 0})");
  auto gen = model::read_generation_config(dir.string());
  REQUIRE(gen);
  CHECK(gen->max_length == 9);
  CHECK(gen->stop_strings == std::vector<std::string>{"xyz"});
  inference::SamplingRequest request;
  CHECK(inference::resolve_max_length(gen, request) == 9);  // no max_new_tokens anywhere: max_length caps
  request.max_new_tokens = 4;
  CHECK(inference::resolve_max_length(gen, request) == 0);  // an explicit count wins, as in transformers
  for (const char* bad : {R"({"num_beams": 4})", R"({"no_repeat_ngram_size": 3})", R"({"suppress_tokens": [5]})",
                          R"({"min_new_tokens": 2})", R"({"typical_p": 0.9})", R"({"min_p": 0.1})"}) {
    INFO(bad);
    write(bad);
    try {
      model::read_generation_config(dir.string());
      FAIL("accepted");
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find("is not supported by dsopen's generation") != std::string::npos);
      CHECK(e.exit_code() == 2);
    }
  }
  std::filesystem::remove_all(dir);

  // max_length ends each sequence at prompt + generated = max_length; ids past the tokenizer's vocabulary (a
  // padded embedding) are never sampled.
  model::ModelConfig c = *model::find_flavor("debug");
  c.vocab_size = 512;  // the tokenizer has 400
  c.use_mtp = false;
  torch::manual_seed(3);
  model::CausalLM m(c);
  m->eval();
  inference::Sampler sampler({1.5, 0, 1.0, 1.0, 9});
  inference::GenerateOptions o;
  o.max_new_tokens = 20;
  o.stop_at_eos = false;
  o.max_length = 8;
  auto results = inference::generate_batch(m, tok(), {{1, 2, 3}, {1, 2, 3, 4, 5}}, sampler, o);
  CHECK(results[0].tokens.size() == 5);
  CHECK(results[1].tokens.size() == 3);
  o.max_length = 0;
  o.max_new_tokens = 200;
  for (const auto& r : inference::generate_batch(m, tok(), {{1, 2, 3}}, sampler, o))
    for (int32_t t : r.tokens) CHECK(t < tok().vocab_size());
}
