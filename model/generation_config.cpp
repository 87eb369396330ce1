#include "model/generation_config.h"

#include <filesystem>

#include "utils/env.h"
#include "utils/errors.h"
#include "utils/json.h"

namespace fs = std::filesystem;

namespace dsopen::model {

namespace {

// Generation keys an older config.json may carry instead of a generation_config.json.
const char* const kLegacyKeys[] = {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens",
                                   "max_length", "num_beams", "no_repeat_ngram_size", "min_length"};

GenerationConfig decode_generation(const nlohmann::json& j, const std::string& file) {
  GenerationConfig g;
  g.source = file;
  g.json = j;
  auto bad = [&](const std::string& key, const std::string& what) {
    return usage_error(file, key + ": " + what, "fix or remove the key");
  };
  auto id = [&](const nlohmann::json& v, const std::string& key) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0) throw bad(key, "expected a token id (an integer >= 0), got " + v.dump());
    return v.get<int64_t>();
  };
  auto number = [&](const std::string& key, double& out, double lo, bool inclusive) {
    if (!j.contains(key) || j[key].is_null()) return;
    if (!j[key].is_number()) throw bad(key, "expected a number, got " + j[key].dump());
    out = j[key].get<double>();
    if (inclusive ? out < lo : out <= lo) throw bad(key, "must be " + std::string(inclusive ? ">= " : "> ") + std::to_string(lo));
  };
  if (j.contains("eos_token_id") && !j["eos_token_id"].is_null()) {
    std::vector<int64_t> ids;
    if (j["eos_token_id"].is_array())
      for (const auto& v : j["eos_token_id"]) ids.push_back(id(v, "eos_token_id"));
    else
      ids.push_back(id(j["eos_token_id"], "eos_token_id"));
    g.eos_token_id = ids;
  }
  if (j.contains("bos_token_id") && !j["bos_token_id"].is_null()) g.bos_token_id = id(j["bos_token_id"], "bos_token_id");
  if (j.contains("pad_token_id") && !j["pad_token_id"].is_null()) g.pad_token_id = id(j["pad_token_id"], "pad_token_id");
  if (j.contains("do_sample") && !j["do_sample"].is_null()) {
    if (!j["do_sample"].is_boolean()) throw bad("do_sample", "expected true or false, got " + j["do_sample"].dump());
    g.do_sample = j["do_sample"].get<bool>();
  }
  number("temperature", g.temperature, 0.0, true);
  number("top_p", g.top_p, 0.0, false);
  if (g.top_p > 1.0) throw bad("top_p", "must be <= 1");
  number("repetition_penalty", g.repetition_penalty, 0.0, false);
  if (j.contains("top_k") && !j["top_k"].is_null()) {
    if (!j["top_k"].is_number_integer() || j["top_k"].get<int64_t>() < 0) throw bad("top_k", "expected an integer >= 0");
    g.top_k = j["top_k"].get<int64_t>();
  }
  // Controls that would change the output: refused unless they hold their no-op value.
  const std::vector<std::pair<const char*, nlohmann::json>> unsupported = {
      {"num_beams", 1}, {"num_beam_groups", 1}, {"penalty_alpha", nullptr}, {"no_repeat_ngram_size", 0},
      {"encoder_no_repeat_ngram_size", 0}, {"bad_words_ids", nullptr}, {"suppress_tokens", nullptr},
      {"begin_suppress_tokens", nullptr}, {"forced_bos_token_id", nullptr}, {"forced_eos_token_id", nullptr},
      {"min_new_tokens", nullptr}, {"min_length", 0}, {"typical_p", 1.0}, {"min_p", nullptr}, {"epsilon_cutoff", 0.0},
      {"eta_cutoff", 0.0}, {"diversity_penalty", 0.0}, {"encoder_repetition_penalty", 1.0}, {"guidance_scale", nullptr},
      {"sequence_bias", nullptr}, {"exponential_decay_length_penalty", nullptr}, {"constraints", nullptr},
      {"force_words_ids", nullptr}, {"watermarking_config", nullptr}};
  for (const auto& [key, noop] : unsupported) {
    if (!j.contains(key)) continue;
    const auto& v = j[key];
    const bool inert = v.is_null() || v == noop || ((v.is_array() || v.is_object()) && v.empty()) ||
                       (v.is_number() && noop.is_number() && v.get<double>() == noop.get<double>());
    if (!inert)
      throw usage_error(file, std::string(key) + ": " + v.dump() + " is not supported by dsopen's generation",
                        "remove the key or set it to " + (noop.is_null() ? std::string("null") : noop.dump()));
  }
  if (j.contains("stop_strings") && !j["stop_strings"].is_null()) {
    const auto& v = j["stop_strings"];
    if (v.is_string()) g.stop_strings.push_back(v.get<std::string>());
    else if (v.is_array())
      for (const auto& s : v) {
        if (!s.is_string() || s.get<std::string>().empty()) throw bad("stop_strings", "expected non-empty strings, got " + s.dump());
        g.stop_strings.push_back(s.get<std::string>());
      }
    else throw bad("stop_strings", "expected a string or a list of strings");
  }
  if (j.contains("max_length") && !j["max_length"].is_null()) {
    if (!j["max_length"].is_number_integer() || j["max_length"].get<int64_t>() < 1)
      throw bad("max_length", "expected an integer >= 1");
    g.max_length = j["max_length"].get<int64_t>();
  }
  if (j.contains("max_new_tokens") && !j["max_new_tokens"].is_null()) {
    if (!j["max_new_tokens"].is_number_integer() || j["max_new_tokens"].get<int64_t>() < 1)
      throw bad("max_new_tokens", "expected an integer >= 1");
    g.max_new_tokens = j["max_new_tokens"].get<int64_t>();
  }
  return g;
}

nlohmann::json read_object(const std::string& path) {
  nlohmann::json j;
  try {
    j = json::parse(env::read_file(path), path);
  } catch (const nlohmann::json::exception& e) {
    throw runtime_error(path, std::string("not valid JSON: ") + json::reason(e));
  }
  if (!j.is_object()) throw runtime_error(path, "expected a JSON object");
  return j;
}

}  // namespace

std::optional<GenerationConfig> read_generation_config(const std::string& dir) {
  const auto file = (fs::path(dir) / "generation_config.json").string();
  if (fs::exists(file)) return decode_generation(read_object(file), file);
  const auto config = (fs::path(dir) / "config.json").string();
  if (!fs::exists(config)) return std::nullopt;
  const nlohmann::json j = read_object(config);
  nlohmann::json legacy = nlohmann::json::object();
  for (const char* k : kLegacyKeys)
    if (j.contains(k)) legacy[k] = j[k];
  if (legacy.empty()) return std::nullopt;
  return decode_generation(legacy, config);
}

nlohmann::json default_generation_json(const ModelConfig& c) {
  nlohmann::json j = {{"do_sample", true}, {"temperature", 0.8}, {"top_k", 50}, {"top_p", 0.95},
                      {"repetition_penalty", 1.1}};
  j["bos_token_id"] = c.bos_token_id >= 0 ? nlohmann::json(c.bos_token_id) : nlohmann::json(nullptr);
  if (c.eos_token_id.size() == 1) j["eos_token_id"] = c.eos_token_id.front();
  else if (!c.eos_token_id.empty()) j["eos_token_id"] = c.eos_token_id;
  if (c.pad_token_id >= 0) j["pad_token_id"] = c.pad_token_id;
  return j;
}

}  // namespace dsopen::model
