#include "data/corpus.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "data/text.h"
#include "utils/errors.h"
#include "utils/json.h"

namespace fs = std::filesystem;

namespace dsopen::data {

std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs, const CorpusOptions& options) {
  std::vector<std::string> files;
  std::set<std::string> seen;  // canonical paths
  auto add = [&](const fs::path& p) {
    std::error_code ec;
    const std::string canonical = fs::canonical(p, ec).string();
    if (ec) throw runtime_error(p.string(), "cannot resolve path: " + ec.message());
    if (seen.insert(canonical).second) files.push_back(p.string());
  };
  for (const auto& in : inputs) {
    std::error_code ec;
    if (!fs::exists(in, ec)) throw runtime_error(in, "input not found", "check the --input paths");
    if (!fs::is_directory(in)) {
      add(in);
      continue;
    }
    std::vector<fs::path> entries;
    for (const auto& e : fs::directory_iterator(in)) {
      if (!fs::is_regular_file(e.path())) continue;
      const std::string ext = e.path().extension().string();
      if (std::find(options.exclude_ext.begin(), options.exclude_ext.end(), ext) != options.exclude_ext.end()) continue;
      entries.push_back(e.path());
    }
    // Regular files before symlinks, so a link is the one dropped when both lead to the same file.
    std::sort(entries.begin(), entries.end(), [](const fs::path& a, const fs::path& b) {
      const bool la = fs::is_symlink(a), lb = fs::is_symlink(b);
      return la != lb ? lb : a < b;
    });
    for (const auto& p : entries) add(p);
  }
  return files;
}

DocumentReader::DocumentReader(std::vector<std::string> files, CorpusOptions options)
    : files_(std::move(files)), options_(std::move(options)), buf_(1 << 16) {
  if (files_.empty()) throw usage_error("--input", "no input files");
  if (options_.invalid_utf8 != "skip" && options_.invalid_utf8 != "fail")
    throw usage_error("--invalid-utf8", "'" + options_.invalid_utf8 + "' is not skip or fail");
}

DocumentReader::~DocumentReader() {
  if (file_) gzclose(file_);
}

bool DocumentReader::is_jsonl() const {
  const std::string name = current_.size() > 3 && current_.substr(current_.size() - 3) == ".gz"
                               ? current_.substr(0, current_.size() - 3)
                               : current_;
  return name.size() > 6 && name.substr(name.size() - 6) == ".jsonl";
}

bool DocumentReader::open_next_file() {
  if (file_) gzclose(file_), file_ = nullptr;
  if (next_file_ >= files_.size()) return false;
  current_ = files_[next_file_++];
  line_no_ = 0;
  file_ = gzopen(current_.c_str(), "rb");  // zlib reads plain files transparently
  if (!file_) throw runtime_error(current_, "cannot open input file");
  return true;
}

bool DocumentReader::next_line(std::string& line) {
  while (true) {
    if (!file_ && !open_next_file()) return false;
    line.clear();
    bool got = false;
    while (gzgets(file_, buf_.data(), static_cast<int>(buf_.size())) != nullptr) {
      got = true;
      line += buf_.data();
      if (!line.empty() && line.back() == '\n') break;
    }
    int err = 0;
    gzerror(file_, &err);
    if (err != Z_OK && err != Z_STREAM_END)
      throw runtime_error(current_ + ":" + std::to_string(line_no_ + 1), "read error (corrupt gzip?)");
    if (!got) {  // end of this file: the document in progress ends with it
      gzclose(file_);
      file_ = nullptr;
      line = "\x01EOF";
      return true;
    }
    ++line_no_;
    stats_.bytes += static_cast<int64_t>(line.size());
    if (!line.empty() && line.back() == '\n') line.pop_back();
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (options_.strip_ansi) line = strip_ansi(line);
    if (!is_valid_utf8(line)) {
      if (options_.invalid_utf8 == "fail")
        throw runtime_error(current_ + ":" + std::to_string(line_no_), "invalid UTF-8",
                            "fix the file or pass --invalid-utf8 skip");
      ++stats_.skipped_invalid_utf8;
      continue;
    }
    return true;
  }
}

bool DocumentReader::next(std::string& doc) {
  doc.clear();
  std::string line;
  while (next_line(line)) {
    const bool end_of_file = line == "\x01EOF";
    if (!end_of_file && is_jsonl()) {
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
      const std::string where = current_ + ":" + std::to_string(line_no_);
      nlohmann::json j;
      try {
        j = json::parse(line, where);
      } catch (const nlohmann::json::exception&) {
        throw runtime_error(where, "not valid JSON");
      }
      if (!j.is_object() || !j.contains(options_.jsonl_field) || !j[options_.jsonl_field].is_string())
        throw runtime_error(where, "missing string field \"" + options_.jsonl_field + "\"", "set --jsonl-field");
      doc = j[options_.jsonl_field].get<std::string>();
      if (doc.empty()) continue;
      ++stats_.documents;
      return true;
    }
    const std::string& sep = options_.doc_separator;
    const bool boundary = end_of_file || sep == "line" || (sep == "blank" ? line.empty() : line == sep);
    if (!boundary) {
      doc += doc.empty() ? line : "\n" + line;
      continue;
    }
    if (sep == "line" && !end_of_file) doc = line;
    if (doc.find_first_not_of(" \t\n") == std::string::npos) {
      doc.clear();
      continue;
    }
    ++stats_.documents;
    return true;
  }
  return false;
}

}  // namespace dsopen::data
