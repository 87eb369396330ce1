#include "model/transformer.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <optional>

#include "model/decode_step.h"
#include "model/expert_parallel.h"
#include "model/fused_ops.h"
#include "utils/compat.h"

namespace dsopen::model {

// ---------------------------------------------------------------------------------------------------------------
// Decoder layer: h = x + attn(norm(x)); out = h + mlp(norm(h)). GLM-4 normalises each sub-block's output too:
// h = x + norm(attn(norm(x))); out = h + norm(mlp(norm(h))).
// ---------------------------------------------------------------------------------------------------------------

DecoderLayerImpl::DecoderLayerImpl(const ModelConfig& c, int64_t layer_index) {
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  if (c.is_mla()) mla_ = register_module("self_attn", MLA(c));
  else mha_ = register_module("self_attn", Attention(c));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  const ArchTraits& a = c.arch();
  if (a.post_norms) {
    post_self_attn_layernorm = register_module("post_self_attn_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
    post_mlp_layernorm = register_module("post_mlp_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  }
  if (c.is_moe_layer(layer_index)) moe_ = register_module(a.moe_block, MoE(c));
  else mlp_ = register_module("mlp", MLP(c.hidden_size, c.intermediate_size, a.mlp));
}

void DecoderLayerImpl::init_cache(LayerKVCache& cache, int64_t batch, int64_t capacity,
                                  const torch::TensorOptions& opts) const {
  if (mla_) mla_->init_cache(cache, batch, capacity, opts);
  else mha_->init_cache(cache, batch, capacity, opts);
}

LayerOutput DecoderLayerImpl::forward(const torch::Tensor& x, const AttentionInput& in, const torch::Tensor& token_mask) {
  auto normed = input_layernorm(x);
  auto attn = mla_ ? mla_->forward(normed, in) : mha_->forward(normed, in);
  auto h = x + (post_self_attn_layernorm ? post_self_attn_layernorm(attn) : attn);
  LayerOutput out;
  torch::Tensor y;
  if (moe_) {
    MoEOutput m = moe_->forward(post_attention_layernorm(h), token_mask);
    y = m.y;
    out.aux_sum = m.aux_sum;
    out.load = m.load;
    out.dropped = m.dropped;
  } else {
    y = mlp_->forward(post_attention_layernorm(h));
    out.aux_sum = torch::zeros({}, x.options().dtype(torch::kFloat32));
  }
  out.h = h + (post_mlp_layernorm ? post_mlp_layernorm(y) : y);
  return out;
}

MTPLayerImpl::MTPLayerImpl(const ModelConfig& c, int64_t layer_index) : DecoderLayerImpl(c, layer_index) {
  enorm = register_module("enorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  hnorm = register_module("hnorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  eh_proj = register_module("eh_proj", linear(2 * c.hidden_size, c.hidden_size));
  shared_head = register_module("shared_head", SharedHead(c.hidden_size, c.rms_norm_eps));
}

DeepSeekModelImpl::DeepSeekModelImpl(const ModelConfig& c) {
  // Under SkipWeightInit the table is handed in uninitialised (nn::Embedding would otherwise draw it normally).
  auto embedding = torch::nn::EmbeddingOptions(c.vocab_size, c.hidden_size);
  if (SkipWeightInit::active()) embedding._weight(torch::empty({c.vocab_size, c.hidden_size}));
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(embedding));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    layer_list.push_back(DecoderLayer(c, l));
    layers->push_back(layer_list.back());
  }
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
}

// ---------------------------------------------------------------------------------------------------------------
// Activation checkpointing: run the layer without saving activations, recompute it in backward.
// LibTorch has no torch.utils.checkpoint, so this is the reentrant variant written as an autograd Function.
// ---------------------------------------------------------------------------------------------------------------

namespace {

// The generator dropout draws from on `device` (LoRA adapters may drop their input): the recomputation replays the
// forward pass's state so it draws the same masks.
at::Generator generator_of(const torch::Device& device) {
  return device.is_cuda() ? at::globalContext().defaultGenerator(device) : at::detail::getDefaultCPUGenerator();
}

struct CheckpointedLayer : public torch::autograd::Function<CheckpointedLayer> {
  // Empty tensors stand for undefined ones (Functions take defined tensors only).
  static torch::Tensor or_none(const torch::Tensor& t) { return t.numel() ? t : torch::Tensor(); }

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, torch::Tensor h,
                                                torch::Tensor cos, torch::Tensor sin, torch::Tensor mask,
                                                torch::Tensor token_mask, int64_t layer_ptr) {
    ctx->saved_data["layer"] = layer_ptr;
    ctx->saved_data["autocast"] = compat::autocast_enabled(h.device().type());
    ctx->saved_data["autocast_dtype"] = static_cast<int64_t>(at::autocast::get_autocast_dtype(h.device().type()));
    ctx->saved_data["rng"] = generator_of(h.device()).get_state();
    ctx->save_for_backward({h, cos, sin, mask, token_mask});
    auto* layer = reinterpret_cast<DecoderLayerImpl*>(layer_ptr);
    torch::NoGradGuard no_grad;
    LayerOutput out = layer->forward(h, AttentionInput{cos, sin, or_none(mask), 0, nullptr}, or_none(token_mask));
    auto load = out.load.defined() ? out.load : torch::zeros({0}, h.options().dtype(torch::kLong));
    auto dropped = out.dropped.defined() ? out.dropped : torch::zeros({0}, torch::kLong);
    ctx->mark_non_differentiable({load, dropped});
    return {out.h, out.aux_sum, load, dropped};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto* layer = reinterpret_cast<DecoderLayerImpl*>(ctx->saved_data["layer"].toInt());
    auto h = saved[0].detach().requires_grad_(true);
    auto gen = generator_of(h.device());
    const auto rng_now = gen.get_state();
    gen.set_state(ctx->saved_data["rng"].toTensor());
    LayerOutput out;
    {
      // Recompute under the precision the forward pass ran with.
      compat::AutocastScope replay(h.device().type(), ctx->saved_data["autocast"].toBool(),
                                   static_cast<c10::ScalarType>(ctx->saved_data["autocast_dtype"].toInt()));
      torch::AutoGradMode grad_on(true);
      RecomputeScope recompute;
      out = layer->forward(h, AttentionInput{saved[1], saved[2], or_none(saved[3]), 0, nullptr}, or_none(saved[4]));
    }
    gen.set_state(rng_now);
    std::vector<torch::Tensor> outputs{out.h}, out_grads{grads[0]};
    if (out.aux_sum.requires_grad() && grads[1].defined()) {
      outputs.push_back(out.aux_sum);
      out_grads.push_back(grads[1]);
    }
    torch::autograd::backward(outputs, out_grads);  // accumulates into the layer's parameters
    return {h.grad(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};  // only h
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Causal LM
// ---------------------------------------------------------------------------------------------------------------

CausalLMImpl::CausalLMImpl(const ModelConfig& c)
    : config_(c),
      rope_(c.rope_dim(), c.context_length(), c.rope_theta, c.rope_scaling, c.max_position_embeddings) {
  c.validate();
  model = register_module("model", DeepSeekModel(c));
  // Tied models have no lm_head of their own (HF omits lm_head.weight from such checkpoints too).
  if (!c.tie_word_embeddings) lm_head = register_module("lm_head", linear(c.hidden_size, c.vocab_size));
  if (c.mtp_depth() > 0) {
    mtp = register_module("mtp", torch::nn::ModuleList());
    for (int64_t k = 0; k < c.mtp_depth(); ++k) {
      // MTP blocks use the layer index after the last decoder layer (MoE when the model has experts).
      mtp_list.push_back(MTPLayer(c, c.num_hidden_layers + k));
      mtp->push_back(mtp_list.back());
    }
  }
  if (!SkipWeightInit::active()) init_weights();
}

ExpertPlacement CausalLMImpl::expert_placement() const {
  const auto blocks = moe_blocks();
  return blocks.empty() ? ExpertPlacement{} : blocks.front().moe->placement();
}

void CausalLMImpl::set_expert_exchange(const std::shared_ptr<ExpertExchange>& exchange) {
  for (auto& b : moe_blocks()) b.moe->set_exchange(exchange);
}

void CausalLMImpl::init_weights() {
  torch::NoGradGuard no_grad;
  const double std = config_.initializer_range;
  const double residual_std = config_.scaled_residual_init ? std / std::sqrt(2.0 * config_.num_hidden_layers) : std;
  // Routed experts draw from generators of their own, seeded by their names: the same expert gets the same values
  // whichever experts this process holds (expert parallelism), and the rest of the model draws the same sequence.
  const uint64_t expert_seed = draw_seed_base();
  for (auto& item : named_parameters()) {
    const std::string& name = item.key();
    auto& p = item.value();
    std::optional<at::Generator> gen;
    if (is_routed_expert_name(name)) gen = at::make_generator<at::CPUGeneratorImpl>(named_seed(expert_seed, name));
    const bool is_norm = name.find("norm.weight") != std::string::npos;
    if (is_norm) {
      p.fill_(1.0);
    } else if (name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0) {
      p.zero_();
    } else {
      const std::string& down = config_.arch().expert_proj[2];  // Mixtral's experts: w2
      const bool residual_out = name.find("o_proj.weight") != std::string::npos ||
                                name.find("down_proj.weight") != std::string::npos ||
                                (name.size() > down.size() + 8 &&
                                 name.compare(name.size() - down.size() - 8, down.size() + 8, "." + down + ".weight") == 0);
      if (gen && p.is_cpu()) {
        p.normal_(0.0, residual_out ? residual_std : std, *gen);
      } else if (gen) {  // draw on the CPU so the values do not depend on the device
        p.copy_(torch::empty(p.sizes(), p.options().device(torch::kCPU)).normal_(0.0, residual_out ? residual_std : std, *gen));
      } else {
        p.normal_(0.0, residual_out ? residual_std : std);
      }
    }
  }
  for (auto& b : named_buffers())
    if (b.key().find("e_score_correction_bias") != std::string::npos) b.value().zero_();
}

torch::Tensor CausalLMImpl::head(const torch::Tensor& h) {
  return lm_head ? lm_head->forward(h) : torch::nn::functional::linear(h, model->embed_tokens->weight);
}

torch::Tensor CausalLMImpl::fused_head_weight() const {
  if (!fused::enabled()) return {};
  if (lm_head && (lm_head->has_lora() || lm_head->weight_only || lm_head->bias.defined())) return {};
  const auto& w = lm_head ? lm_head->weight : model->embed_tokens->weight;
  return w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16 ? w : torch::Tensor();
}

std::pair<torch::Tensor, torch::Tensor> CausalLMImpl::head_loss(const torch::Tensor& normed, const torch::Tensor& targets,
                                                                 bool z_loss, bool keep_logits, torch::Tensor* logits) {
  const int64_t rows = normed.numel() / normed.size(-1);
  const auto w = keep_logits ? torch::Tensor() : fused_head_weight();
  if (w.defined()) {
    auto sums = fused::linear_cross_entropy(normed.reshape({rows, -1}), w, targets.reshape({-1}), z_loss);
    return {sums.ce, sums.z};
  }
  auto l = head(normed);  // [B, T, V]
  if (logits) *logits = l;
  auto flat = l.reshape({rows, -1}).to(torch::kFloat32);
  auto ce = torch::nn::functional::cross_entropy(
      flat, targets.reshape({-1}), torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
  if (!z_loss) return {ce, {}};
  auto lse = flat.logsumexp(-1);  // [N]
  return {ce, (lse.pow(2) * targets.reshape({-1}).ne(-100).to(torch::kFloat32)).sum()};
}

LayerOutput CausalLMImpl::run_layer(DecoderLayerImpl& layer, const torch::Tensor& h, const AttentionInput& in,
                                    const torch::Tensor& token_mask) {
  if (!checkpointing_ || !is_training() || in.cache || !torch::GradMode::is_enabled())
    return layer.forward(h, in, token_mask);
  // autograd Functions take defined tensors only: an empty mask stands for "plain causal" / "every position".
  const auto none = torch::empty({0}, h.options().dtype(torch::kBool));
  auto mask = in.mask.defined() ? in.mask : none;
  // The Function's outputs need grad only if an input does: with a frozen embedding (LoRA) the hidden state
  // entering the first layer must be marked, or the layers' own trainable weights would get no gradient.
  auto input = h.requires_grad() ? h : h.detach().requires_grad_(true);
  auto outs = CheckpointedLayer::apply(input, in.cos, in.sin, mask, token_mask.defined() ? token_mask : none,
                                       reinterpret_cast<int64_t>(&layer));
  LayerOutput out;
  out.h = outs[0];
  out.aux_sum = outs[1];
  if (layer.is_moe()) out.load = outs[2];
  if (outs[3].numel() > 0) out.dropped = outs[3];
  return out;
}

KVCache CausalLMImpl::make_cache(int64_t batch, int64_t capacity, torch::Dtype dtype) const {
  KVCache cache;
  cache.capacity = capacity;
  cache.layers.resize(model->layer_list.size());
  auto opts = torch::TensorOptions().dtype(dtype).device(model->embed_tokens->weight.device());
  for (size_t l = 0; l < cache.layers.size(); ++l) model->layer_list[l]->init_cache(cache.layers[l], batch, capacity, opts);
  return cache;
}

namespace {
// bool [B, 1, T, T]: query i may see key j when both are in the same document and j <= i.
torch::Tensor document_mask(const torch::Tensor& segments) {
  const int64_t T = segments.size(1);
  auto same = segments.unsqueeze(2) == segments.unsqueeze(1);  // [B, T, T]
  auto causal = torch::ones({T, T}, segments.options().dtype(torch::kBool)).tril();
  return (same & causal).unsqueeze(1);
}
}  // namespace

ForwardOutput CausalLMImpl::forward(const ForwardInput& in) {
  const torch::Tensor& input_ids = in.input_ids;
  const torch::Tensor& labels = in.labels;
  const torch::Tensor& position_ids = in.position_ids;
  const torch::Tensor& segment_ids = in.segment_ids;
  KVCache* cache = in.cache;
  const int64_t last_logits = in.last_logits;
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  if (cache && !unit_hooks_ && decode_step_applies(*this, in)) {  // model/decode_step.h
    ForwardOutput out;
    out.logits = decode_step(*this, in);
    return out;
  }
  TORCH_CHECK(last_logits == 0 || !labels.defined(), "forward: last_logits is for inference (no labels)");
  const int64_t start = cache ? cache->length : 0;
  const bool per_row = !in.row_lengths.empty();
  TORCH_CHECK(!per_row || (cache && T == 1 && static_cast<int64_t>(in.row_lengths.size()) == B),
              "forward: row_lengths need a cache and one token for each of the ", B, " rows");
  torch::Tensor rows_at;  // per_row: each row's write index = its position
  int64_t keys = 0;
  if (per_row) {
    rows_at = torch::tensor(in.row_lengths, torch::kLong).to(input_ids.device());
    keys = *std::max_element(in.row_lengths.begin(), in.row_lengths.end()) + 1;
  }
  auto [cos, sin] = per_row                 ? rope_.gather(rows_at.view({B, 1}))
                    : position_ids.defined() ? rope_.gather(position_ids)
                                             : rope_.slice(start, T, input_ids.device());
  torch::Tensor mask;
  if (per_row) {
    auto k_pos = torch::arange(keys, input_ids.options()).view({1, keys});
    mask = (k_pos <= rows_at.view({B, 1})).view({B, 1, 1, keys});  // [B, 1, T = 1, S]
  } else if (cache && segment_ids.defined()) {
    // Padded batch decoding: remember which cached keys are real, attend causally to those (and to yourself, so
    // a padding query never has an empty row).
    if (!cache->key_valid.defined())
      cache->key_valid = torch::ones({B, cache->capacity}, input_ids.options().dtype(torch::kBool));
    cache->key_valid.narrow(1, start, T).copy_(segment_ids != 0);
    auto q_pos = torch::arange(start, start + T, input_ids.options()).view({T, 1});
    auto k_pos = torch::arange(0, start + T, input_ids.options()).view({1, start + T});
    auto valid = cache->key_valid.narrow(1, 0, start + T).unsqueeze(1);  // [B, 1, S]
    mask = ((valid & (k_pos <= q_pos)) | (k_pos == q_pos)).unsqueeze(1);  // [B, 1, T, S]
  } else if (segment_ids.defined()) {
    mask = document_mask(segment_ids);
  }

  ForwardOutput out;
  // MoE statistics count the positions that carry a loss target (every position without labels).
  const torch::Tensor main_mask = labels.defined() ? labels.ne(-100) : torch::Tensor();
  const int64_t L = config_.num_hidden_layers;
  // The unit holding the head's weight (model/param_units.h): its own, or the embedding's when they are tied.
  const int64_t head_unit = lm_head ? L + 2 : 0;
  // MTP depth k reads the embeddings of tokens i+k: looked up with the main stack's, so that the embedding (with
  // ZeRO-3) is gathered once per pass.
  const int64_t depths = labels.defined() ? std::min<int64_t>(static_cast<int64_t>(mtp_list.size()), T - 1) : 0;
  torch::Tensor h;
  std::vector<torch::Tensor> mtp_embeddings;
  {
    UnitUse use(unit_hooks_, {0});
    h = model->embed_tokens(input_ids);  // [B, T, hidden]
    for (int64_t k = 1; k <= depths; ++k) mtp_embeddings.push_back(model->embed_tokens(input_ids.narrow(1, k, T - k)));
  }
  const auto zero = torch::zeros({}, h.options().dtype(torch::kFloat32));
  out.sums.aux = zero;
  for (size_t l = 0; l < model->layer_list.size(); ++l) {
    AttentionInput attention{cos, sin, mask, start, cache ? &cache->layers[l] : nullptr, rows_at, keys};
    UnitUse use(unit_hooks_, {static_cast<int64_t>(l) + 1});
    LayerOutput lo = run_layer(*model->layer_list[l], use.input(h), attention, main_mask);
    // Only the hidden state: the balance loss's gradient reaches aux_sum as soon as backward starts, but every
    // node of the layer that needs a parameter also waits for the hidden state's gradient.
    lo.h = use.output(lo.h);
    h = lo.h;
    out.sums.aux = out.sums.aux + lo.aux_sum;
    if (lo.load.defined()) out.expert_load.push_back(lo.load);
    if (lo.dropped.defined()) out.moe_dropped = out.moe_dropped.defined() ? out.moe_dropped + lo.dropped : lo.dropped;
  }
  if (cache && !per_row) cache->length = start + T;
  if (last_logits > 0 && last_logits < T) h = h.narrow(1, T - last_logits, last_logits);
  out.aux_loss = out.mtp_loss = out.z_loss = zero;
  if (!labels.defined()) {
    torch::Tensor normed;
    {
      UnitUse use(unit_hooks_, {L + 1});
      normed = use.output(model->norm(use.input(h)));
    }
    UnitUse use(unit_hooks_, {head_unit});
    out.logits = use.output(head(use.input(normed)));  // [B, T, V]
    return out;
  }

  // MTP depth k predicts the token k+1 positions ahead of position i from the depth-(k-1) hidden state at i and
  // the embedding of token i+k; sequences shrink by one position per depth. Each module ends in its shared head's
  // norm; the head itself runs below, with the main stack's.
  std::vector<torch::Tensor> mtp_normed, mtp_targets_k;
  auto prev = h;
  for (int64_t k = 1; k <= depths; ++k) {
    const int64_t len = T - k;
    auto& m = *mtp_list[static_cast<size_t>(k - 1)];
    UnitUse use(unit_hooks_, {L + 2 + k});
    const auto ins = use.inputs({mtp_embeddings[static_cast<size_t>(k - 1)], prev.narrow(1, 0, len)});
    auto merged = m.eh_proj(torch::cat({m.enorm(ins[0]), m.hnorm(ins[1])}, -1));
    // Positions i of the shortened sequence keep their documents, positions and masks.
    auto [c2, s2] = position_ids.defined() ? rope_.gather(position_ids.narrow(1, 0, len))
                                           : rope_.slice(0, len, input_ids.device());
    auto seg = segment_ids.defined() ? segment_ids.narrow(1, 0, len) : torch::Tensor();
    mtp_targets_k.push_back(mtp_targets(labels, segment_ids, k));  // [B, len]
    LayerOutput lo = m.DecoderLayerImpl::forward(
        merged, AttentionInput{c2, s2, seg.defined() ? document_mask(seg) : torch::Tensor(), 0, nullptr},
        mtp_targets_k.back().ne(-100));
    if (lo.load.defined()) out.expert_load.push_back(lo.load);
    if (lo.dropped.defined()) out.moe_dropped = out.moe_dropped.defined() ? out.moe_dropped + lo.dropped : lo.dropped;
    out.sums.mtp_aux.push_back(lo.aux_sum);
    prev = use.output(lo.h);
    mtp_normed.push_back(use.output(m.shared_head->norm(lo.h)));
  }

  // Training and evaluation: the main head and every MTP depth's in one use of the head (ZeRO-3 gathers it once);
  // the fused head + loss never forms the [B, T, V] logits unless asked to keep them.
  torch::Tensor normed, ce_sum, z_sum;
  {
    UnitUse use(unit_hooks_, {L + 1});
    normed = use.output(model->norm(use.input(h)));
  }
  {
    UnitUse use(unit_hooks_, {head_unit});
    std::vector<torch::Tensor> head_inputs{normed};
    head_inputs.insert(head_inputs.end(), mtp_normed.begin(), mtp_normed.end());
    const auto ins = use.inputs(head_inputs);
    // The fused head + loss computes its gradients in this forward pass: its backward needs no weights, and the
    // head is gathered for backward only when another path (kept logits) needs them.
    const bool fused = !in.keep_logits && fused_head_weight().defined();
    const auto gathered_for_backward = [&](const torch::Tensor& t) { return fused ? t : use.output(t); };
    std::tie(ce_sum, z_sum) = head_loss(ins[0], labels, config_.z_loss_coef > 0, in.keep_logits, &out.logits);
    ce_sum = gathered_for_backward(ce_sum);
    z_sum = gathered_for_backward(z_sum);
    out.logits = use.output(out.logits);
    for (size_t k = 0; k < mtp_normed.size(); ++k)
      out.sums.mtp_ce.push_back(gathered_for_backward(head_loss(ins[k + 1], mtp_targets_k[k], false, false, nullptr).first));
  }
  out.sums.ce = ce_sum;
  if (z_sum.defined()) out.sums.z = z_sum;
  out.counts = count_loss_targets(config_, labels, segment_ids);
  const Loss loss = compose_loss(out.sums, out.counts, config_);
  out.loss = loss.total;
  out.ce_sum = ce_sum;
  out.n_targets = main_mask.sum();
  out.aux_loss = loss.aux;
  out.mtp_loss = loss.mtp;
  out.z_loss = loss.z;
  return out;
}

std::vector<MoEBlock> CausalLMImpl::moe_blocks() const {
  std::vector<MoEBlock> blocks;
  for (size_t l = 0; l < model->layer_list.size(); ++l)
    if (model->layer_list[l]->is_moe())
      blocks.push_back({"model.layers." + std::to_string(l) + "." + config_.arch().moe_block, model->layer_list[l]->moe()});
  for (size_t k = 0; k < mtp_list.size(); ++k)
    if (mtp_list[k]->is_moe())
      blocks.push_back({"model.layers." + std::to_string(config_.num_hidden_layers + static_cast<int64_t>(k)) + ".mlp",
                        mtp_list[k]->moe()});
  return blocks;
}

void CausalLMImpl::update_routing_bias(const std::vector<torch::Tensor>& loads) {
  auto blocks = moe_blocks();
  TORCH_CHECK(loads.size() <= blocks.size(), "update_routing_bias: ", loads.size(), " loads for ", blocks.size(),
              " MoE blocks");
  for (size_t i = 0; i < loads.size(); ++i) blocks[i].moe->update_bias(loads[i], config_.bias_update_speed);
}

}  // namespace dsopen::model
