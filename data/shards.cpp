#include "data/shards.h"

#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "utils/env.h"
#include "utils/errors.h"
#include "utils/json.h"

namespace dsopen::data {

std::string shard_prefix(const std::string& path) {
  for (const char* ext : {".bin", ".idx"}) {
    const size_t n = std::strlen(ext);
    if (path.size() > n && path.compare(path.size() - n, n, ext) == 0) return path.substr(0, path.size() - n);
  }
  return path;
}

// ---------------------------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------------------------

ShardWriter::ShardWriter(std::string prefix, int64_t vocab_size, int32_t eos_id, std::string tokenizer_hash)
    : prefix_(std::move(prefix)) {
  header_.dtype = vocab_size < 65536 ? "uint16" : "uint32";
  header_.vocab_size = vocab_size;
  header_.eos_id = eos_id;
  header_.tokenizer_hash = std::move(tokenizer_hash);
  elem_size_ = vocab_size < 65536 ? 2 : 4;
  tmp_bin_ = prefix_ + ".bin.tmp." + std::to_string(::getpid());
  fd_ = ::open(tmp_bin_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd_ < 0) throw runtime_error(tmp_bin_, "cannot create shard file", "check the output directory exists and is writable");
}

ShardWriter::~ShardWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!published_) {
    ::unlink(tmp_bin_.c_str());
    if (!tmp_idx_.empty()) ::unlink(tmp_idx_.c_str());
  }
}

void ShardWriter::add_document(const std::vector<int32_t>& ids) {
  header_.doc_offsets.push_back(header_.tokens);
  auto put = [&](int64_t id) {
    if (id < 0 || id >= header_.vocab_size)
      throw runtime_error(prefix_, "token id " + std::to_string(id) + " outside the vocabulary");
    const uint32_t v = static_cast<uint32_t>(id);
    const char* p = reinterpret_cast<const char*>(&v);  // little-endian: the low bytes come first
    buffer_.insert(buffer_.end(), p, p + elem_size_);
  };
  for (int32_t id : ids) put(id);
  put(header_.eos_id);
  header_.tokens += static_cast<int64_t>(ids.size()) + 1;
  if (buffer_.size() >= (8u << 20)) flush();
}

void ShardWriter::flush() {
  size_t off = 0;
  while (off < buffer_.size()) {
    const ssize_t w = ::write(fd_, buffer_.data() + off, buffer_.size() - off);
    if (w <= 0) throw runtime_error(tmp_bin_, "write failed (disk full?)");
    off += static_cast<size_t>(w);
  }
  buffer_.clear();
}

void ShardWriter::seal() {
  flush();
  if (::fsync(fd_) != 0 || ::close(fd_) != 0) throw runtime_error(tmp_bin_, "fsync failed (disk full?)");
  fd_ = -1;
  nlohmann::json idx = {{"format", "dsopen-shard"},      {"version", 1},
                        {"dtype", header_.dtype},        {"tokens", header_.tokens},
                        {"documents", header_.doc_offsets.size()}, {"doc_offsets", header_.doc_offsets},
                        {"vocab_size", header_.vocab_size}, {"eos_id", header_.eos_id},
                        {"tokenizer_hash", header_.tokenizer_hash}};
  tmp_idx_ = prefix_ + ".idx.tmp." + std::to_string(::getpid());
  env::write_file_atomic(tmp_idx_, idx.dump() + "\n");
}

void ShardWriter::publish() {
  // The .bin goes into place first: an .idx never points at a missing or partial .bin.
  if (std::rename(tmp_bin_.c_str(), (prefix_ + ".bin").c_str()) != 0)
    throw runtime_error(prefix_ + ".bin", "rename into place failed");
  if (std::rename(tmp_idx_.c_str(), (prefix_ + ".idx").c_str()) != 0)
    throw runtime_error(prefix_ + ".idx", "rename into place failed");
  published_ = true;
}

void ShardWriter::finish() {
  seal();
  publish();
}

// ---------------------------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------------------------

ShardHeader read_shard_header(const std::string& idx_path) {
  if (::access(idx_path.c_str(), R_OK) != 0)
    throw runtime_error(idx_path, "shard index not found", "run dsopen-preprocess to build the shards");
  nlohmann::json j;
  try {
    j = json::parse(env::read_file(idx_path), idx_path);
  } catch (const nlohmann::json::exception& e) {
    throw runtime_error(idx_path, std::string("shard index is not valid JSON: ") + json::reason(e), "rebuild the shard");
  }
  ShardHeader h;
  try {
    if (j.value("format", "") != "dsopen-shard") throw std::runtime_error("not a dsopen shard index");
    h.dtype = j.at("dtype").get<std::string>();
    h.tokens = j.at("tokens").get<int64_t>();
    h.doc_offsets = j.at("doc_offsets").get<std::vector<int64_t>>();
    h.vocab_size = j.at("vocab_size").get<int64_t>();
    h.eos_id = j.at("eos_id").get<int32_t>();
    h.tokenizer_hash = j.at("tokenizer_hash").get<std::string>();
  } catch (const std::exception& e) {
    throw runtime_error(idx_path, std::string("bad shard index: ") + e.what(), "rebuild the shard with dsopen-preprocess");
  }
  if (h.dtype != "uint16" && h.dtype != "uint32")
    throw runtime_error(idx_path, "unknown dtype '" + h.dtype + "'", "rebuild the shard");
  if (h.tokens < 0 || h.vocab_size <= 0) throw runtime_error(idx_path, "negative token count or vocabulary size");
  if (h.eos_id < 0 || h.eos_id >= h.vocab_size)
    throw runtime_error(idx_path, "eos_id " + std::to_string(h.eos_id) + " outside the vocabulary (" +
                                      std::to_string(h.vocab_size) + ")", "rebuild the shard with dsopen-preprocess");
  // Documents start at 0, each after the previous one's first token, all before the end: a document table that runs
  // past the tokens (or backwards) would hand out samples that are not documents.
  for (size_t d = 0; d < h.doc_offsets.size(); ++d) {
    const int64_t at = h.doc_offsets[d];
    const bool ok = d == 0 ? at == 0 : at > h.doc_offsets[d - 1];
    if (!ok || at >= h.tokens)
      throw runtime_error(idx_path, "document " + std::to_string(d) + " starts at token " + std::to_string(at) +
                                        (at >= h.tokens ? ", past the shard's " + std::to_string(h.tokens) + " tokens"
                                                        : ", not after the previous document"),
                          "the index is corrupt; rebuild the shard with dsopen-preprocess");
  }
  return h;
}

MappedShard::MappedShard(const std::string& path) : prefix_(shard_prefix(path)) {
  header_ = read_shard_header(prefix_ + ".idx");
  const std::string bin = prefix_ + ".bin";
  const int fd = ::open(bin.c_str(), O_RDONLY);
  if (fd < 0) throw runtime_error(bin, "shard data file not found", "rebuild the shard with dsopen-preprocess");
  struct stat st{};
  ::fstat(fd, &st);
  const size_t elem = header_.dtype == "uint16" ? 2 : 4;
  const size_t expect = static_cast<size_t>(header_.tokens) * elem;
  if (static_cast<size_t>(st.st_size) != expect) {
    ::close(fd);
    throw runtime_error(bin, "size " + std::to_string(st.st_size) + " bytes disagrees with its index (" +
                                 std::to_string(header_.tokens) + " tokens = " + std::to_string(expect) + " bytes)",
                        "the shard is truncated or was overwritten; rebuild it with dsopen-preprocess");
  }
  bytes_ = expect;
  if (bytes_ > 0) {
    void* p = ::mmap(nullptr, bytes_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw runtime_error(bin, "mmap failed");
    }
    data_ = static_cast<const unsigned char*>(p);
  }
  ::close(fd);
  // Every id within the vocabulary, checked once at open (a memory-mapped pass) rather than when a bad sample is
  // drawn hours into a run.
  const int64_t vocab = header_.vocab_size;
  auto first_bad = [&](const auto* p) -> int64_t {
    for (int64_t i = 0; i < header_.tokens; ++i)
      if (static_cast<int64_t>(p[i]) >= vocab) return i;
    return -1;
  };
  const int64_t bad = header_.dtype == "uint16" ? first_bad(reinterpret_cast<const uint16_t*>(data_))
                                                : first_bad(reinterpret_cast<const uint32_t*>(data_));
  if (bad >= 0) {
    int64_t id = 0;
    if (header_.dtype == "uint16") id = reinterpret_cast<const uint16_t*>(data_)[bad];
    else id = reinterpret_cast<const uint32_t*>(data_)[bad];
    if (data_) ::munmap(const_cast<unsigned char*>(data_), bytes_);
    data_ = nullptr;
    throw runtime_error(bin, "token id " + std::to_string(id) + " at position " + std::to_string(bad) +
                                 " is outside the vocabulary (" + std::to_string(vocab) + ")",
                        "the shard is corrupt or from another tokenizer; rebuild it with dsopen-preprocess");
  }
}

MappedShard::~MappedShard() {
  if (data_) ::munmap(const_cast<unsigned char*>(data_), bytes_);
}

void MappedShard::read(int64_t offset, int64_t n, int64_t* out) const {
  if (offset < 0 || n < 0 || offset + n > header_.tokens)
    throw runtime_error(prefix_ + ".bin", "read past the end of the shard");
  const int64_t vocab = header_.vocab_size;
  auto check = [&](int64_t id, int64_t at) {
    if (id >= vocab)
      throw runtime_error(prefix_ + ".bin", "token id " + std::to_string(id) + " at offset " + std::to_string(at) +
                                               " >= vocab_size " + std::to_string(vocab),
                          "the shard is corrupt or from another tokenizer; rebuild it");
    return id;
  };
  if (header_.dtype == "uint16") {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(data_) + offset;
    for (int64_t i = 0; i < n; ++i) out[i] = check(p[i], offset + i);
  } else {
    const uint32_t* p = reinterpret_cast<const uint32_t*>(data_) + offset;
    for (int64_t i = 0; i < n; ++i) out[i] = check(p[i], offset + i);
  }
}

std::vector<std::string> expand_shards(const std::string& pattern) {
  std::vector<std::string> out;
  if (pattern.find_first_of("*?[") == std::string::npos) {
    out.push_back(shard_prefix(pattern));
    return out;
  }
  glob_t g{};
  const std::string pat = shard_prefix(pattern) + ".idx";
  if (::glob(pat.c_str(), 0, nullptr, &g) == 0)
    for (size_t i = 0; i < g.gl_pathc; ++i) out.push_back(shard_prefix(g.gl_pathv[i]));
  ::globfree(&g);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace dsopen::data
