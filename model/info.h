// Model facts for planning: parameter counts, training FLOPs per token, KV-cache size, and the memory that
// mixed-precision AdamW training needs per rank under ddp / zero1 / zero2 (ZeRO paper accounting;
// docs/ARCHITECTURE.md "Data parallelism").
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "model/config.h"

namespace dsopen::config {
class Document;
}

namespace dsopen::model {

// Bytes per rank of parameters + gradients + optimizer state for P parameters on N ranks:
// ddp 16P (2 bf16 weights + 2 bf16 grads + 12 fp32 master/m/v); zero1 4P + 12P/N; zero2 2P + 14P/N.
struct TrainingMemory {
  double ddp, zero1, zero2;
};
TrainingMemory training_memory_per_rank(int64_t params, int64_t world_size);

nlohmann::json model_info_json(const ModelConfig& c, int64_t world_size, int64_t seq_len);
std::string model_info_text(const ModelConfig& c, int64_t world_size, int64_t seq_len);

// The model config a run config describes: its `model:` section (flavor, explicit keys, or `pretrained: DIR`
// whose config.json is read first and may be overridden by the other keys). Validated.
ModelConfig model_config_from_document(const config::Document& doc);

// `data.seq_len` of a run config (the sequence length tools plan with), or `fallback` when absent; a config error
// naming file, line and key when it is not a positive integer.
int64_t seq_len_from_document(const config::Document& doc, int64_t fallback);

}  // namespace dsopen::model
