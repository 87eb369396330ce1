// Attention: MHA/GQA (DeepSeek-LLM, Llama, Qwen, GLM, Mixtral) and MLA (multi-head latent attention, DeepSeek-V2/V3), each with a
// KV cache for incremental decoding.
//
// MLA (DeepSeek-V2 paper §2.1): queries optionally go through a low-rank bottleneck (q_a_proj -> norm ->
// q_b_proj); keys and values are compressed into a kv_lora_rank latent c (kv_a_proj_with_mqa -> kv_a_layernorm)
// and expanded per head by kv_b_proj; a decoupled rope key k_pe (qk_rope_head_dim) is shared by all heads.
// Training uses the expanded form (SDPA over per-head K/V). Decoding caches only (c, k_pe) per token and uses the
// absorbed form: q_nope is multiplied into kv_b_proj's key half so scores are taken against c directly, and
// the value half is applied after attention — kv_lora_rank + qk_rope_head_dim numbers per token and layer.
#pragma once

#include <torch/torch.h>

#include "model/config.h"
#include "model/layers.h"

namespace dsopen::model {

// Cache of one layer. MHA/GQA: a = K, b = V, each [B, n_kv_heads, capacity, head_dim].
// MLA: a = normalized latent c [B, capacity, kv_lora_rank], b = rope key k_pe [B, capacity, qk_rope_head_dim].
struct LayerKVCache {
  torch::Tensor a, b;
};

// Positions of the current chunk: queries cover [start, start + T); with a cache the keys cover [0, start + T).
struct AttentionInput {
  torch::Tensor cos, sin;  // [T, rope_dim/2], or [B, T, rope_dim/2] when positions differ per sequence
  // bool [B, 1, T, S], true where a query may attend a key: packed documents (S = T) or padded batches decoding
  // with a cache (S = start + T). Undefined: plain causal attention.
  torch::Tensor mask;
  int64_t start = 0;
  LayerKVCache* cache = nullptr;  // null: no cache (training / full forward)
  // Defined (int64 [B]): one token per row, written into cache row b at index rows_at[b] (rows of different
  // lengths, continuous batching); the keys then cover [0, keys) and `mask` says which of them each row sees.
  torch::Tensor rows_at{};
  int64_t keys = 0;
};

// Additive causal mask [T, start + T] for a chunk that starts at `start` (0 where key <= query position).
torch::Tensor causal_mask(int64_t T, int64_t start, const torch::TensorOptions& options);

// MHA/GQA: q/k/v projections (biased per the architecture), optional per-head q/k RMSNorm (Qwen3) before rope,
// rope on the first rope_dim dimensions of each head in the architecture's layout, SDPA, o_proj.
class AttentionImpl : public torch::nn::Module {
public:
  explicit AttentionImpl(const ModelConfig& c);
  torch::Tensor forward(const torch::Tensor& x, const AttentionInput& in);  // x: [B, T, hidden]
  void init_cache(LayerKVCache& cache, int64_t batch, int64_t capacity, const torch::TensorOptions& opts) const;

  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  RMSNorm q_norm{nullptr}, k_norm{nullptr};  // qk_norm architectures only

private:
  int64_t n_heads_, n_kv_heads_, head_dim_, rope_dim_;
  RopeLayout rope_layout_;
  double scale_;
};
TORCH_MODULE(Attention);

class MLAImpl : public torch::nn::Module {
public:
  explicit MLAImpl(const ModelConfig& c);
  // Without a cache: expanded formulation. With a cache: appends (c, k_pe) and attends in absorbed form.
  torch::Tensor forward(const torch::Tensor& x, const AttentionInput& in);
  void init_cache(LayerKVCache& cache, int64_t batch, int64_t capacity, const torch::TensorOptions& opts) const;
  // The absorbed formulation over an explicit latent/rope-key history (exposed for tests):
  // q_nope [B,T,H,nope], q_pe [B,T,H,rope], latent [B,S,kv_lora], k_pe [B,S,rope] -> [B,T,H*v_head_dim];
  // `mask` (bool [B,1,T,S], true = may attend) replaces the causal mask when given.
  torch::Tensor attend_absorbed(const torch::Tensor& q_nope, const torch::Tensor& q_pe, const torch::Tensor& latent,
                                const torch::Tensor& k_pe, int64_t start, const torch::Tensor& mask = {});

  // Present when q_lora_rank > 0: q_a_proj, q_a_layernorm, q_b_proj; otherwise q_proj.
  Linear q_proj{nullptr}, q_a_proj{nullptr}, q_b_proj{nullptr};
  RMSNorm q_a_layernorm{nullptr};
  Linear kv_a_proj_with_mqa{nullptr}, kv_b_proj{nullptr}, o_proj{nullptr};
  RMSNorm kv_a_layernorm{nullptr};

private:
  // attend_absorbed with kv_b_proj's weight given ([H * (nope + v), kv_lora]: merged, or a served adapter's).
  torch::Tensor attend_absorbed_with(const torch::Tensor& kv_b_weight, const torch::Tensor& q_nope,
                                     const torch::Tensor& q_pe, const torch::Tensor& latent, const torch::Tensor& k_pe,
                                     int64_t start, const torch::Tensor& mask);

  // Queries split into the no-rope and (rotated) rope parts: [B, T, H, nope], [B, T, H, rope].
  std::pair<torch::Tensor, torch::Tensor> queries(const torch::Tensor& x, const AttentionInput& in);

  // The rope part's layout: DeepSeek's interleaved pairs (2i, 2i+1), or rotate-half (i, i + rope/2) when
  // the checkpoint's config says rope_interleave: false.
  torch::Tensor rope(const torch::Tensor& x, const AttentionInput& in) const;

  int64_t n_heads_, q_lora_rank_, kv_lora_rank_, nope_dim_, rope_dim_, v_dim_;
  bool rope_interleave_;
  double scale_;
};
TORCH_MODULE(MLA);

}  // namespace dsopen::model
