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

// Bytes per rank of parameters + gradients + AdamW state for P parameters on N ranks, as dsopen-train holds them
// (fp32 weights, fp32 gradients, fp32 first and second moments; bf16 runs autocast from the fp32 weights):
// ddp 16P; zero1 (moments sharded) 8P + 8P/N; zero2 (gradients too) 4P + 12P/N; zero3 (weights too) 16P/N plus,
// for the largest unit of U parameters, two units gathered (8U in fp32) and two units' gradients being
// reduce-scattered (8U).
// Expert parallelism over E ranks (of N) divides the R routed-expert parameters by E first: they are held by E
// ranks and replicated N/E times, so their ZeRO sharding spans N/E ranks (R/E/(N/E) = R/N per rank).
struct TrainingMemory {
  double ddp, zero1, zero2, zero3;
};
TrainingMemory training_memory_per_rank(int64_t params, int64_t world_size, int64_t routed_params = 0,
                                        int64_t expert_parallel = 1, int64_t largest_unit = 0);

// Bytes one token moves through the expert all-to-alls per training step (forward dispatch and combine, and the
// same again in backward) over all MoE blocks, with `bytes_per_element` activations (2: bf16) and uniform routing:
// of its K expert copies, (E-1)/E leave the rank. 0 without expert parallelism.
double all_to_all_bytes_per_token(const ModelConfig& c, int64_t expert_parallel, int64_t bytes_per_element);

// What one rank of a training job holds, in bytes, before anything is allocated.
struct TrainingPlanInput {
  int64_t world_size = 1;
  int zero_stage = 0;              // 0: ddp (or one rank), 1: moments sharded, 2: gradients too, 3: weights too
  bool offload_optimizer = false;  // moments (and an fp32 master copy) in host memory
  int64_t micro_batch_size = 1;
  int64_t seq_len = 4096;
  bool activation_checkpointing = false;
  int64_t activation_bytes = 4;    // 4: fp32, 2: bf16/fp16 autocast
  int64_t trainable_params = -1;   // -1: every parameter (LoRA: the adapters only)
  int64_t expert_parallel = 1;     // E: each rank holds 1/E of the routed experts
};
struct TrainingPlan {
  // zero3: weights are the fp32 slices plus two gathered units (fp32), gradients the slices plus two units being
  // reduced; gathered_unit is one unit's gathered bytes.
  double weights = 0, grads = 0, optimizer = 0, activations = 0, gathered_unit = 0;
  double optimizer_host = 0;  // offloaded moments + master copy (host memory)
  double device_total() const { return weights + grads + optimizer + activations; }
};
// Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
// §4.1: 34·s·b·h + 5·a·s²·b two-byte units per layer for a 4h-wide MLP), with the MLP's 19·s·b·h scaled to the
// width I' a token goes through (dense, or K experts + shared): s·b·(15h + 19·I'/4) + 5·a·s²·b, times bytes/2.
// Checkpointing keeps each layer's input plus one layer's activations; the fp32 logits and their gradient are
// added. An estimate (allocator slack and library workspaces come on top).
TrainingPlan plan_training(const ModelConfig& c, const TrainingPlanInput& in);

nlohmann::json model_info_json(const ModelConfig& c, int64_t world_size, int64_t seq_len, int64_t expert_parallel = 1);
std::string model_info_text(const ModelConfig& c, int64_t world_size, int64_t seq_len, int64_t expert_parallel = 1);

// The model config a run config describes: its `model:` section (flavor, explicit keys, or `pretrained: DIR`
// whose config.json is read first and may be overridden by the other keys). Validated.
ModelConfig model_config_from_document(const config::Document& doc);

// `data.seq_len` of a run config (the sequence length tools plan with), or `fallback` when absent; a config error
// naming file, line and key when it is not a positive integer.
int64_t seq_len_from_document(const config::Document& doc, int64_t fallback);

}  // namespace dsopen::model
