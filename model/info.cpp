#include "model/info.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "utils/config.h"
#include "utils/errors.h"

namespace dsopen::model {

TrainingMemory training_memory_per_rank(int64_t params, int64_t world_size, int64_t routed_params,
                                        int64_t expert_parallel, int64_t largest_unit) {
  const double E = static_cast<double>(std::max<int64_t>(expert_parallel, 1));
  const double R = static_cast<double>(expert_parallel > 1 ? routed_params : 0);
  const double D = static_cast<double>(params) - R, N = static_cast<double>(world_size);
  // Replicated D over N ranks; the rank's R/E experts over their N/E replicas.
  const auto zero = [&](double held, double ranks) {
    return TrainingMemory{16.0 * held, 8.0 * held + 8.0 * held / ranks, 4.0 * held + 12.0 * held / ranks, 0.0};
  };
  const TrainingMemory d = zero(D, N), r = zero(R / E, std::max(N / E, 1.0));
  // zero3: D over N ranks and R/E over N/E replicas both come to 1/N of the model.
  const double zero3 = 16.0 * static_cast<double>(params) / N + 16.0 * static_cast<double>(largest_unit);
  return {d.ddp + r.ddp, d.zero1 + r.zero1, d.zero2 + r.zero2, zero3};
}

double all_to_all_bytes_per_token(const ModelConfig& c, int64_t expert_parallel, int64_t bytes_per_element) {
  if (expert_parallel <= 1 || c.n_routed_experts == 0) return 0;
  int64_t blocks = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) blocks += c.is_moe_layer(l) ? 1 : 0;
  if (c.use_mtp && c.is_moe_layer(std::max(c.num_hidden_layers, c.first_k_dense_replace))) blocks += c.mtp_depth();
  const double E = static_cast<double>(expert_parallel);
  // 4 exchanges: dispatch and combine in forward, their gradients in backward.
  return 4.0 * static_cast<double>(blocks * c.num_experts_per_tok * c.hidden_size * bytes_per_element) * (E - 1) / E;
}

TrainingPlan plan_training(const ModelConfig& c, const TrainingPlanInput& in) {
  const ParamCounts counts = count_parameters(c);
  const double E = static_cast<double>(std::max<int64_t>(in.expert_parallel, 1));
  const double R = static_cast<double>(counts.routed) * (E > 1 ? 1.0 : 0.0);  // sharded by expert parallelism
  const double P = static_cast<double>(counts.total) - R + R / E;              // parameters this rank holds
  const double N = static_cast<double>(std::max<int64_t>(in.world_size, 1));
  // Trainable: replicated ones shard over N ranks, this rank's experts over their N/E replicas.
  const double T = in.trainable_params >= 0 ? static_cast<double>(in.trainable_params) : P - R / E;
  const double TE = in.trainable_params >= 0 ? 0.0 : R / E;
  const double replicas = std::max(N / E, 1.0);
  TrainingPlan plan;
  plan.weights = 4.0 * P;
  plan.grads = 4.0 * (T / (in.zero_stage >= 2 ? N : 1.0) + TE / (in.zero_stage >= 2 ? replicas : 1.0));
  if (in.zero_stage >= 3) {
    // Every parameter sharded (a LoRA run's frozen base too); two units whole at a time (projections in the
    // compute dtype: a decoder layer's bytes; the head and embedding stay fp32), and up to two units' fp32
    // gradients in their reduce-scatters. Planned at the larger of a layer in the compute dtype and fp32 head.
    const double U = static_cast<double>(counts.largest_unit);
    const double head = static_cast<double>(std::max(counts.embedding, c.vocab_size * c.hidden_size));
    plan.gathered_unit = std::max(static_cast<double>(counts.largest_layer) * static_cast<double>(in.activation_bytes), 4.0 * head);
    plan.weights = 4.0 * static_cast<double>(counts.total) / N + 2.0 * plan.gathered_unit;  // 1/N, experts included
    if (T + TE > 0) plan.grads += 8.0 * U;
  }
  const double moments = 8.0 * (T / (in.zero_stage >= 1 ? N : 1.0) + TE / (in.zero_stage >= 1 ? replicas : 1.0));
  if (in.offload_optimizer) plan.optimizer_host = moments * 1.5;  // + the fp32 master copy of the shard
  else plan.optimizer = moments;

  const double s = static_cast<double>(in.seq_len), b = static_cast<double>(in.micro_batch_size);
  const double h = static_cast<double>(c.hidden_size), a = static_cast<double>(c.num_attention_heads);
  const double half = static_cast<double>(in.activation_bytes) / 2.0;
  double mlp_width = static_cast<double>(c.intermediate_size);
  if (c.n_routed_experts > 0) {
    const double shared = c.arch().shared == SharedExperts::kGated ? static_cast<double>(c.shared_expert_intermediate_size)
                                                                   : static_cast<double>(c.n_shared_experts * c.moe_intermediate_size);
    mlp_width = static_cast<double>(c.num_experts_per_tok * c.moe_intermediate_size) + shared;
  }
  const double per_layer = (s * b * (15.0 * h + 19.0 * mlp_width / 4.0) + 5.0 * a * s * s * b) * half;
  const double layers = static_cast<double>(c.num_hidden_layers + c.mtp_depth());
  const double logits = s * b * static_cast<double>(c.vocab_size) * 4.0 * 2.0;  // fp32 logits and their gradient
  plan.activations = (in.activation_checkpointing ? layers * s * b * h * 2.0 * half + per_layer : layers * per_layer) + logits;
  return plan;
}

nlohmann::json model_info_json(const ModelConfig& c, int64_t world_size, int64_t seq_len, int64_t expert_parallel) {
  const ParamCounts p = count_parameters(c);
  const TrainingMemory m = training_memory_per_rank(p.total, world_size, p.routed, expert_parallel, p.largest_unit);
  const double held = static_cast<double>(p.total - p.routed) + static_cast<double>(p.routed) / static_cast<double>(expert_parallel);
  return {{"model_type", c.model_type},
          {"total_params", p.total},
          {"active_params", p.active},
          {"embedding_params", p.embedding},
          {"mtp_params", c.use_mtp ? p.mtp : 0},
          {"seq_len", seq_len},
          {"flops_per_token", training_flops_per_token(c, seq_len)},
          {"kv_cache_bytes_per_token", kv_cache_bytes_per_token(c, 2)},
          {"world_size", world_size},
          {"routed_expert_params", p.routed},
          {"expert_parallel", expert_parallel},
          {"params_per_rank", held},
          {"all_to_all_bytes_per_token", all_to_all_bytes_per_token(c, expert_parallel, 2)},
          {"largest_unit_params", p.largest_unit},
          {"train_memory_bytes_per_rank", {{"ddp", m.ddp}, {"zero1", m.zero1}, {"zero2", m.zero2}, {"zero3", m.zero3}}}};
}

namespace {
std::string human(double v, const char* unit = "") {
  const char* suffix[] = {"", "K", "M", "B", "T"};
  int i = 0;
  while (v >= 1000.0 && i < 4) v /= 1000.0, ++i;
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f%s%s", v, suffix[i], unit);
  return buf;
}
std::string gib(double bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return buf;
}
}  // namespace

std::string model_info_text(const ModelConfig& c, int64_t world_size, int64_t seq_len, int64_t expert_parallel) {
  const ParamCounts p = count_parameters(c);
  const TrainingMemory m = training_memory_per_rank(p.total, world_size, p.routed, expert_parallel, p.largest_unit);
  std::string s;
  s += "architecture          " + c.model_type + (c.is_mla() ? " (MLA" : " (MHA/GQA") +
       (c.n_routed_experts > 0 ? ", MoE)" : ", dense)") + "\n";
  s += "total parameters      " + human(p.total) + " (" + std::to_string(p.total) + ")\n";
  s += "active parameters     " + human(p.active) + " per token (without the input embedding)\n";
  if (c.num_nextn_predict_layers > 0)
    s += "MTP parameters        " + human(p.mtp) + (c.use_mtp ? " (included)" : " (not included: use_mtp is off)") + "\n";
  s += "training FLOPs/token  " + human(training_flops_per_token(c, seq_len)) + " at seq_len " +
       std::to_string(seq_len) + "\n";
  s += "KV cache per token    " + std::to_string(kv_cache_bytes_per_token(c, 2)) + " bytes (bf16, all layers)\n";
  if (p.routed > 0) s += "routed experts        " + human(static_cast<double>(p.routed)) + " parameters\n";
  if (expert_parallel > 1) {
    const double E = static_cast<double>(expert_parallel);
    char label[32];
    std::snprintf(label, sizeof label, "%-22s", ("expert parallel " + std::to_string(expert_parallel)).c_str());
    s += label +
         human(static_cast<double>(p.total - p.routed) + static_cast<double>(p.routed) / E) + " parameters per rank (" +
         human(static_cast<double>(p.routed) / E) + " of them routed experts); all-to-all " +
         human(all_to_all_bytes_per_token(c, expert_parallel, 2), "B") + " per token per step (bf16 activations, uniform routing)\n";
  }
  s += "train memory per rank (weights + grads + AdamW in fp32, " + std::to_string(world_size) +
       (world_size == 1 ? " rank" : " ranks") +
       (expert_parallel > 1 ? ", expert parallel " + std::to_string(expert_parallel) : std::string()) + ")\n";
  s += "  ddp                 " + gib(m.ddp) + "\n";
  s += "  zero1               " + gib(m.zero1) + "\n";
  s += "  zero2               " + gib(m.zero2) + "\n";
  s += "  zero3               " + gib(m.zero3) + " (with two fp32 units of " + human(static_cast<double>(p.largest_unit)) +
         " parameters gathered and two reduced; --strategy zero3 plans a precision and the activations)\n";
  return s;
}

ModelConfig model_config_from_document(const config::Document& doc) {
  config::ErrorList errors;
  config::Reader root(doc, doc.root(), "", errors);
  ModelConfig c;
  if (!root.has("model") || doc.root()["model"].IsNull()) {
    errors.add(doc.origin("model"), "model", "missing required section (give flavor:, pretrained: or the keys)");
    errors.throw_if_any();
  }
  config::Reader section = root.child("model");
  if (section.has("pretrained")) {
    std::string dir;
    section.optional("pretrained", dir);
    c = ModelConfig::from_hf_json_file((std::filesystem::path(dir) / "config.json").string());
  }
  decode(section, c, /*strict=*/true);
  for (const char* name : config::kRunSections) root.accept(name);
  root.finish();  // a misspelled section would otherwise be ignored here and refused only by dsopen-train
  errors.throw_if_any();
  c.validate("model");
  return c;
}

int64_t seq_len_from_document(const config::Document& doc, int64_t fallback) {
  const YAML::Node data = doc.root()["data"];
  if (!data || !data.IsMap() || !data["seq_len"]) return fallback;
  config::ErrorList errors;
  config::Reader reader(doc, data, "data", errors);
  long long seq_len = fallback;
  reader.optional("seq_len", seq_len, config::at_least(1));
  errors.throw_if_any();
  return seq_len;
}

}  // namespace dsopen::model
