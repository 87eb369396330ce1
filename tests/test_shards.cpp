// Token shards, preprocessing and the packed pretraining dataset: exact tokens, rank sharding, resume, and every
// bad input as a clear error with no half-written output.
#include <catch2/catch.hpp>

#include <unistd.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>

#include <nlohmann/json.hpp>

#include "data/dataset.h"
#include "data/shard_builder.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "tests/test_helpers.h"
#include "utils/errors.h"

using namespace dsopen;
using namespace dsopen::data;
using dsopen::testing::TempDir;
using dsopen::testing::error_of;
namespace fs = std::filesystem;

namespace {

// Writes documents of synthetic ids into one shard; returns the full token stream (with EOS = 2).
std::vector<int64_t> write_shard(const std::string& prefix, const std::vector<std::vector<int32_t>>& docs,
                                 const std::string& hash = "h1", int64_t vocab = 1000) {
  ShardWriter w(prefix, vocab, 2, hash);
  std::vector<int64_t> stream;
  for (const auto& d : docs) {
    w.add_document(d);
    stream.insert(stream.end(), d.begin(), d.end());
    stream.push_back(2);
  }
  w.finish();
  return stream;
}

std::vector<std::vector<int32_t>> synthetic_docs(int n, int seed) {
  std::vector<std::vector<int32_t>> docs;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> d;
    for (int k = 0; k < 5 + (i * 7 + seed) % 23; ++k) d.push_back(10 + (i * 31 + k * 17 + seed) % 900);
    docs.push_back(d);
  }
  return docs;
}

const SentencePieceTokenizer& tokenizer(int which) {
  static std::unique_ptr<SentencePieceTokenizer> toks[2];
  if (!toks[which]) {
    TempDir dir;
    SentencePieceTrainOptions o;
    o.inputs = {"/usr/share/games/fortunes/fortunes"};
    o.output = dir / "t.model";
    o.vocab_size = which == 0 ? 800 : 900;
    o.character_coverage = 0.999;
    SentencePieceTokenizer::train(o);
    toks[which] = SentencePieceTokenizer::load(o.output);
  }
  return *toks[which];
}

// A shard's token stream cut at every EOS and decoded: its documents, in order.
std::vector<std::string> decode_documents(const MappedShard& shard, const data::Tokenizer& tok) {
  std::vector<int64_t> all(shard.size());
  shard.read(0, shard.size(), all.data());
  std::vector<std::string> docs;
  std::vector<int32_t> cur;
  for (auto id : all) {
    if (id == tok.eos_id()) docs.push_back(tok.decode(cur)), cur.clear();
    else cur.push_back(static_cast<int32_t>(id));
  }
  return docs;
}

}  // namespace

TEST_CASE("shards -> dataset yield exactly the tokens written, in order, across shard boundaries", "[data][shards]") {
  TempDir dir;
  auto a = write_shard(dir / "s_00000", synthetic_docs(30, 1));
  auto b = write_shard(dir / "s_00001", synthetic_docs(20, 2));
  std::vector<int64_t> stream = a;
  stream.insert(stream.end(), b.begin(), b.end());
  TokenDatasetOptions o;
  o.shards = {dir / "s_*.bin"};
  o.seq_len = 16;
  TokenDataset ds(o, Split::All);
  CHECK(ds.total_tokens() == static_cast<int64_t>(stream.size()));
  REQUIRE(ds.num_samples() == (static_cast<int64_t>(stream.size()) - 1) / 16);
  for (int64_t i = 0; i < ds.num_samples(); ++i) {
    auto t = ds.sample_tokens(i);
    REQUIRE(std::equal(t.begin(), t.end(), stream.begin() + i * 16));
  }
  auto batch = ds.make_batch({3});
  CHECK(batch.input_ids[0][0].item<int64_t>() == stream[48]);
  CHECK(batch.labels[0][15].item<int64_t>() == stream[64]);  // targets are the inputs shifted by one
  auto idx = read_shard_header(dir / "s_00000.idx");
  CHECK(idx.dtype == "uint16");
  CHECK(idx.doc_offsets.size() == 30);
}

TEST_CASE("two and three ranks: disjoint samples whose union is the epoch", "[data][shards]") {
  TempDir dir;
  write_shard(dir / "s_00000", synthetic_docs(200, 3));
  for (int world : {2, 3}) {
    std::set<int64_t> seen;
    int64_t total = 0, per_rank = 0;
    for (int r = 0; r < world; ++r) {
      TokenDatasetOptions o;
      o.shards = {dir / "s_00000"};
      o.seq_len = 8;
      o.rank = r;
      o.world_size = world;
      TokenDataset ds(o, Split::All);
      auto order = ds.rank_order(4);
      per_rank = ds.samples_per_rank();
      total = ds.num_samples();
      for (auto s : order) CHECK(seen.insert(s).second);  // never shared
    }
    CHECK(static_cast<int64_t>(seen.size()) == per_rank * world);
    CHECK(total - static_cast<int64_t>(seen.size()) < world);  // only the uneven tail is dropped
  }
}

TEST_CASE("resume from a saved cursor gives the batches of the uninterrupted run", "[data][shards]") {
  TempDir dir;
  write_shard(dir / "s_00000", synthetic_docs(60, 4));
  TokenDatasetOptions o;
  o.shards = {dir / "s_00000"};
  o.seq_len = 8;
  TokenDataset ds(o, Split::All);
  const int64_t steps = ds.samples_per_rank() / 3 * 2 + 5;  // crosses an epoch boundary
  DataCursor straight;
  std::vector<torch::Tensor> expected;
  for (int64_t i = 0; i < steps; ++i) expected.push_back(ds.next(straight, 3).input_ids);
  CHECK(straight.epoch >= 1);

  DataCursor first;
  for (int64_t i = 0; i < steps / 2; ++i) ds.next(first, 3);
  DataCursor saved = first;  // what a checkpoint stores
  TokenDataset resumed(o, Split::All);  // a new process
  for (int64_t i = steps / 2; i < steps; ++i) CHECK(torch::equal(resumed.next(saved, 3).input_ids, expected[i]));
  // Different epochs visit samples in different orders; the same epoch always in the same one.
  CHECK(ds.rank_order(0) != ds.rank_order(1));
  CHECK(ds.rank_order(1) == resumed.rank_order(1));
}

TEST_CASE("validation split holds out the last samples", "[data][shards]") {
  TempDir dir;
  write_shard(dir / "s_00000", synthetic_docs(100, 5));
  TokenDatasetOptions o;
  o.shards = {dir / "s_00000"};
  o.seq_len = 8;
  o.valid_fraction = 0.1;
  TokenDataset train(o, Split::Train), valid(o, Split::Valid), all(o, Split::All);
  CHECK(train.num_samples() + valid.num_samples() == all.num_samples());
  CHECK(valid.num_samples() == all.num_samples() / 10);
  CHECK(valid.sample_tokens(0) == all.sample_tokens(train.num_samples()));
}

TEST_CASE("bad shards: truncated, id out of vocabulary, too short, mixed tokenizers, vocab mismatch, missing",
          "[data][shards]") {
  TempDir dir;
  write_shard(dir / "a_00000", synthetic_docs(20, 6));
  fs::resize_file(dir / "a_00000.bin", fs::file_size(dir / "a_00000.bin") - 2);
  CHECK(error_of([&] { MappedShard s(dir / "a_00000"); }).find(dir / "a_00000.bin: size") == 0);
  CHECK(error_of([&] { MappedShard s(dir / "a_00000"); }).find("disagrees with its index") != std::string::npos);

  write_shard(dir / "b_00000", synthetic_docs(20, 7));
  {
    std::fstream f(dir / "b_00000.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(6);
    const unsigned char big[2] = {0xff, 0xff};
    f.write(reinterpret_cast<const char*>(big), 2);
  }
  TokenDatasetOptions o;
  o.shards = {dir / "b_00000"};
  o.seq_len = 8;
  // Found when the shard is opened, not when the sample is drawn.
  CHECK(error_of([&] { TokenDataset bad(o, Split::All); })
            .find(dir / "b_00000.bin: token id 65535 at position 3 is outside the vocabulary (1000)") == 0);

  // A document table that runs past the tokens, or backwards, is refused at open too.
  write_shard(dir / "d_00000", synthetic_docs(20, 6));
  {
    auto j = nlohmann::json::parse(std::ifstream(dir / "d_00000.idx"));
    j["doc_offsets"].back() = j["tokens"].get<int64_t>() + 5;
    std::ofstream(dir / "d_00000.idx") << j.dump();
  }
  CHECK(error_of([&] { MappedShard s(dir / "d_00000"); }).find("past the shard's") != std::string::npos);
  {
    auto j = nlohmann::json::parse(std::ifstream(dir / "d_00000.idx"));
    j["doc_offsets"].back() = 0;
    std::ofstream(dir / "d_00000.idx") << j.dump();
  }
  CHECK(error_of([&] { MappedShard s(dir / "d_00000"); }).find("not after the previous document") != std::string::npos);

  write_shard(dir / "e_00000", synthetic_docs(20, 7));
  o.shards = {dir / "e_00000"};
  o.seq_len = 100000;
  CHECK(error_of([&] { TokenDataset ds(o, Split::All); }).find("lower data.seq_len") != std::string::npos);

  write_shard(dir / "c_00000", synthetic_docs(20, 8), "h1");
  write_shard(dir / "c_00001", synthetic_docs(20, 9), "h2");
  o.shards = {dir / "c_*"};
  o.seq_len = 8;
  CHECK(error_of([&] { TokenDataset ds(o, Split::All); }).find("shards from two different tokenizers") != std::string::npos);

  o.shards = {dir / "c_00000"};
  o.model_vocab_size = 500;
  CHECK(error_of([&] { TokenDataset ds(o, Split::All); }).find("larger than the model's vocab_size (500)") != std::string::npos);
  o.model_vocab_size = 0;
  o.tokenizer_hash = "other";
  CHECK(error_of([&] { TokenDataset ds(o, Split::All); }).find("differs from the run's tokenizer") != std::string::npos);

  o.shards = {dir / "missing_00000"};
  CHECK(error_of([&] { TokenDataset ds(o, Split::All); }).find(dir / "missing_00000.idx: shard index not found") == 0);
  o.shards = {dir / "nothing_*"};
  CHECK(error_of([&] { TokenDataset ds(o, Split::All); }).find("no shards match") != std::string::npos);
}

TEST_CASE("preprocess: separators, ANSI stripping, gzip and JSONL inputs round-trip through the shards",
          "[data][preprocess]") {
  TempDir dir;
  std::ofstream(dir / "f.txt") << "first fortune\nline two\n%\n\x1b[33msecond\x1b[m one\n%\nthird\n";
  {
    gzFile gz = gzopen((dir / "g.txt.gz").c_str(), "wb");
    const std::string text = "zipped doc\n%\nanother zipped\n";
    gzwrite(gz, text.data(), static_cast<unsigned>(text.size()));
    gzclose(gz);
  }
  std::ofstream(dir / "j.jsonl") << "{\"body\": \"json doc one\"}\n\n{\"body\": \"json doc two\"}\n";
  std::ofstream(dir / "skip.dat") << "binary index, never read";
  PreprocessOptions o;
  o.inputs = {dir / "f.txt", dir / "g.txt.gz", dir / "j.jsonl"};
  o.output = dir / "out/train";
  o.corpus.doc_separator = "%";
  o.corpus.strip_ansi = true;
  o.corpus.jsonl_field = "body";
  const auto& tok = tokenizer(0);
  auto stats = build_shards(o, tok);
  CHECK(stats.documents == 7);
  REQUIRE(stats.shards == 1);
  // Decode the stream back, document by document.
  MappedShard shard(stats.shard_prefixes[0]);
  const auto docs = decode_documents(shard, tok);
  CHECK(docs == std::vector<std::string>{"first fortune\nline two", "second one", "third", "zipped doc",
                                         "another zipped", "json doc one", "json doc two"});
  CHECK(shard.header().tokenizer_hash == tok.hash());

  // Appending with the same tokenizer continues the numbering; another tokenizer is refused.
  auto again = build_shards(o, tok);
  CHECK(again.shard_prefixes[0] == dir / "out/train_00001");
  CHECK(error_of([&] { build_shards(o, tokenizer(1)); }).find("existing shard was made by another tokenizer") !=
        std::string::npos);

  // Directories: .dat files are skipped, symlinks to files already listed are read once.
  fs::create_symlink(dir / "f.txt", dir / "f.txt.u8");
  std::ofstream(dir / "j.jsonl", std::ios::trunc);  // empty it: directory mode reads only .txt here
  PreprocessOptions d = o;
  d.inputs = {dir.path.string()};
  TempDir elsewhere;  // an output inside the input directory is refused (it would be read back as input)
  d.output = elsewhere / "dirout/train";
  PreprocessOptions inside = d;
  inside.output = dir / "dirout/train";
  CHECK(error_of([&] { build_shards(inside, tok); })
            .find("--output: " + (dir / "dirout/train") + " is inside the input directory") == 0);
  d.corpus.exclude_ext = {".dat", ".jsonl", ".gz"};
  CHECK(build_shards(d, tok).documents == 3);
}

TEST_CASE("preprocess removes the temporaries of a killed run, not those of a live one", "[data][preprocess]") {
  TempDir dir;
  std::ofstream(dir / "a.txt") << "one\ntwo\n";
  fs::create_directories(dir / "out");
  const std::string dead = dir / "out/train_00000.bin.tmp.2147483646";  // beyond any pid_max: no such process
  const std::string live = dir / "out/train_00000.bin.tmp.1";            // init runs in every container
  const std::string other = dir / "out/other_00000.bin.tmp.2147483646";  // another prefix: not ours to remove
  for (const auto& f : {dead, live, other}) std::ofstream(f) << "partial";
  PreprocessOptions o;
  o.inputs = {dir / "a.txt"};
  o.output = dir / "out/train";
  build_shards(o, tokenizer(0));
  CHECK_FALSE(fs::exists(dead));
  CHECK(fs::exists(live));
  CHECK(fs::exists(other));
  CHECK(fs::exists(dir / "out/train_00000.bin"));
}

TEST_CASE("preprocess keeps text verbatim into the shards, a literal U+2581 included", "[data][preprocess]") {
  TempDir dir;
  const std::vector<std::string> docs = {"x\u2581y", "\u2581\u2581a b", "  two spaces\u2581 and\ttab", "\u2581"};
  {
    std::ofstream f(dir / "m.txt");
    for (size_t i = 0; i < docs.size(); ++i) f << (i ? "\n%\n" : "") << docs[i];
    f << "\n";
  }
  PreprocessOptions o;
  o.inputs = {dir / "m.txt"};
  o.output = dir / "out/train";
  o.corpus.doc_separator = "%";
  const auto& tok = tokenizer(0);
  auto stats = build_shards(o, tok);
  CHECK(decode_documents(MappedShard(stats.shard_prefixes[0]), tok) == docs);
}

TEST_CASE("preprocess bad input: file:line errors, counted skips, no half-written output", "[data][preprocess]") {
  TempDir dir;
  const auto& tok = tokenizer(0);
  PreprocessOptions o;
  o.output = dir / "out/x";
  auto no_output = [&] {  // a failed run removes the directory it created, too
    if (!fs::exists(dir / "out")) return true;
    for (auto& e : fs::directory_iterator(dir / "out"))
      if (e.path().extension() == ".bin" || e.path().extension() == ".idx") return false;
    return true;
  };

  std::ofstream(dir / "bad.jsonl") << "{\"text\": \"ok\"}\n{not json\n";
  o.inputs = {dir / "bad.jsonl"};
  CHECK(error_of([&] { build_shards(o, tok); }) == dir / "bad.jsonl" + ":2: not valid JSON");
  CHECK(no_output());
  CHECK_FALSE(fs::exists(dir / "out"));  // the directory this run created went with it
  std::ofstream(dir / "nofield.jsonl") << "{\"text\": \"ok\"}\n{\"other\": 1}\n";
  o.inputs = {dir / "nofield.jsonl"};
  CHECK(error_of([&] { build_shards(o, tok); }).find(dir / "nofield.jsonl" + ":2: missing string field \"text\"") == 0);
  CHECK(no_output());

  std::ofstream(dir / "utf.txt") << "good line\n\xff\xfe broken\nanother good\n";
  o.inputs = {dir / "utf.txt"};
  o.corpus.invalid_utf8 = "skip";
  auto s = build_shards(o, tok);
  CHECK(s.documents == 2);
  CHECK(s.skipped_invalid_utf8 == 1);
  o.output = dir / "out/y";
  o.corpus.invalid_utf8 = "fail";
  CHECK(error_of([&] { build_shards(o, tok); }).find(dir / "utf.txt" + ":2: invalid UTF-8") == 0);

  std::ofstream(dir / "empty.txt");
  o.inputs = {dir / "empty.txt"};
  CHECK(error_of([&] { build_shards(o, tok); }).find("no documents in the input") != std::string::npos);
  o.inputs = {dir / "absent.txt"};
  CHECK(error_of([&] { build_shards(o, tok); }).find("absent.txt: input not found") != std::string::npos);
  CHECK(!fs::exists(dir / "out/y_00000.bin"));
}
