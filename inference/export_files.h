// What an exported model directory (dsopen-convert, dsopen-quantize) carries besides its weights and config.json,
// so that transformers users get the same behaviour as dsopen's tools: the tokenizer files (with
// tokenizer_config.json, special_tokens_map.json and the chat template, data/hf_tokenizer_files.h) and
// generation_config.json.
#pragma once

#include <map>
#include <string>

#include "model/model_dir.h"

namespace dsopen::inference {

// File name -> contents. The tokenizer is the source's (or the adapter's when the source has none); the chat
// template is the one the adapter's run (else the source's run) trained with; generation_config.json is the source's
// (end-of-text lists kept) or, without one, the model's token ids with dsopen-generate's sampling defaults.
std::map<std::string, std::string> export_companion_files(const model::ModelDir& source, const model::ModelConfig& config,
                                                          const std::string& adapter = "");

}  // namespace dsopen::inference
