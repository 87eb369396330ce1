#include "data/shard_builder.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "data/shards.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/progress.h"

namespace fs = std::filesystem;

namespace dsopen::data {

namespace {
std::string shard_name(const std::string& prefix, int64_t index) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "_%05lld", static_cast<long long>(index));
  return prefix + buf;
}

// Temporaries of a run that was killed (`PREFIX_00003.bin.tmp.PID` whose PID no longer runs) go before a new run.
void remove_stale_temporaries(const std::string& prefix) {
  const fs::path p(prefix);
  const fs::path dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
  const std::string stem = p.filename().string() + "_";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    const auto tmp = name.rfind(".tmp.");
    if (name.rfind(stem, 0) != 0 || tmp == std::string::npos) continue;
    const std::string pid_text = name.substr(tmp + 5);
    if (pid_text.empty() || pid_text.find_first_not_of("0123456789") != std::string::npos) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(pid_text));
    if (pid != ::getpid() && ::kill(pid, 0) != 0 && errno == ESRCH) fs::remove(e.path(), ec);
  }
}

// The index the next shard gets: after the existing ones, which must share our tokenizer.
int64_t first_free_index(const std::string& prefix, const Tokenizer& tok) {
  int64_t next = 0;
  for (const auto& existing : expand_shards(prefix + "_*.bin")) {
    const ShardHeader h = read_shard_header(existing + ".idx");
    if (h.tokenizer_hash != tok.hash())
      throw runtime_error(existing + ".idx",
                          "existing shard was made by another tokenizer (" + h.tokenizer_hash + ", this one is " +
                              tok.hash() + ")",
                          "write to a new --output prefix or delete the old shards");
    const std::string tail = existing.substr(prefix.size() + 1);
    next = std::max<int64_t>(next, std::stoll(tail) + 1);
  }
  return next;
}

// Reads every input and writes the shards; none is visible until all are durable.
PreprocessStats write_shards(const PreprocessOptions& o, const Tokenizer& tok) {
  const auto files = expand_inputs(o.inputs, o.corpus);
  DocumentReader reader(files, o.corpus);
  remove_stale_temporaries(o.output);
  int64_t index = first_free_index(o.output, tok);

  PreprocessStats stats;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t total_bytes = 0;
  for (const auto& f : files) total_bytes += static_cast<int64_t>(fs::file_size(f));
  Progress progress("preprocess", total_bytes, "B");

  std::unique_ptr<ShardWriter> writer;
  std::vector<std::unique_ptr<ShardWriter>> done;  // finished only when all input was read without error
  std::vector<std::string> chunk;
  std::string doc;
  bool more = true;
  while (more) {
    chunk.clear();
    while (static_cast<int64_t>(chunk.size()) < o.chunk_documents && (more = reader.next(doc))) chunk.push_back(doc);
    const auto encoded = tok.encode_batch(chunk, o.threads);
    for (const auto& ids : encoded) {
      if (writer && writer->tokens() + static_cast<int64_t>(ids.size()) + 1 > o.shard_tokens && writer->tokens() > 0) {
        done.push_back(std::move(writer));
      }
      if (!writer) {
        const std::string name = shard_name(o.output, index++);
        writer = std::make_unique<ShardWriter>(name, tok.vocab_size(), tok.eos_id(), tok.hash());
        stats.shard_prefixes.push_back(name);
      }
      writer->add_document(ids);
      stats.tokens += static_cast<int64_t>(ids.size()) + 1;
    }
    progress.update(reader.stats().bytes);
  }
  if (reader.stats().documents == 0)
    throw runtime_error(files.front(), "no documents in the input", "check the files and --doc-separator");
  if (writer) done.push_back(std::move(writer));
  for (auto& w : done) w->seal();  // all durable before any is visible: a failure leaves no partial set
  for (auto& w : done) w->publish();
  progress.finish();
  stats.documents = reader.stats().documents;
  stats.bytes = reader.stats().bytes;
  stats.skipped_invalid_utf8 = reader.stats().skipped_invalid_utf8;
  stats.shards = static_cast<int64_t>(done.size());
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return stats;
}

}  // namespace

PreprocessStats build_shards(const PreprocessOptions& o, const Tokenizer& tok) {
  if (o.output.empty()) throw usage_error(o.output_name, "missing output prefix");
  if (o.shard_tokens < 1) throw usage_error("--shard-tokens", "must be >= 1");
  // Documents are separated by the end-of-text token: without one the shards could not say where a document ends.
  if (tok.eos_id() < 0)
    throw runtime_error(tok.source(), "the tokenizer has no end-of-text token, which separates documents in shards",
                        "put the model's tokenizer_config.json (its eos_token) next to tokenizer.json");
  env::check_output_path(o.output, env::OutputKind::Prefix, o.inputs, o.output_name);
  // Directories this run creates go again when it fails (only while empty: nothing of anyone else's is removed).
  std::vector<fs::path> made;
  std::error_code ec;
  for (fs::path d = fs::path(o.output).parent_path(); !d.empty() && !fs::exists(d, ec); d = d.parent_path())
    made.push_back(d);
  if (!made.empty()) fs::create_directories(made.front());
  try {
    return write_shards(o, tok);
  } catch (...) {
    for (const auto& d : made) fs::remove(d, ec);
    throw;
  }
}

}  // namespace dsopen::data
