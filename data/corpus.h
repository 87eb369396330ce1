// Reading raw text corpora as a stream of documents: .txt (documents separated by lines, blank lines, or a
// separator line such as the `%` of fortune files), .jsonl (one document per line in a configurable field), and
// gzip of either. Cleaning is by option, never by file name: escape stripping, invalid UTF-8 skip-or-fail.
#pragma once

#include <zlib.h>

#include <cstdint>
#include <string>
#include <vector>

namespace dsopen::data {

struct CorpusOptions {
  std::string doc_separator = "line";  // line | blank | any other text: a line equal to it ends a document
  std::string jsonl_field = "text";    // for .jsonl / .jsonl.gz inputs
  bool strip_ansi = false;             // remove terminal escape sequences
  std::string invalid_utf8 = "skip";   // skip (and count) | fail
  std::vector<std::string> exclude_ext = {".dat"};  // skipped when a directory is expanded
};

struct CorpusStats {
  int64_t documents = 0;
  int64_t bytes = 0;                  // raw bytes read
  int64_t skipped_invalid_utf8 = 0;   // lines dropped for invalid UTF-8
};

// Files named by `inputs`: files as given, directories expanded to their regular files (sorted, excluding
// `exclude_ext`). A file reached twice (a symlink to a listed file, e.g. fortune's .u8 links) is read once.
// A missing input is a runtime error naming it.
std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs, const CorpusOptions& options);

class DocumentReader {
public:
  DocumentReader(std::vector<std::string> files, CorpusOptions options);
  ~DocumentReader();
  DocumentReader(const DocumentReader&) = delete;
  DocumentReader& operator=(const DocumentReader&) = delete;

  // The next non-empty document; false at the end. Errors name file:line.
  bool next(std::string& document);
  const CorpusStats& stats() const { return stats_; }

private:
  bool next_line(std::string& line);  // across files; sets file_/line_no_
  bool open_next_file();
  bool is_jsonl() const;

  std::vector<std::string> files_;
  CorpusOptions options_;
  size_t next_file_ = 0;
  gzFile file_ = nullptr;
  std::string current_;
  int64_t line_no_ = 0;
  CorpusStats stats_;
  std::vector<char> buf_;
};

}  // namespace dsopen::data
