// SFT data on a real SentencePiece tokenizer (trained on the fortunes corpus): loss masks checked token by token
// against pieces encoded here, both JSONL forms, padding, packing against the unpacked samples, rank sharding,
// truncation, the chat_template config section, and errors naming file:line.
#include <catch2/catch.hpp>

#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "tests/test_helpers.h"
#include "data/chat_format.h"
#include "data/jinja.h"
#include "data/hf_tokenizer_files.h"
#include "data/sft.h"
#include "data/tokenizer.h"
#include "utils/config.h"
#include "utils/errors.h"

using namespace dsopen;
using data::Conversation;
using data::Truncation;
namespace fs = std::filesystem;

using dsopen::testing::TempDir;
using dsopen::testing::error_of;

namespace {

const char* kCorpus = "/usr/share/games/fortunes/fortunes";

// One tokenizer per test process, with the chat markers as user symbols.
const data::SentencePieceTokenizer& tokenizer() {
  static std::unique_ptr<data::SentencePieceTokenizer> tok = [] {
    TempDir dir;
    data::SentencePieceTrainOptions o;
    o.inputs = {kCorpus};
    o.output = (dir.path / "sft.model").string();
    o.vocab_size = 1000;
    o.character_coverage = 0.999;
    o.user_symbols = {"<|System|>", "<|User|>", "<|Assistant|>", "<|end|>"};
    data::SentencePieceTokenizer::train(o);
    return data::SentencePieceTokenizer::load(o.output);
  }();
  return *tok;
}

// Non-empty lines of the corpus, tabs and escapes included: real text of varied length.
const std::vector<std::string>& corpus_lines() {
  static std::vector<std::string> lines = [] {
    std::vector<std::string> out;
    std::ifstream in(kCorpus);
    for (std::string l; std::getline(in, l);)
      if (l.size() > 3 && l != "%") out.push_back(l);
    return out;
  }();
  return lines;
}

// n distinct conversations of varied length; every third has a system message, every fourth two turns.
std::vector<Conversation> make_conversations(int n) {
  const auto& lines = corpus_lines();
  std::vector<Conversation> out;
  for (int i = 0; i < n; ++i) {
    Conversation c;
    if (i % 3 == 0) c.messages.push_back({"system", "Be brief."});
    c.messages.push_back({"user", "Question " + std::to_string(i) + ": " + lines[(7 * i) % lines.size()]});
    std::string answer;
    for (int k = 0; k <= i % 4; ++k) answer += lines[(7 * i + 1 + k) % lines.size()] + "\n";
    c.messages.push_back({"assistant", answer});
    if (i % 4 == 1) {
      c.messages.push_back({"user", "More?"});
      c.messages.push_back({"assistant", lines[(3 * i + 5) % lines.size()]});
    }
    out.push_back(c);
  }
  return out;
}

std::vector<int64_t> row(const torch::Tensor& t, int64_t r) {
  auto c = t[r].contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

// The first n values (all when fewer) as int64, to compare with batch rows.
template <class T>
std::vector<int64_t> first(const std::vector<T>& v, size_t n) {
  return {v.begin(), v.begin() + std::min(n, v.size())};
}

std::vector<int64_t> flat(const torch::Tensor& t) {
  auto c = t.contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

int64_t count_trained(const std::vector<int64_t>& labels) {
  return std::count_if(labels.begin(), labels.end(), [](int64_t l) { return l != -100; });
}

// Every sample of one rank in one epoch, in order (micro batches of 1), as input_ids rows.
std::vector<std::vector<int64_t>> epoch_rows(const data::SftDataset& ds, int64_t epoch) {
  std::vector<std::vector<int64_t>> out;
  for (int64_t i = 0; i < ds.batches_per_epoch(1); ++i) out.push_back(row(ds.batch(epoch, i, 1).input_ids, 0));
  return out;
}

}  // namespace

TEST_CASE("SFT labels are exactly the assistant tokens, checked token by token", "[data][sft]") {
  const auto& tok = tokenizer();
  for (const char* marker : {"<|System|>", "<|User|>", "<|Assistant|>", "<|end|>"}) {
    INFO(marker);
    REQUIRE(tok.encode(marker) == std::vector<int32_t>{tok.token_id(marker)});
  }
  Conversation conv;
  conv.messages = {{"system", "You answer in fortunes."},
                   {"user", "Tell me something wise."},
                   {"assistant", "A fool and his money are soon parted."},
                   {"user", "And another?"},
                   {"assistant", "Never trust a computer you can't throw out a window."}};
  const data::ChatTemplate tmpl;
  // Expected: every piece encoded on its own; `trained` marks assistant content + suffix and the final eos.
  std::vector<int32_t> ids = {tok.bos_id()};
  std::vector<bool> trained = {false};
  auto add = [&](const std::string& text, bool t) {
    for (int32_t id : tok.encode(text)) {
      ids.push_back(id);
      trained.push_back(t);
    }
  };
  add("<|System|>", false), add("You answer in fortunes.", false), add("\n", false);
  add("<|User|>", false), add("Tell me something wise.", false), add("\n", false);
  add("<|Assistant|>", false), add("A fool and his money are soon parted.", true), add("<|end|>\n", true);
  add("<|User|>", false), add("And another?", false), add("\n", false);
  add("<|Assistant|>", false), add("Never trust a computer you can't throw out a window.", true), add("<|end|>\n", true);
  ids.push_back(tok.eos_id());
  trained.push_back(true);
  std::vector<int32_t> labels(ids.size(), -100);
  for (size_t i = 0; i + 1 < ids.size(); ++i)
    if (trained[i + 1]) labels[i] = ids[i + 1];

  const auto tc = data::tokenize_conversation(conv, tok, tmpl);
  CHECK(tc.ids == ids);
  CHECK(tc.labels == labels);
  CHECK(tc.labels.back() == -100);
  CHECK(tc.labels[tc.labels.size() - 2] == tok.eos_id());  // the eos after the last answer is a target

  // A conversation that ends with a user turn trains no eos; without bos/eos the ids shrink by exactly those two.
  Conversation open = conv;
  open.messages.push_back({"user", "Thanks"});
  const auto to = data::tokenize_conversation(open, tok, tmpl);
  CHECK(to.ids.back() == tok.eos_id());
  CHECK(to.labels[to.labels.size() - 2] == -100);
  data::ChatTemplate bare;
  bare.add_bos = bare.add_eos = false;
  const auto tb = data::tokenize_conversation(conv, tok, bare);
  CHECK(std::vector<int32_t>(tc.ids.begin() + 1, tc.ids.end() - 1) == tb.ids);
}

TEST_CASE("prompt/response and messages forms of one chat give identical tokens", "[data][sft]") {
  TempDir dir;
  nlohmann::json a = {{"prompt", "What is 2+2?\tQuick."}, {"response", "4, \"obviously\" 你好"}};
  nlohmann::json b = {{"messages", {{{"role", "user"}, {"content", "What is 2+2?\tQuick."}},
                                    {{"role", "assistant"}, {"content", "4, \"obviously\" 你好"}}}}};
  int64_t skipped = -1;
  const auto convs = data::read_sft_jsonl(dir.write("chat.jsonl", a.dump() + "\n\n  \r\n" + b.dump() + "\r\n"), &skipped);
  CHECK(skipped == 2);
  REQUIRE(convs.size() == 2);
  REQUIRE(convs[0].messages.size() == 2);
  CHECK(convs[0].messages[0].role == "user");
  CHECK(convs[0].messages[1].content == "4, \"obviously\" 你好");
  const auto ta = data::tokenize_conversation(convs[0], tokenizer(), {});
  const auto tb = data::tokenize_conversation(convs[1], tokenizer(), {});
  CHECK(ta.ids == tb.ids);
  CHECK(ta.labels == tb.labels);
}

TEST_CASE("unpacked SFT samples are padded on the right and decode to the rendered template", "[data][sft]") {
  const auto& tok = tokenizer();
  Conversation conv;
  conv.messages = {{"system", "Terse."}, {"user", "Say hi"}, {"assistant", "Hi there!"}};
  data::ChatTemplate tmpl;
  const data::SftDataset ds({conv}, tok, tmpl, 64, Truncation::Right, false, 1, 0, 1);
  REQUIRE(ds.num_samples() == 1);
  REQUIRE(ds.batches_per_epoch(1) == 1);
  const auto b = ds.batch(0, 0, 1);
  REQUIRE(b.input_ids.sizes() == torch::IntArrayRef({1, 64}));
  CHECK(b.input_ids.dtype() == torch::kInt64);
  CHECK(b.labels.dtype() == torch::kInt64);
  CHECK(!b.segment_ids.defined());
  CHECK(!b.position_ids.defined());
  const auto tc = data::tokenize_conversation(conv, tok, tmpl);
  const size_t n = tc.ids.size();
  REQUIRE(n < 64);
  const auto ids = row(b.input_ids, 0), labels = row(b.labels, 0);
  CHECK(first(ids, n) == first(tc.ids, n));
  CHECK(first(labels, n) == first(tc.labels, n));
  for (size_t i = n; i < 64; ++i) {
    CHECK(ids[i] == tok.pad_id());
    CHECK(labels[i] == -100);
  }
  CHECK(tok.decode(std::vector<int32_t>(ids.begin(), ids.begin() + n)) ==
        "<|System|>Terse.\n<|User|>Say hi\n<|Assistant|>Hi there!<|end|>\n");
  CHECK(ds.trained_tokens() == count_trained(labels));
}

TEST_CASE("packing keeps conversations whole and their labels unchanged", "[data][sft]") {
  const auto& tok = tokenizer();
  const data::ChatTemplate tmpl;
  auto convs = make_conversations(40);
  Conversation longest;  // longer than a row: truncated to T + 1 tokens, fills a row alone
  longest.messages = {{"user", "Everything, please."}, {"assistant", ""}};
  for (int i = 0; i < 30; ++i) longest.messages[1].content += corpus_lines()[i] + "\n";
  convs.push_back(longest);
  const int64_t T = 256;
  REQUIRE(data::tokenize_conversation(longest, tok, tmpl).ids.size() > T + 1);
  const data::SftDataset unpacked(convs, tok, tmpl, T, Truncation::Right, false, 5, 0, 1);
  const data::SftDataset packed(convs, tok, tmpl, T, Truncation::Right, true, 5, 0, 1);
  REQUIRE(unpacked.num_samples() == 41);
  CHECK(packed.num_samples() < unpacked.num_samples() / 2);

  // What each conversation contributes to a row: its first min(n, T) ids and labels.
  std::multiset<std::vector<int64_t>> expected_ids;
  std::map<std::vector<int64_t>, std::vector<int64_t>> labels_of;
  int64_t unpacked_trained = 0;
  for (const auto& c : convs) {
    const auto tc = data::tokenize_conversation(c, tok, tmpl);
    const size_t len = std::min<size_t>(tc.ids.size(), T);
    if (tc.ids.size() > T + 1) CHECK(count_trained(first(tc.labels, len)) > 0);
    expected_ids.insert(first(tc.ids, len));
    labels_of[first(tc.ids, len)] = first(tc.labels, len);
  }
  for (int64_t i = 0; i < unpacked.batches_per_epoch(1); ++i)
    unpacked_trained += count_trained(flat(unpacked.batch(0, i, 1).labels));
  CHECK(unpacked_trained == unpacked.trained_tokens());

  std::multiset<std::vector<int64_t>> found_ids;
  int64_t packed_trained = 0;
  for (int64_t i = 0; i < packed.batches_per_epoch(1); ++i) {
    const auto b = packed.batch(0, i, 1);
    REQUIRE(b.segment_ids.defined());
    const auto ids = row(b.input_ids, 0), labels = row(b.labels, 0);
    const auto seg = row(b.segment_ids, 0), pos = row(b.position_ids, 0);
    packed_trained += count_trained(labels);
    int64_t start = 0, expect_seg = 1;
    while (start < T && seg[start] != 0) {
      CHECK(seg[start] == expect_seg++);
      int64_t end = start;
      while (end < T && seg[end] == seg[start]) {
        CHECK(pos[end] == end - start);
        ++end;
      }
      const std::vector<int64_t> piece(ids.begin() + start, ids.begin() + end);
      REQUIRE(labels_of.count(piece) == 1);  // a whole conversation, not a part of one
      CHECK(std::vector<int64_t>(labels.begin() + start, labels.begin() + end) == labels_of[piece]);
      found_ids.insert(piece);
      start = end;
    }
    for (int64_t p = start; p < T; ++p) {  // padding after the last conversation only
      CHECK(seg[p] == 0);
      CHECK(pos[p] == 0);
      CHECK(ids[p] == tok.pad_id());
      CHECK(labels[p] == -100);
    }
  }
  CHECK(found_ids == expected_ids);
  CHECK(packed_trained == unpacked_trained);
  CHECK(packed.trained_tokens() == unpacked.trained_tokens());
}

TEST_CASE("SFT samples are sharded disjointly over ranks, ordered by seed and epoch", "[data][sft]") {
  const auto& tok = tokenizer();
  for (bool pack : {false, true}) {
    for (int n : {30, 31}) {
      const auto convs = make_conversations(n);
      const data::SftDataset all(convs, tok, {}, 192, Truncation::Right, pack, 11, 0, 1);
      std::set<std::vector<int64_t>> every;
      for (const auto& r : epoch_rows(all, 0)) every.insert(r);
      REQUIRE(static_cast<int64_t>(every.size()) == all.num_samples());  // samples are distinct

      for (int world : {2, 3}) {
        INFO("pack " << pack << ", " << n << " conversations, " << world << " ranks");
        std::set<std::vector<int64_t>> seen;
        size_t total = 0;
        for (int rank = 0; rank < world; ++rank) {
          const data::SftDataset ds(convs, tok, {}, 192, Truncation::Right, pack, 11, rank, world);
          CHECK(ds.num_samples() == all.num_samples());
          CHECK(ds.batches_per_epoch(1) == all.num_samples() / world);
          const auto rows = epoch_rows(ds, 0);
          total += rows.size();
          seen.insert(rows.begin(), rows.end());
          // A micro batch of 2 is the next two samples of the rank's order.
          const auto b = ds.batch(0, 1, 2);
          CHECK(row(b.input_ids, 0) == rows[2]);
          CHECK(row(b.input_ids, 1) == rows[3]);
        }
        CHECK(seen.size() == total);  // disjoint
        CHECK(static_cast<int64_t>(total) == all.num_samples() / world * world);
        for (const auto& r : seen) CHECK(every.count(r) == 1);
        if (all.num_samples() % world == 0) CHECK(seen == every);
      }
      const data::SftDataset again(convs, tok, {}, 192, Truncation::Right, pack, 11, 0, 1);
      const data::SftDataset other_seed(convs, tok, {}, 192, Truncation::Right, pack, 12, 0, 1);
      CHECK(epoch_rows(again, 0) == epoch_rows(all, 0));
      CHECK(epoch_rows(again, 3) == epoch_rows(all, 3));
      CHECK(epoch_rows(all, 1) != epoch_rows(all, 0));
      CHECK(epoch_rows(other_seed, 0) != epoch_rows(all, 0));
      auto e0 = epoch_rows(all, 0), e1 = epoch_rows(all, 1);
      CHECK(std::set<std::vector<int64_t>>(e1.begin(), e1.end()) == every);  // reordered, not changed
    }
  }
  CHECK_THROWS_WITH(data::SftDataset(make_conversations(4), tok, {}, 64, Truncation::Right, false, 1, 3, 3),
                    Catch::Contains("rank 3 is outside world size 3"));
  const data::SftDataset ds(make_conversations(4), tok, {}, 64, Truncation::Right, false, 1, 0, 1);
  CHECK_THROWS_WITH(ds.batch(0, 2, 2), Catch::Contains("batch 2 is outside this epoch's 2 batches"));
}

TEST_CASE("truncation: Right keeps the first seq_len+1 tokens, Drop skips longer conversations", "[data][sft]") {
  const auto& tok = tokenizer();
  const data::ChatTemplate tmpl;
  Conversation small;
  small.messages = {{"user", "Hi"}, {"assistant", "Hello."}};
  Conversation big;
  big.messages = {{"user", "Recite."}, {"assistant", corpus_lines()[0] + " " + corpus_lines()[1] + " " + corpus_lines()[2]}};
  const auto full = data::tokenize_conversation(big, tok, tmpl);
  const int64_t n = static_cast<int64_t>(full.ids.size());
  REQUIRE(n > 40);

  const int64_t T = 24;
  const data::SftDataset right({big}, tok, tmpl, T, Truncation::Right, false, 1, 0, 1);
  CHECK(right.num_samples() == 1);
  CHECK(right.dropped() == 0);
  const auto b = right.batch(0, 0, 1);
  CHECK(row(b.input_ids, 0) == first(full.ids, T));
  CHECK(row(b.labels, 0) == first(full.labels, T));
  CHECK(row(b.labels, 0).back() == full.ids[T]);  // token seq_len is still a target

  const data::SftDataset drop({small, big}, tok, tmpl, T, Truncation::Drop, false, 1, 0, 1);
  CHECK(drop.num_samples() == 1);
  CHECK(drop.dropped() == 1);
  CHECK(row(drop.batch(0, 0, 1).input_ids, 0)[1] == data::tokenize_conversation(small, tok, tmpl).ids[1]);

  // The boundary: n tokens fit seq_len = n - 1 (the last one is only a target), not seq_len = n - 2.
  const data::SftDataset edge({big}, tok, tmpl, n - 1, Truncation::Drop, false, 1, 0, 1);
  CHECK(edge.dropped() == 0);
  CHECK(row(edge.batch(0, 0, 1).labels, 0).back() == tok.eos_id());
  CHECK_THROWS_WITH(data::SftDataset({big}, tok, tmpl, n - 2, Truncation::Drop, false, 1, 0, 1),
                    Catch::Contains("no conversations left to train on: 1 longer than data.seq_len + 1"));

  // Right truncation that cuts away every assistant token leaves nothing to learn: dropped as well.
  Conversation long_prompt;
  long_prompt.messages = {{"user", corpus_lines()[3] + " " + corpus_lines()[4] + " " + corpus_lines()[5]}, {"assistant", "Ok."}};
  const data::SftDataset cut({small, long_prompt}, tok, tmpl, 8, Truncation::Right, false, 1, 0, 1);
  CHECK(cut.num_samples() == 1);
  CHECK(cut.dropped() == 1);
  // Nothing left: the error names the data, the cause and the fix that applies (not "truncation: right" again).
  CHECK_THROWS_WITH(data::SftDataset({long_prompt}, tok, tmpl, 8, Truncation::Right, false, 1, 0, 1, "data.train (a.jsonl)"),
                    Catch::Contains("data.train (a.jsonl): no conversations left to train on: 1 without an assistant "
                                    "token to train on in their first 8 tokens") &&
                        Catch::Contains("raise data.seq_len (long prompts leave no room for the answer)") &&
                        !Catch::Contains("truncation: right"));
}

TEST_CASE("chat_template config section decodes strictly", "[data][sft][config]") {
  auto decode = [](const std::string& yaml) {
    const auto doc = config::Document::parse(yaml, "sft.yaml");
    config::ErrorList errors;
    config::Reader root(doc, doc.root(), "", errors);
    data::ChatTemplate t;
    config::Reader r = root.child("chat_template");
    data::decode(r, t);
    root.finish();
    errors.throw_if_any();
    return t;
  };
  const auto t = decode("chat_template:\n  user_prefix: \"### User: \"\n  add_bos: false\n");
  CHECK(t.user_prefix == "### User: ");
  CHECK(!t.add_bos);
  CHECK(t.assistant_suffix == "<|end|>\n");
  CHECK(t.add_eos);
  CHECK_THROWS_WITH(decode("chat_template:\n  user_prefx: x\n"),
                    Catch::Contains("sft.yaml:2") && Catch::Contains("user_prefx") && Catch::Contains("user_prefix"));
}

TEST_CASE("bad SFT files are errors naming file and line", "[data][sft]") {
  TempDir dir;
  const std::string good = R"({"prompt":"a","response":"b"})";
  auto err = [&](const std::string& text) {
    const std::string path = dir.write("bad.jsonl", text);
    return error_of([&] { data::read_sft_jsonl(path); });
  };
  const std::string p = (dir.path / "bad.jsonl").string();
  CHECK_THAT(err(good + "\n\n{\"prompt\": \"a\", \"response\": \n"), Catch::StartsWith(p + ":3: not valid JSON ("));
  CHECK_THAT(err(good + "\n{\"prompt\":\"a\",\"answer\":\"b\"}\n"),
             Catch::StartsWith(p + ":2: missing \"messages\" or \"prompt\"/\"response\""));
  CHECK_THAT(err(R"({"messages":[{"role":"user","content":"a"},{"role":"bot","content":"b"}]})"),
             Catch::StartsWith(p + ":1: message 2 has unknown role 'bot'"));
  CHECK_THAT(err(good + "\n" + R"({"messages":[{"role":"user","content":"only a question"}]})"),
             Catch::StartsWith(p + ":2: no assistant message"));
  CHECK_THAT(err(R"({"messages":[{"role":"user"}]})"), Catch::StartsWith(p + ":1: message 1 needs string fields"));
  CHECK_THAT(err("[1, 2]\n"), Catch::StartsWith(p + ":1: expected a JSON object"));
  CHECK_THAT(err(""), Catch::StartsWith(p + ": no conversations"));
  CHECK_THAT(err("\n  \n"), Catch::StartsWith(p + ": no conversations"));
  const std::string missing = (dir.path / "nope.jsonl").string();
  CHECK_THAT(error_of([&] { data::read_sft_jsonl(missing); }), Catch::StartsWith(missing + ": SFT data file not found"));
}

TEST_CASE("a Jinja chat template trains exactly what the SFT template does when it renders the same", "[data][sft][jinja]") {
  // dsopen's template written as Jinja (what an export carries): the same ids and the same labels, token by token.
  const auto& tok = tokenizer();
  data::ChatTemplate sft;
  TempDir dir;
  const auto jinja_path = dir.path / "chat_template.jinja";
  std::ofstream(jinja_path) << data::chat_template_jinja(sft);
  std::ofstream(dir.path / "tokenizer_config.json") << R"({"bos_token": "<s>", "eos_token": "</s>"})";
  data::ChatTemplate via_jinja;
  via_jinja.jinja = jinja_path.string();
  const auto format = data::ChatFormat::for_template(via_jinja);
  REQUIRE(format.is_jinja());
  const std::vector<Conversation> convs = {
      {{{"user", "Hi"}, {"assistant", "Hello there."}}},
      {{{"system", "Be brief."}, {"user", "Two turns"}, {"assistant", "One"}, {"user", "and?"}, {"assistant", "Two"}}},
      {{{"user", corpus_lines()[3]}, {"assistant", corpus_lines()[7] + "\n" + corpus_lines()[8]}}},
  };
  for (const auto& conv : convs) {
    const auto want = data::tokenize_conversation(conv, tok, sft);
    const auto got = format.tokenize(conv, tok);
    CHECK(got.ids == want.ids);
    CHECK(got.labels == want.labels);
  }
}

TEST_CASE("a Jinja chat template marks each assistant reply and its closing markers as targets", "[data][sft][jinja]") {
  // A ChatML-style template (Qwen2's shape) over the test tokenizer: targets are the replies and the <|end|> that
  // closes each, nothing of the prompts.
  const auto& tok = tokenizer();
  const std::string src =
      "{% for m in messages %}{{ '<|User|>' if m.role == 'user' else '<|Assistant|>' }}{{ m.content }}<|end|>\n"
      "{% endfor %}{% if add_generation_prompt %}<|Assistant|>{% endif %}";
  data::ChatFormat format(src, "", "", "test template");
  const Conversation conv{{{"user", "Q one"}, {"assistant", "A one"}, {"user", "Q two"}, {"assistant", "A two"}}};
  const auto tc = format.tokenize(conv, tok);
  REQUIRE(tc.ids.size() == tc.labels.size());
  std::string trained;
  for (size_t i = 0; i + 1 < tc.ids.size(); ++i)
    if (tc.labels[i] != -100) trained += tok.decode({tc.labels[i]}) + "|";
  // Each reply's tokens, then its "<|end|>\n", are targets.
  std::string want;
  const auto whole = tok.encode(format.render(conv, false, tok));
  CHECK(tc.ids == whole);  // the render encoded at once
  // Targets: each reply's tokens and the <|end|> that closes it (then the newline shared with what follows).
  for (const std::string reply : {"A one", "A two"}) {
    for (int32_t id : tok.encode(reply + "<|end|>")) want += tok.decode({id}) + "|";
    want += tok.decode({tok.encode("\n").back()}) + "|";
  }
  CHECK(trained == want);
  // The ids are the whole render's pieces, with the generation prompt's text before each reply untrained.
  CHECK(tok.decode(tc.ids) == format.render(conv, false, tok));
  // A template that rewrites earlier turns cannot say what to train.
  data::ChatFormat rewriting("{% for m in messages %}{{ m.content if loop.last else '...' }}{% endfor %}", "", "",
                             "rewriting template");
  CHECK_THROWS_WITH(rewriting.tokenize(conv, tok), Catch::Contains("rewrites earlier turns"));
}

TEST_CASE("a chat template that recurses, loops or grows without end is an error naming its line", "[data][jinja]") {
  // Templates come from model directories and requests: each must end in an error, not a crash, minutes of CPU or
  // gigabytes of memory.
  const nlohmann::ordered_json ctx = {{"messages", nlohmann::ordered_json::array()}};
  auto fails = [&](const std::string& src, const std::string& why) {
    INFO(src);
    CHECK_THROWS_WITH(data::jinja::Template(src, "t").render(ctx), Catch::Contains(why));
  };
  fails("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "levels deep");
  fails("{% for i in range(100000000) %}x{% endfor %}", "range of 100000000 items");
  fails("{% for i in range(1000000) %}{% for j in range(1000000) %}{% endfor %}{% endfor %}", "20,000,000 steps");
  fails("{{ 'x' * 1000000000 }}", "more than the 64 MiB");
  fails("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "more than the 64 MiB");
  fails("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}", "nested more than 200 levels");
  fails("{{ " + std::string(5000, '-') + "1 }}", "nested more than 200 levels");
  std::string ifs;
  for (int i = 0; i < 1000; ++i) ifs += "{% if true %}";
  fails(ifs, "blocks nested more than 200 levels");
  // Names the line.
  fails("a\nb\n{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "t line 3");
  // What real templates do stays allowed: a few macro levels, loops over messages, a long text.
  CHECK(data::jinja::Template("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ n }}{% endif %}{% endmacro %}{{ f(50) }}", "t")
            .render(ctx)
            .size() > 50);
  CHECK(data::jinja::Template("{{ 'x' * 1000000 }}", "t").render(ctx).size() == 1000000);
}
