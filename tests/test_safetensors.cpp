// safetensors reading and writing: round trips, sharded directories, and every corruption a clear error naming
// the file — never an out-of-bounds read.
#include <catch2/catch.hpp>

#include <sys/resource.h>
#include <unistd.h>

#include <csignal>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "model/registry.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "tests/test_helpers.h"
#include "utils/env.h"
#include "utils/errors.h"

using namespace dsopen;
using namespace dsopen::model;
using dsopen::testing::TempDir;
using dsopen::testing::error_of;
namespace fs = std::filesystem;

namespace {

// A file with a hand-written header followed by `data_bytes` zero bytes.
std::string write_raw(const std::string& path, const std::string& header, size_t data_bytes) {
  std::ofstream f(path, std::ios::binary);
  const uint64_t len = header.size();
  f.write(reinterpret_cast<const char*>(&len), 8);
  f << header;
  f << std::string(data_bytes, '\0');
  return path;
}

}  // namespace

TEST_CASE("safetensors round trip keeps names, dtypes, shapes and values", "[model][safetensors]") {
  TempDir dir;
  std::map<std::string, torch::Tensor> t = {{"a", torch::randn({3, 4})},
                                            {"b", torch::randn({5}).to(torch::kBFloat16)},
                                            {"c", torch::arange(6, torch::kLong).view({2, 3})},
                                            {"d", torch::randn({2, 2}).to(torch::kFloat16)}};
  save_safetensors(dir / "x.safetensors", t, {{"format", "pt"}});
  SafetensorsFile f(dir / "x.safetensors");
  CHECK(f.names() == std::vector<std::string>{"a", "b", "c", "d"});
  for (auto& [name, v] : t) {
    CHECK(f.tensor(name).scalar_type() == v.scalar_type());
    CHECK(torch::equal(f.tensor(name), v));
  }
  CHECK(f.metadata().at("format") == "pt");
}

TEST_CASE("corrupt safetensors files are clear errors", "[model][safetensors]") {
  TempDir dir;
  auto expect = [&](const std::string& path, const std::string& what) {
    const std::string msg = error_of([&] { SafetensorsFile f(path); });
    INFO(msg);
    CHECK(msg.rfind(path + ": ", 0) == 0);  // names the file first
    CHECK(msg.find(what) != std::string::npos);
  };
  save_safetensors(dir / "ok.safetensors", {{"w", torch::randn({64, 64})}});
  fs::copy_file(dir / "ok.safetensors", dir / "trunc.safetensors");
  fs::resize_file(dir / "trunc.safetensors", fs::file_size(dir / "trunc.safetensors") - 100);
  expect(dir / "trunc.safetensors", "lie outside");
  write_raw(dir / "tiny.safetensors", "", 0);
  fs::resize_file(dir / "tiny.safetensors", 5);
  expect(dir / "tiny.safetensors", "shorter than the 8-byte header length");
  {
    std::ofstream f(dir / "hugeheader.safetensors", std::ios::binary);
    const uint64_t len = 1ull << 40;
    f.write(reinterpret_cast<const char*>(&len), 8);
    f << "{}";
  }
  expect(dir / "hugeheader.safetensors", "runs past the end of the file");
  expect(write_raw(dir / "json.safetensors", "{not json", 0), "not valid JSON");
  expect(write_raw(dir / "past.safetensors", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
         "lie outside");
  expect(write_raw(dir / "overlap.safetensors",
                   R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
         "overlap");
  expect(write_raw(dir / "dtype.safetensors", R"({"w":{"dtype":"F12","shape":[2],"data_offsets":[0,8]}})", 8),
         "unknown dtype 'F12'");
  expect(write_raw(dir / "span.safetensors", R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
         "differs from its byte range");
  expect(write_raw(dir / "neg.safetensors", R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
         "negative or non-integer dimension");
  expect(write_raw(dir / "gap.safetensors", R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 16),
         "tensors end at 8");
  // What every other reader refuses: bytes before the first tensor, a hole between two, a repeated name (whose
  // last copy a lenient reader would load: a norm of 2.0 instead of 1.0), a NUL byte in the header.
  expect(write_raw(dir / "lead.safetensors", R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
         "tensor 'w' starts at byte 4 but the bytes before it end at 0");
  expect(write_raw(dir / "hole.safetensors",
                   R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})", 16),
         "tensor 'b' starts at byte 12 but the bytes before it end at 8");
  expect(write_raw(dir / "dup.safetensors",
                   R"({"model.norm.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                   R"("model.norm.weight":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
         "duplicate key 'model.norm.weight'");
  expect(write_raw(dir / "nul.safetensors", std::string(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})") + '\0', 8),
         "a NUL byte");
  expect(write_raw(dir / "meta.safetensors", R"({"__metadata__":{"a":1},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
         "__metadata__ value 'a' is not a string");
  // ... and what they accept: zero-size tensors anywhere, dtypes LibTorch has no type for (refused only when read).
  write_raw(dir / "zero.safetensors",
            R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
            R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"f":{"dtype":"F4","shape":[4],"data_offsets":[8,10]}})", 10);
  SafetensorsFile zero(dir / "zero.safetensors");
  CHECK(zero.names().size() == 4);
  CHECK(zero.tensor("z").numel() == 0);
  CHECK(zero.dtype("f") == "F4");
  const std::string f4 = error_of([&] { zero.tensor("f"); });
  CHECK(f4.find("tensor 'f' has dtype F4, which LibTorch cannot hold") != std::string::npos);
}

TEST_CASE("an export that fails part-way (a full disk) leaves the earlier export as it was", "[model][safetensors]") {
  TempDir dir;
  ModelConfig c = *find_flavor("debug");
  c.use_mtp = false;
  torch::manual_seed(3);
  CausalLM a(c), b(c);
  const std::string out = dir / "export";
  save_hf_model(a, out, torch::kFloat32, 64 << 10);  // sharded fp32
  std::ofstream(out + "/README.md") << "kept\n";
  // A file-size limit stands in for a full disk: writes past 16 KiB fail with EFBIG.
  std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit old{};
  ::getrlimit(RLIMIT_FSIZE, &old);
  struct rlimit small = old;
  small.rlim_cur = 16 << 10;
  ::setrlimit(RLIMIT_FSIZE, &small);
  const std::string msg = error_of([&] { save_hf_model(b, out, torch::kBFloat16); });
  ::setrlimit(RLIMIT_FSIZE, &old);
  CHECK(!msg.empty());
  // The earlier export is whole: fp32 config, its shards and index, the user's file; no staging directory left.
  CHECK(env::read_file(out + "/config.json").find("\"torch_dtype\": \"float32\"") != std::string::npos);
  CHECK(fs::exists(out + "/model.safetensors.index.json"));
  CHECK_FALSE(fs::exists(out + "/model.safetensors"));
  CHECK(fs::exists(out + "/README.md"));
  for (auto& e : fs::directory_iterator(dir.path)) CHECK(e.path().filename().string().find(".partial-") == std::string::npos);
  CausalLM again(c);
  load_hf_state_dict(again, WeightFiles(out));
  CHECK(torch::equal(again->lm_head->weight, a->lm_head->weight));
  // A save that succeeds replaces the weights (the stale shards go) and keeps the user's file.
  save_hf_model(b, out, torch::kBFloat16);
  CHECK(fs::exists(out + "/model.safetensors"));
  CHECK_FALSE(fs::exists(out + "/model.safetensors.index.json"));
  CHECK(fs::exists(out + "/README.md"));
}

TEST_CASE("HF directories: sharded round trip, missing shard, shape mismatch with config", "[model][safetensors]") {
  TempDir dir;
  ModelConfig c = *find_flavor("debug");
  c.use_mtp = false;
  torch::manual_seed(3);
  CausalLM a(c);
  save_hf_model(a, dir / "sharded", torch::kFloat32, 64 << 10);  // small shards: several files and an index
  REQUIRE(fs::exists(dir / "sharded/model.safetensors.index.json"));
  CausalLM b(c);
  load_hf_state_dict(b, WeightFiles(dir / "sharded"));
  auto pa = a->named_parameters(), pb = b->named_parameters();
  for (auto& p : pa) CHECK(torch::equal(p.value(), pb[p.key()]));

  // bf16 on disk converts on load.
  save_hf_model(a, dir / "bf16", torch::kBFloat16);
  CHECK(SafetensorsFile(dir / "bf16/model.safetensors").tensor("lm_head.weight").scalar_type() == torch::kBFloat16);
  CausalLM from_bf16(c);
  load_hf_state_dict(from_bf16, WeightFiles(dir / "bf16"));
  CHECK((from_bf16->lm_head->weight - a->lm_head->weight).abs().max().item<double>() < 1e-2);

  // An index that names a shard the directory lacks.
  std::string shard;
  for (auto& e : fs::directory_iterator(dir / "sharded"))
    if (e.path().filename().string().rfind("model-00002", 0) == 0) shard = e.path().string();
  fs::remove(shard);
  auto msg = error_of([&] { WeightFiles w(dir / "sharded"); });
  CHECK(msg.find("model.safetensors.index.json: names shard 'model-00002") != std::string::npos);

  // Weights whose shapes disagree with the config: every problem listed with expected and found shapes.
  ModelConfig wider = c;
  wider.hidden_size = 96;
  CausalLM w(wider);
  msg = error_of([&] { load_hf_state_dict(w, WeightFiles(dir / "bf16")); });
  CHECK(msg.find("model.embed_tokens.weight: expected [256, 96], found [256, 64]") != std::string::npos);
  // Non-strict loading tolerates unexpected tensors but not missing ones.
  ModelConfig shallower = c;
  shallower.num_hidden_layers = 1;
  shallower.num_nextn_predict_layers = 0;  // so layer 1 of the file is not taken for an MTP layer
  CausalLM s(shallower);
  msg = error_of([&] { load_hf_state_dict(s, WeightFiles(dir / "bf16"), true); });
  CHECK(msg.find("unexpected model.layers.1.") != std::string::npos);
  CHECK_NOTHROW(load_hf_state_dict(s, WeightFiles(dir / "bf16"), false));
}
