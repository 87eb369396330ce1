#include "model/attention.h"

#include "model/lora.h"

#include <cmath>

namespace dsopen::model {

torch::Tensor causal_mask(int64_t T, int64_t start, const torch::TensorOptions& options) {
  // Query i sits at position start + i and may see keys 0 .. start + i.
  auto q_pos = torch::arange(start, start + T, options.dtype(torch::kLong)).unsqueeze(1);
  auto k_pos = torch::arange(0, start + T, options.dtype(torch::kLong)).unsqueeze(0);
  auto mask = torch::zeros({T, start + T}, options);
  return mask.masked_fill(k_pos > q_pos, -std::numeric_limits<float>::infinity());
}

namespace {
// Writes `chunk` into `buffer` at [start, start + len) along `dim` and returns the filled prefix [0, start + len).
torch::Tensor append(torch::Tensor& buffer, const torch::Tensor& chunk, int64_t dim, int64_t start) {
  const int64_t len = chunk.size(dim);
  TORCH_CHECK(start + len <= buffer.size(dim), "KV cache full: ", start + len, " positions > capacity ",
              buffer.size(dim));
  buffer.narrow(dim, start, len).copy_(chunk);
  return buffer.narrow(dim, 0, start + len);
}

// Writes `chunk` (one position per row along `dim`, rows along dim 0) into each row's own index of `buffer`, and
// returns the first `keys` positions of every row. The cache of one layer is written and read in place.
torch::Tensor append_rows(torch::Tensor& buffer, const torch::Tensor& chunk, int64_t dim, const AttentionInput& in) {
  using torch::indexing::Slice;
  TORCH_CHECK(chunk.size(dim) == 1, "per-row cache append takes one position per row, got ", chunk.size(dim));
  TORCH_CHECK(in.keys <= buffer.size(dim), "KV cache full: ", in.keys, " positions > capacity ", buffer.size(dim));
  const auto rows = torch::arange(buffer.size(0), in.rows_at.options());
  if (dim == 1) buffer.index_put_({rows, in.rows_at}, chunk.squeeze(1));               // [B, cap, d]
  else buffer.index_put_({rows, Slice(), in.rows_at}, chunk.squeeze(dim));              // [B, heads, cap, d]
  return buffer.narrow(dim, 0, in.keys);
}

torch::Tensor append(torch::Tensor& buffer, const torch::Tensor& chunk, int64_t dim, const AttentionInput& in) {
  return in.rows_at.defined() ? append_rows(buffer, chunk, dim, in) : append(buffer, chunk, dim, in.start);
}
}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// MHA / GQA
// ---------------------------------------------------------------------------------------------------------------

AttentionImpl::AttentionImpl(const ModelConfig& c)
    : n_heads_(c.num_attention_heads), n_kv_heads_(c.num_key_value_heads), head_dim_(c.attn_head_dim()),
      rope_dim_(c.rope_dim()), rope_layout_(c.arch().rope_layout),
      scale_(1.0 / std::sqrt(static_cast<double>(c.attn_head_dim()))) {  // no YaRN mscale: only MLA has it
  const bool qkv_bias = c.qkv_bias();
  q_proj = register_module("q_proj", linear(c.hidden_size, n_heads_ * head_dim_, qkv_bias));
  k_proj = register_module("k_proj", linear(c.hidden_size, n_kv_heads_ * head_dim_, qkv_bias));
  v_proj = register_module("v_proj", linear(c.hidden_size, n_kv_heads_ * head_dim_, qkv_bias));
  o_proj = register_module("o_proj", linear(n_heads_ * head_dim_, c.hidden_size, c.o_bias()));
  if (c.arch().qk_norm) {
    q_norm = register_module("q_norm", RMSNorm(head_dim_, c.rms_norm_eps));
    k_norm = register_module("k_norm", RMSNorm(head_dim_, c.rms_norm_eps));
  }
}

void AttentionImpl::init_cache(LayerKVCache& cache, int64_t batch, int64_t capacity,
                               const torch::TensorOptions& opts) const {
  cache.a = torch::zeros({batch, n_kv_heads_, capacity, head_dim_}, opts);
  cache.b = torch::zeros({batch, n_kv_heads_, capacity, head_dim_}, opts);
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const AttentionInput& in) {
  const int64_t B = x.size(0), T = x.size(1);
  auto q = q_proj(x).view({B, T, n_heads_, head_dim_});
  auto k = k_proj(x).view({B, T, n_kv_heads_, head_dim_});
  if (q_norm) q = q_norm(q), k = k_norm(k);  // per head, over head_dim
  q = apply_rope(q, in.cos, in.sin, rope_layout_, rope_dim_).transpose(1, 2);  // [B, H, T, d]
  k = apply_rope(k, in.cos, in.sin, rope_layout_, rope_dim_).transpose(1, 2);  // [B, KV, T, d]
  auto v = v_proj(x).view({B, T, n_kv_heads_, head_dim_}).transpose(1, 2);  // [B, KV, T, d]
  if (in.cache) {
    k = append(in.cache->a, k.to(in.cache->a.scalar_type()), 2, in).to(q.scalar_type());
    v = append(in.cache->b, v.to(in.cache->b.scalar_type()), 2, in).to(q.scalar_type());
  }
  if (n_kv_heads_ != n_heads_) {  // GQA: each KV head serves n_heads / n_kv_heads query heads
    k = k.repeat_interleave(n_heads_ / n_kv_heads_, 1);
    v = v.repeat_interleave(n_heads_ / n_kv_heads_, 1);
  }
  torch::Tensor out;
  if (in.mask.defined()) {
    out = at::scaled_dot_product_attention(q, k, v, in.mask, 0.0, false, scale_);
  } else if (in.start == 0 || T == 1) {
    // A single query sees every cached key, so it needs no mask at all.
    out = at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/T > 1, scale_);
  } else {
    out = at::scaled_dot_product_attention(q, k, v, causal_mask(T, in.start, q.options()), 0.0, false, scale_);
  }
  return o_proj(out.transpose(1, 2).reshape({B, T, n_heads_ * head_dim_}));  // [B, T, hidden]
}

// ---------------------------------------------------------------------------------------------------------------
// MLA
// ---------------------------------------------------------------------------------------------------------------

MLAImpl::MLAImpl(const ModelConfig& c)
    : n_heads_(c.num_attention_heads), q_lora_rank_(c.q_lora_rank), kv_lora_rank_(c.kv_lora_rank),
      nope_dim_(c.qk_nope_head_dim), rope_dim_(c.qk_rope_head_dim), v_dim_(c.v_head_dim),
      rope_interleave_(c.rope_interleave), scale_(attention_softmax_scale(c.qk_head_dim(), c.rope_scaling)) {
  const int64_t h = c.hidden_size, qk = c.qk_head_dim();
  if (q_lora_rank_ > 0) {
    q_a_proj = register_module("q_a_proj", linear(h, q_lora_rank_));
    q_a_layernorm = register_module("q_a_layernorm", RMSNorm(q_lora_rank_, c.rms_norm_eps));
    q_b_proj = register_module("q_b_proj", linear(q_lora_rank_, n_heads_ * qk));
  } else {
    q_proj = register_module("q_proj", linear(h, n_heads_ * qk));
  }
  kv_a_proj_with_mqa = register_module("kv_a_proj_with_mqa", linear(h, kv_lora_rank_ + rope_dim_));
  kv_a_layernorm = register_module("kv_a_layernorm", RMSNorm(kv_lora_rank_, c.rms_norm_eps));
  kv_b_proj = register_module("kv_b_proj", linear(kv_lora_rank_, n_heads_ * (nope_dim_ + v_dim_)));
  o_proj = register_module("o_proj", linear(n_heads_ * v_dim_, h));
}

void MLAImpl::init_cache(LayerKVCache& cache, int64_t batch, int64_t capacity, const torch::TensorOptions& opts) const {
  cache.a = torch::zeros({batch, capacity, kv_lora_rank_}, opts);
  cache.b = torch::zeros({batch, capacity, rope_dim_}, opts);
}

torch::Tensor MLAImpl::rope(const torch::Tensor& x, const AttentionInput& in) const {
  return rope_interleave_ ? apply_rope_interleaved(x, in.cos, in.sin) : apply_rope_half(x, in.cos, in.sin);
}

std::pair<torch::Tensor, torch::Tensor> MLAImpl::queries(const torch::Tensor& x, const AttentionInput& in) {
  const int64_t B = x.size(0), T = x.size(1);
  auto q = q_lora_rank_ > 0 ? q_b_proj(q_a_layernorm(q_a_proj(x))) : q_proj(x);
  // split, not two narrows: the backward of a narrow materialises a zero gradient of the whole input.
  auto parts = q.view({B, T, n_heads_, nope_dim_ + rope_dim_}).split_with_sizes({nope_dim_, rope_dim_}, -1);
  auto q_pe = rope(parts[1], in);  // [B, T, H, rope]
  return {parts[0], q_pe};                                        // q_nope [B, T, H, nope]
}

torch::Tensor MLAImpl::attend_absorbed(const torch::Tensor& q_nope, const torch::Tensor& q_pe,
                                       const torch::Tensor& latent, const torch::Tensor& k_pe, int64_t start,
                                       const torch::Tensor& mask) {
  // Served adapters on kv_b_proj (model/lora.h): each adapter's rows attend with its own folded weight.
  const auto* rows = ServedAdapterRows::current();
  if (!rows || !kv_b_proj->serves(*rows)) return attend_absorbed_with(kv_b_proj->merged_weight(), q_nope, q_pe, latent, k_pe, start, mask);
  const auto groups = ServedAdapterRows::groups(*rows);
  if (groups.size() == 1)
    return attend_absorbed_with(kv_b_proj->served_weight(groups[0].first), q_nope, q_pe, latent, k_pe, start, mask);
  torch::Tensor out;
  for (const auto& [id, pick] : groups) {
    const auto index = torch::tensor(pick, torch::kLong).to(q_nope.device());
    auto part = attend_absorbed_with(kv_b_proj->served_weight(id), q_nope.index_select(0, index), q_pe.index_select(0, index),
                                     latent.index_select(0, index), k_pe.index_select(0, index), start,
                                     mask.defined() ? mask.index_select(0, index) : mask);
    if (!out.defined()) out = torch::empty({q_nope.size(0), part.size(1), part.size(2)}, part.options());
    out.index_copy_(0, index, part);
  }
  return out;
}

torch::Tensor MLAImpl::attend_absorbed_with(const torch::Tensor& kv_b_weight, const torch::Tensor& q_nope,
                                            const torch::Tensor& q_pe, const torch::Tensor& latent,
                                            const torch::Tensor& k_pe, int64_t start, const torch::Tensor& mask) {
  const int64_t B = q_nope.size(0), T = q_nope.size(1), H = n_heads_, C = kv_lora_rank_;
  // kv_b_proj.weight: [H * (nope + v), kv_lora] -> per head [H, nope + v, kv_lora] (with its LoRA adapter folded in).
  auto dtype = latent.scalar_type();
  auto w = kv_b_weight.view({H, nope_dim_ + v_dim_, C}).to(dtype);
  auto w_k = w.narrow(1, 0, nope_dim_), w_v = w.narrow(1, nope_dim_, v_dim_);
  // Batched matmuls rather than einsum: decoding runs this once per layer and token, where einsum's planning and
  // permutes were a third of the step on small models. Queries of all heads share the latent, so heads and
  // positions fold into one row dimension against it.
  auto q_abs = torch::bmm(q_nope.to(dtype).permute({2, 0, 1, 3}).reshape({H, B * T, nope_dim_}), w_k)  // [H, B*T, C]
                   .view({H, B, T, C})
                   .permute({1, 2, 0, 3})
                   .reshape({B, T * H, C});
  auto scores = torch::baddbmm(torch::bmm(q_pe.to(dtype).reshape({B, T * H, rope_dim_}), k_pe.transpose(1, 2)), q_abs,
                               latent.transpose(1, 2))
                    .view({B, T, H, -1});  // [B, T, H, S]
  scores = scores.to(torch::kFloat32) * scale_;
  if (mask.defined()) {
    scores = scores.masked_fill(mask.logical_not().permute({0, 2, 1, 3}), -std::numeric_limits<float>::infinity());
  } else if (T > 1) {
    scores = scores + causal_mask(T, start, scores.options()).unsqueeze(1);  // [T, 1, S]
  }
  auto probs = scores.softmax(-1).to(dtype);
  auto ctx = torch::bmm(probs.view({B, T * H, -1}), latent);                                      // [B, T*H, C]
  auto out = torch::bmm(ctx.view({B * T, H, C}).transpose(0, 1), w_v.transpose(1, 2));          // [H, B*T, v]
  out = out.transpose(0, 1);                                                                      // [B*T, H, v]
  return out.reshape({B, T, n_heads_ * v_dim_});
}

torch::Tensor MLAImpl::forward(const torch::Tensor& x, const AttentionInput& in) {
  const int64_t B = x.size(0), T = x.size(1);
  auto [q_nope, q_pe] = queries(x, in);
  auto kv = kv_a_proj_with_mqa(x).split_with_sizes({kv_lora_rank_, rope_dim_}, -1);  // [B, T, kv_lora | rope]
  auto latent = kv_a_layernorm(kv[0]);                                                 // [B, T, kv_lora]
  auto k_pe = rope(kv[1].unsqueeze(2), in).squeeze(2);  // [B, T, rope]
  if (in.cache) {
    auto all_latent = append(in.cache->a, latent.to(in.cache->a.scalar_type()), 1, in);
    auto all_pe = append(in.cache->b, k_pe.to(in.cache->b.scalar_type()), 1, in);
    auto out = attend_absorbed(q_nope, q_pe, all_latent, all_pe, in.start, in.mask);
    return o_proj(out.to(x.scalar_type()));
  }
  // Expanded formulation: per-head keys [nope | shared rope key] and values from the latent.
  auto kv_full = kv_b_proj(latent).view({B, T, n_heads_, nope_dim_ + v_dim_}).split_with_sizes({nope_dim_, v_dim_}, -1);
  auto k_nope = kv_full[0];
  auto v = kv_full[1];
  auto k = torch::cat({k_nope, k_pe.unsqueeze(2).expand({B, T, n_heads_, rope_dim_})}, -1);
  auto q = torch::cat({q_nope, q_pe}, -1);
  // The fused SDPA kernels (flash on CUDA and on the CPU) need one head size for q, k and v; MLA's values are
  // narrower (v_head_dim < qk_nope + qk_rope), so they are padded with zeros, which add nothing to the output's
  // first v_head_dim columns. Without it SDPA falls back to the math path, which forms [B, H, T, T] probabilities.
  const int64_t qk_dim = nope_dim_ + rope_dim_;
  if (v_dim_ < qk_dim) v = torch::constant_pad_nd(v, {0, qk_dim - v_dim_});
  auto out = in.mask.defined()
                 ? at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), in.mask,
                                                    0.0, false, scale_)
                 : at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), {}, 0.0,
                                                    /*is_causal=*/true, scale_);  // [B, H, T, qk or v]
  if (v_dim_ < qk_dim) out = out.narrow(-1, 0, v_dim_);
  return o_proj(out.transpose(1, 2).reshape({B, T, n_heads_ * v_dim_}));
}

}  // namespace dsopen::model
