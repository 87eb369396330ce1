// Token shards (docs/CHECKPOINTS.md "Token shards"): `name.bin` holds token ids back to back (uint16 when the vocabulary has fewer than
// 65536 entries, else uint32), documents separated by the EOS id; `name.idx` is a JSON header with the dtype,
// token count, document start offsets, vocabulary size, EOS id and the tokenizer's hash. Shards are written to
// temporary files and renamed, so a reader never sees half a shard; a reader memory-maps the .bin and checks its
// size against the index before trusting a single offset.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dsopen::data {

struct ShardHeader {
  std::string dtype;  // "uint16" | "uint32"
  int64_t tokens = 0;
  std::vector<int64_t> doc_offsets;  // start of each document
  int64_t vocab_size = 0;
  int32_t eos_id = -1;
  std::string tokenizer_hash;
};

// "x.bin" / "x.idx" / "x" -> "x" (the prefix both files share).
std::string shard_prefix(const std::string& path);

// Writes one shard; nothing is visible at `prefix`.bin/.idx until finish() renames the finished files in place.
class ShardWriter {
public:
  ShardWriter(std::string prefix, int64_t vocab_size, int32_t eos_id, std::string tokenizer_hash);
  ~ShardWriter();  // removes the temporary files unless published
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // Appends a document followed by EOS.
  void add_document(const std::vector<int32_t>& ids);
  int64_t tokens() const { return header_.tokens; }
  // seal() makes the shard durable in temporary files (the step that can fail: a full disk); publish() renames them
  // into place. A set of shards is sealed whole before any is published, so a failure publishes none.
  void seal();
  void publish();
  void finish();  // seal() + publish()

private:
  std::string prefix_, tmp_bin_, tmp_idx_;
  bool published_ = false;
  ShardHeader header_;
  int elem_size_;
  int fd_ = -1;
  std::vector<char> buffer_;
  void flush();
};

// A read-only, memory-mapped shard.
class MappedShard {
public:
  // Opens `path` (.bin, .idx or the prefix) and validates it whole in one pass over the mapping. Runtime errors name
  // the file: missing, unreadable index, a document table that is not increasing or runs past the tokens, an EOS
  // outside the vocabulary, a .bin whose size disagrees with the index (truncated or overwritten), or the first
  // token id outside the vocabulary (with its position).
  explicit MappedShard(const std::string& path);
  ~MappedShard();
  MappedShard(const MappedShard&) = delete;
  MappedShard& operator=(const MappedShard&) = delete;

  const ShardHeader& header() const { return header_; }
  const std::string& prefix() const { return prefix_; }
  int64_t size() const { return header_.tokens; }
  // Copies tokens [offset, offset + n) into `out` as int64; throws when an id is >= vocab_size.
  void read(int64_t offset, int64_t n, int64_t* out) const;

private:
  std::string prefix_;
  ShardHeader header_;
  const unsigned char* data_ = nullptr;
  size_t bytes_ = 0;
};

ShardHeader read_shard_header(const std::string& idx_path);

// Shards matching `pattern`: an exact path/prefix, or a glob such as runs/tiny/data/train_*.bin. Sorted.
std::vector<std::string> expand_shards(const std::string& pattern);

}  // namespace dsopen::data
