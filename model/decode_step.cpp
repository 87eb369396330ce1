#include "model/decode_step.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "model/fused_cpu.h"
#include "model/gemv.h"
#include "model/lora.h"
#include "model/tile_rows.h"

namespace dsopen::model {

namespace {

namespace rowk = kernels::detail;

// Rows above which a projection goes to LibTorch's GEMM instead of the tiled GEMV: this machine's measured
// crossover, at least 32 (model/tile_rows.h). Up to 32 a row's sums run in the same order however many rows share
// the step, so a served sequence decodes to the same bits alone or in a full batch (dsopen-serve's default
// --max-num-seqs).
int64_t gemm_rows(bool bf16_weights) { return bf16_weights ? tile_rows().bf16 : tile_rows().f32; }

// Prompt tokens up to which a prefill takes the step (prefill_applies).
constexpr int64_t kPrefillRows = 512;

std::atomic<int> g_enabled{-1};  // -1: not read from the environment yet

bool is_float(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16;
}
bool usable(const torch::Tensor& t, int64_t dims) {
  return t.defined() && t.device().is_cpu() && t.dim() == dims && t.is_contiguous() && is_float(t);
}
bool bf16(const torch::Tensor& t) { return t.scalar_type() == torch::kBFloat16; }

// ---- buffers reused between steps ---------------------------------------------------------------------------------

float* take(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Per-thread scratch inside parallel regions (slot: which of a task's buffers).
float* thread_scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[3];
  return take(buffers[slot], n);
}

struct Buffers {
  std::vector<float> h, xn, q, kv, v, att, sub, t, g, u, act, xe, ye, ye2, picked, gate, route, weights, scores, conv;
  std::vector<int64_t> experts;
};

// A float32 or bfloat16 buffer read as float32 rows (hot loops hold one instead of asking the tensor each time).
struct Rows {
  const void* data;
  bool bf16;
  explicit Rows(const torch::Tensor& t) : data(t.data_ptr()), bf16(t.scalar_type() == torch::kBFloat16) {}
  // `n` values at `offset` as float32, converted into `tmp` if needed.
  const float* at(int64_t offset, int64_t n, float* tmp) const {
    if (!bf16) return static_cast<const float*>(data) + offset;
    rowk::bf16_to_f32(static_cast<const uint16_t*>(data) + offset, tmp, n);
    return tmp;
  }
};

const float* as_f32(const torch::Tensor& t, int64_t offset, int64_t n, float* tmp) { return Rows(t).at(offset, n, tmp); }

void store(const float* src, torch::Tensor& t, int64_t offset, int64_t n) {
  if (bf16(t)) rowk::f32_to_bf16(src, reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()) + offset, n);
  else std::memcpy(t.data_ptr<float>() + offset, src, static_cast<size_t>(n) * 4);
}

// ---- what a step needs of the model ------------------------------------------------------------------------------

bool linear_ok(const LinearImpl& lin, bool adapters_named) {
  if (lin.has_lora() || (adapters_named && !lin.served_adapters.empty())) return false;
  if (lin.bias.defined() && !usable(lin.bias, 1)) return false;
  return lin.weight_only ? true : usable(lin.weight, 2);
}
bool linear_ok(const Linear& lin, bool adapters_named) { return !lin || linear_ok(*lin, adapters_named); }
bool norm_ok(const RMSNorm& n) { return !n || usable(n->weight, 1); }
bool mlp_ok(const MLP& m, bool named) {
  return linear_ok(m->gate_proj, named) && linear_ok(m->up_proj, named) && linear_ok(m->down_proj, named) &&
         linear_ok(m->gate_up_proj, named);
}

bool layer_ok(const DecoderLayerImpl& layer, const ModelConfig& c, bool named) {
  if (!norm_ok(layer.input_layernorm) || !norm_ok(layer.post_attention_layernorm) ||
      !norm_ok(layer.post_self_attn_layernorm) || !norm_ok(layer.post_mlp_layernorm))
    return false;
  if (auto a = layer.attention()) {
    if (!linear_ok(a->q_proj, named) || !linear_ok(a->k_proj, named) || !linear_ok(a->v_proj, named) ||
        !linear_ok(a->o_proj, named) || !norm_ok(a->q_norm) || !norm_ok(a->k_norm))
      return false;
  } else {
    auto m = layer.mla();
    if (!linear_ok(m->q_proj, named) || !linear_ok(m->q_a_proj, named) || !linear_ok(m->q_b_proj, named) ||
        !linear_ok(m->kv_a_proj_with_mqa, named) || !linear_ok(m->o_proj, named) || !norm_ok(m->q_a_layernorm) ||
        !norm_ok(m->kv_a_layernorm))
      return false;
    // The absorbed form reads kv_b_proj's weight itself (a packed or adapted one would need its own path).
    const auto& kvb = *m->kv_b_proj;
    if (kvb.weight_only || kvb.has_lora() || (named && !kvb.served_adapters.empty()) || !usable(kvb.weight, 2)) return false;
  }
  if (auto mlp = layer.mlp()) return mlp_ok(mlp, named);
  auto moe = layer.moe();
  if (moe->placement().sharded() || !usable(moe->gate->weight, 2)) return false;
  if (moe->gate->e_score_correction_bias.defined() && !usable(moe->gate->e_score_correction_bias, 1)) return false;
  for (int64_t e = 0; e < c.n_routed_experts; ++e)
    if (!mlp_ok(moe->expert(e), named)) return false;
  if (moe->shared_experts && !mlp_ok(moe->shared_experts, named)) return false;
  if (moe->shared_expert && (!mlp_ok(moe->shared_expert, named) || !linear_ok(moe->shared_expert_gate, named))) return false;
  return true;
}

// ---- the rows of one step ------------------------------------------------------------------------------------------

struct Row {
  int64_t batch = 0;  // cache row (decoding: the row itself; a prompt's tokens: all the prompt's one row)
  int64_t pos = 0;    // rope position
  int64_t slot = 0;   // cache index written
  int64_t keys = 0;   // cache entries [0, keys) considered
  const bool* valid = nullptr;  // padded batches: which of them are real (the row's own slot always is)
};

struct Step {
  const ModelConfig* c = nullptr;
  std::vector<Row> rows;
  const float* cos = nullptr;  // rope tables [positions, rope_dim / 2]
  const float* sin = nullptr;
  float eps = 1e-6f;
  Buffers* b = nullptr;
  bool visible(const Row& r, int64_t s) const { return !r.valid || r.valid[s] || s == r.slot; }
  // Keys a row attends on average (sizes the attention's parallel chunks).
  int64_t mean_keys() const {
    int64_t sum = 0;
    for (const Row& r : rows) sum += r.keys;
    return std::max<int64_t>(1, sum / static_cast<int64_t>(rows.size()));
  }
};

// ---- the operations ----------------------------------------------------------------------------------------------

// y [rows, out] = x [rows, in] W^T + bias
void linear(const LinearImpl& lin, const float* x, int64_t rows, float* y, Buffers& b) {
  const int64_t in = lin.options.in_features(), out = lin.options.out_features();
  const float* bias = lin.bias.defined() ? as_f32(lin.bias, 0, out, take(b.conv, out)) : nullptr;
  if (lin.weight_only) {
    if (!lin.weight_only_rows || !lin.weight_only_rows(x, rows, y)) {
      auto yt = lin.weight_only(torch::from_blob(const_cast<float*>(x), {rows, in})).to(torch::kFloat32).contiguous();
      std::memcpy(y, yt.data_ptr<float>(), static_cast<size_t>(rows * out) * 4);
    }
    if (bias)
      for (int64_t r = 0; r < rows; ++r) rowk::axpy(1.0f, bias, y + r * out, out);
    return;
  }
  const auto& w = lin.weight;
  if (rows > gemm_rows(bf16(w))) {  // a prompt's rows, past this machine's crossover: LibTorch's GEMM
    auto yt = torch::from_blob(y, {rows, out});
    const auto xt = torch::from_blob(const_cast<float*>(x), {rows, in});
    // bfloat16 weights: its bf16 GEMM (oneDNN; AMX or AVX512-BF16 where the CPU has them) on the rows rounded to
    // bf16, as forward() computes them; the tiles would widen every weight to float32 FMAs.
    if (bf16(w)) yt.copy_(torch::mm(xt.to(torch::kBFloat16), w.t()));
    else torch::mm_out(yt, xt, w.t());
    if (bias)
      for (int64_t r = 0; r < rows; ++r) rowk::axpy(1.0f, bias, y + r * out, out);
    return;
  }
  gemv_rows(x, rows, in, w.data_ptr(), bf16(w), out, bias, y);
}

// y = RMSNorm(x) per row (row stride ldx for x, D for y; in place allowed).
void rmsnorm(const RMSNormImpl& n, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t D,
             const Step& st) {
  const float* w = as_f32(n.weight, 0, D, take(st.b->conv, D));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    const float inv = 1.0f / std::sqrt(rowk::dot(xr, xr, D) / static_cast<float>(D) + st.eps);
    rowk::rms_apply(xr, w, inv, false, y + r * ldy, D);
  }
}

// Rotates the first rope_dim values of `x` (in place) for position `pos`.
void rope(float* x, int64_t pos, int64_t rope_dim, bool interleaved, const Step& st) {
  const int64_t half = rope_dim / 2;
  const float *c = st.cos + pos * half, *s = st.sin + pos * half;
  if (interleaved) rowk::rope_interleaved_row(x, x, c, s, half, 1.0f);
  else rowk::rope_half_row(x, x, c, s, half, 1.0f);
}

// p[0, keys) <- softmax(scale * p) over the visible entries (the others 0).
void softmax(float* p, const Row& r, float scale, const Step& st) {
  for (int64_t s = 0; s < r.keys; ++s)
    p[s] = st.visible(r, s) ? p[s] * scale : -std::numeric_limits<float>::infinity();
  const float m = rowk::row_max(p, r.keys);
  const float inv = 1.0f / rowk::exp_shift_sum(p, m, r.keys);
  for (int64_t s = 0; s < r.keys; ++s) p[s] = st.visible(r, s) ? p[s] * inv : 0.0f;
}

// Query heads one attention task takes together (the row blocks of gemv_rows_serial / pv_rows).
constexpr int64_t kHeadBlock = 4;

// Tasks per parallel chunk for attention: enough multiply-adds to pay for a thread's wake-up.
int64_t attention_grain(int64_t keys, int64_t width) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, keys * width)); }

// MHA / GQA: out [rows, hidden] from xn [rows, hidden].
void attention(const AttentionImpl& a, LayerKVCache& cache, const float* xn, float* out, const Step& st) {
  const ModelConfig& c = *st.c;
  Buffers& b = *st.b;
  const int64_t R = static_cast<int64_t>(st.rows.size());
  const int64_t H = c.num_attention_heads, KV = c.num_key_value_heads, hd = c.attn_head_dim(), rd = c.rope_dim();
  const bool interleaved = c.arch().rope_layout == RopeLayout::kInterleaved;
  float* q = take(b.q, R * H * hd);
  float* k = take(b.kv, R * KV * hd);
  float* v = take(b.v, R * KV * hd);
  linear(*a.q_proj, xn, R, q, b);
  linear(*a.k_proj, xn, R, k, b);
  linear(*a.v_proj, xn, R, v, b);
  if (a.q_norm) {
    rmsnorm(*a.q_norm, q, hd, q, hd, R * H, hd, st);
    rmsnorm(*a.k_norm, k, hd, k, hd, R * KV, hd, st);
  }
  const int64_t cap = cache.a.size(2);
  for (int64_t r = 0; r < R; ++r) {
    const Row& row = st.rows[static_cast<size_t>(r)];
    for (int64_t h = 0; h < H; ++h) rope(q + (r * H + h) * hd, row.pos, rd, interleaved, st);
    for (int64_t h = 0; h < KV; ++h) {
      rope(k + (r * KV + h) * hd, row.pos, rd, interleaved, st);
      store(k + (r * KV + h) * hd, cache.a, ((row.batch * KV + h) * cap + row.slot) * hd, hd);
      store(v + (r * KV + h) * hd, cache.b, ((row.batch * KV + h) * cap + row.slot) * hd, hd);
    }
  }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const int64_t group = H / KV, blocks = (group + kHeadBlock - 1) / kHeadBlock, keys = st.mean_keys();
  float* att = take(b.att, R * H * hd);
  const bool kv_bf16 = bf16(cache.a);
  const auto elt = kv_bf16 ? 2 : 4;
  const auto* K = static_cast<const char*>(cache.a.data_ptr());
  const auto* V = static_cast<const char*>(cache.b.data_ptr());
  // One task: up to kHeadBlock query heads of one row sharing a kv head; their scores against the row's cached keys
  // and their weighted sums of its values as two small GEMMs that read each cached vector once for all of them.
  at::parallel_for(0, R * KV * blocks, attention_grain(keys, hd * kHeadBlock), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / (KV * blocks), kvh = (i / blocks) % KV, h0 = kvh * group + (i % blocks) * kHeadBlock;
      const int64_t nh = std::min<int64_t>(kHeadBlock, (kvh + 1) * group - h0);
      const Row& row = st.rows[static_cast<size_t>(r)];
      float* p = thread_scratch(0, nh * row.keys);
      const int64_t base = (row.batch * KV + kvh) * cap * hd;
      gemv_rows_serial(q + (r * H + h0) * hd, nh, hd, K + base * elt, kv_bf16, row.keys, p);
      for (int64_t j = 0; j < nh; ++j) softmax(p + j * row.keys, row, scale, st);
      pv_rows(p, nh, row.keys, V + base * elt, kv_bf16, hd, hd, att + (r * H + h0) * hd);
    }
  });
  linear(*a.o_proj, att, R, out, b);
}

// MLA in absorbed form (DeepSeek-V2 §2.1; DeepSeek-V3 inference/model.py "absorb"): the cache holds the normed
// latent c [C] and the rope key k_pe [rope] per position; per head, q_nope is folded into kv_b_proj's key rows
// (q_abs = q_nope W_k, [C]) so scores = q_abs . c_s + q_pe . k_pe_s, and the value rows apply after attention
// (out = W_v (sum_s p_s c_s)).
void attention(const MLAImpl& m, LayerKVCache& cache, const float* xn, float* out, const Step& st) {
  const ModelConfig& c = *st.c;
  Buffers& b = *st.b;
  const int64_t R = static_cast<int64_t>(st.rows.size());
  const int64_t H = c.num_attention_heads, C = c.kv_lora_rank, nope = c.qk_nope_head_dim, rd = c.qk_rope_head_dim;
  const int64_t vd = c.v_head_dim, qk = nope + rd;
  float* q = take(b.q, R * H * qk);
  if (m.q_a_proj) {
    const int64_t ql = c.q_lora_rank;
    float* t = take(b.t, R * ql);
    linear(*m.q_a_proj, xn, R, t, b);
    rmsnorm(*m.q_a_layernorm, t, ql, t, ql, R, ql, st);
    linear(*m.q_b_proj, t, R, q, b);
  } else {
    linear(*m.q_proj, xn, R, q, b);
  }
  float* kv = take(b.kv, R * (C + rd));
  linear(*m.kv_a_proj_with_mqa, xn, R, kv, b);
  rmsnorm(*m.kv_a_layernorm, kv, C + rd, kv, C + rd, R, C, st);
  const int64_t cap = cache.a.size(1);
  for (int64_t r = 0; r < R; ++r) {
    const Row& row = st.rows[static_cast<size_t>(r)];
    float* kr = kv + r * (C + rd);
    rope(kr + C, row.pos, rd, c.rope_interleave, st);
    for (int64_t h = 0; h < H; ++h) rope(q + (r * H + h) * qk + nope, row.pos, rd, c.rope_interleave, st);
    store(kr, cache.a, (row.batch * cap + row.slot) * C, C);
    store(kr + C, cache.b, (row.batch * cap + row.slot) * rd, rd);
  }
  const auto& Wt = m.kv_b_proj->weight;  // [H * (nope + vd), C]: per head its key rows, then its value rows
  const bool w_bf16 = bf16(Wt), kv_bf16 = bf16(cache.a);
  const auto* W = static_cast<const char*>(Wt.data_ptr());
  const auto* latent = static_cast<const char*>(cache.a.data_ptr());
  const auto* k_pe = static_cast<const char*>(cache.b.data_ptr());
  const int64_t welt = w_bf16 ? 2 : 4, kvelt = kv_bf16 ? 2 : 4;
  const float scale = static_cast<float>(attention_softmax_scale(qk, c.rope_scaling));
  const int64_t keys = st.mean_keys(), blocks = (H + kHeadBlock - 1) / kHeadBlock;
  float* att = take(b.att, R * H * vd);
  // One task: up to kHeadBlock heads of one row. Every head reads the same cached latents, so their scores and
  // their weighted sums are small GEMMs that load each cached vector once for the block.
  at::parallel_for(0, R * blocks, attention_grain(keys, (C + rd) * kHeadBlock), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / blocks, h0 = (i % blocks) * kHeadBlock, nh = std::min<int64_t>(kHeadBlock, H - h0);
      const Row& row = st.rows[static_cast<size_t>(r)];
      float* qabs = thread_scratch(0, nh * (2 * C + rd));  // [nh, C] q_abs, [nh, C] context, [nh, rd] q_pe
      float* ctx = qabs + nh * C;
      float* qp = ctx + nh * C;
      float* p = thread_scratch(1, 2 * nh * row.keys);     // [nh, keys] latent scores, then rope scores
      float* pe = p + nh * row.keys;
      for (int64_t j = 0; j < nh; ++j) {
        const float* qn = q + (r * H + h0 + j) * qk;
        pv_rows(qn, 1, nope, W + (h0 + j) * (nope + vd) * C * welt, w_bf16, C, C, qabs + j * C);  // q_nope W_k
        std::memcpy(qp + j * rd, qn + nope, static_cast<size_t>(rd) * 4);
      }
      gemv_rows_serial(qabs, nh, C, latent + row.batch * cap * C * kvelt, kv_bf16, row.keys, p);
      gemv_rows_serial(qp, nh, rd, k_pe + row.batch * cap * rd * kvelt, kv_bf16, row.keys, pe);
      for (int64_t j = 0; j < nh; ++j) {
        for (int64_t s = 0; s < row.keys; ++s) p[j * row.keys + s] += pe[j * row.keys + s];
        softmax(p + j * row.keys, row, scale, st);
      }
      pv_rows(p, nh, row.keys, latent + row.batch * cap * C * kvelt, kv_bf16, C, C, ctx);
      for (int64_t j = 0; j < nh; ++j)  // W_v: head h's value rows [vd, C]
        gemv_rows_serial(ctx + j * C, 1, C, W + ((h0 + j) * (nope + vd) + nope) * C * welt, w_bf16, vd,
                         att + (r * H + h0 + j) * vd);
    }
  });
  linear(*m.o_proj, att, R, out, b);
}

// SwiGLU MLP: y [rows, hidden] = down(silu(gate(x)) * up(x)).
void mlp(const MLPImpl& m, const float* x, int64_t rows, float* y, Buffers& b) {
  const int64_t I = m.down_proj->options.in_features();
  float* act = take(b.act, rows * I);
  if (m.gate_up_proj) {
    float* gu = take(b.g, rows * 2 * I);
    linear(*m.gate_up_proj, x, rows, gu, b);
    for (int64_t r = 0; r < rows; ++r) rowk::swiglu_row(gu + r * 2 * I, gu + r * 2 * I + I, act + r * I, I);
  } else {
    float* g = take(b.g, rows * I);
    float* u = take(b.u, rows * I);
    linear(*m.gate_proj, x, rows, g, b);
    linear(*m.up_proj, x, rows, u, b);
    for (int64_t r = 0; r < rows; ++r) rowk::swiglu_row(g + r * I, u + r * I, act + r * I, I);
  }
  linear(*m.down_proj, act, rows, y, b);
}

// model/moe.cpp route() for one row: indices [K] and combine weights [K]; scores / choice: scratch [E].
void route_row(const float* logits, const float* bias, const ModelConfig& c, int64_t* idx, float* w, float* scores,
               float* choice) {
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok;
  if (c.scoring_func == "sigmoid") {
    for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
  } else {
    const float m = *std::max_element(logits, logits + E);
    float sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(logits[e] - m));
    for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
  }
  for (int64_t e = 0; e < E; ++e) choice[e] = scores[e] + (bias ? bias[e] : 0.0f);
  const float ninf = -std::numeric_limits<float>::infinity();
  if (c.topk_method != "greedy" && c.n_group > 1) {
    const int64_t G = c.n_group, per = E / G;
    float gs[256];
    for (int64_t g = 0; g < G; ++g) {
      const float* cg = choice + g * per;
      float best = ninf, second = ninf;
      for (int64_t j = 0; j < per; ++j) {
        if (cg[j] > best) second = best, best = cg[j];
        else if (cg[j] > second) second = cg[j];
      }
      gs[g] = c.topk_method == "noaux_tc" ? best + second : best;
    }
    bool keep[256] = {};
    for (int64_t t = 0; t < c.topk_group; ++t) {
      int64_t pick = -1;
      for (int64_t g = 0; g < G; ++g)
        if (!keep[g] && (pick < 0 || gs[g] > gs[pick])) pick = g;
      keep[pick] = true;
    }
    for (int64_t g = 0; g < G; ++g)
      if (!keep[g]) std::fill(choice + g * per, choice + (g + 1) * per, ninf);
  }
  for (int64_t k = 0; k < K; ++k) {  // K is small: selection by repeated maxima, in descending order as topk
    int64_t pick = -1;
    for (int64_t e = 0; e < E; ++e)
      if (choice[e] != std::numeric_limits<float>::lowest() && (pick < 0 || choice[e] > choice[pick])) pick = e;
    idx[k] = pick;
    w[k] = scores[pick];
    choice[pick] = std::numeric_limits<float>::lowest();
  }
  float sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += w[k];
  const float factor = static_cast<float>(c.routed_scaling_factor);
  if (c.arch().routing_weights == RoutingWeights::kNormalizeThenScale) {
    if (c.norm_topk_prob)
      for (int64_t k = 0; k < K; ++k) w[k] /= sum + 1e-20f;
    if (c.routed_scaling_factor != 1.0)
      for (int64_t k = 0; k < K; ++k) w[k] *= factor;
  } else if (K > 1 && c.norm_topk_prob) {
    for (int64_t k = 0; k < K; ++k) w[k] /= sum + 1e-20f;
  } else {
    for (int64_t k = 0; k < K; ++k) w[k] *= factor;
  }
}

// DeepSeekMoE / Qwen-MoE / Mixtral for the step's rows: y [rows, hidden] from x [rows, hidden].
void moe(const MoEImpl& m, const float* x, int64_t rows, float* y, const Step& st) {
  const ModelConfig& c = *st.c;
  Buffers& b = *st.b;
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, D = c.hidden_size;
  float* logits = take(b.route, rows * E + 2 * E);
  gemv_rows(x, rows, D, m.gate->weight.data_ptr(), bf16(m.gate->weight), E, nullptr, logits);
  const auto& bias_t = m.gate->e_score_correction_bias;
  const float* bias = bias_t.defined() ? as_f32(bias_t, 0, E, take(b.conv, E)) : nullptr;
  std::vector<int64_t>& idx = b.experts;
  if (static_cast<int64_t>(idx.size()) < rows * K) idx.resize(static_cast<size_t>(rows * K));
  float* w = take(b.weights, rows * K);
  for (int64_t r = 0; r < rows; ++r)
    route_row(logits + r * E, bias, c, idx.data() + r * K, w + r * K, logits + rows * E, logits + rows * E + E);
  std::fill(y, y + rows * D, 0.0f);
  float* xe = take(b.xe, rows * D);
  float* ye = take(b.ye, rows * D);
  if (rows == 1) {
    for (int64_t k = 0; k < K; ++k) {
      mlp(*m.expert(idx[static_cast<size_t>(k)]), x, 1, ye, b);
      rowk::axpy(w[k], ye, y, D);
    }
  } else {  // each chosen expert once, on the rows that chose it
    // Outputs kept per (row, pick) and summed in pick order afterwards, as a lone row sums them: the same bits
    // whatever other rows share the step.
    float* picked = take(b.picked, rows * K * D);
    std::vector<int64_t> members;
    members.reserve(static_cast<size_t>(rows));
    for (int64_t e = 0; e < E; ++e) {
      members.clear();
      for (int64_t i = 0; i < rows * K; ++i)
        if (idx[static_cast<size_t>(i)] == e) members.push_back(i);
      if (members.empty()) continue;
      const int64_t n = static_cast<int64_t>(members.size());
      for (int64_t j = 0; j < n; ++j) std::memcpy(xe + j * D, x + (members[j] / K) * D, static_cast<size_t>(D) * 4);
      mlp(*m.expert(e), xe, n, ye, b);
      for (int64_t j = 0; j < n; ++j) std::memcpy(picked + members[j] * D, ye + j * D, static_cast<size_t>(D) * 4);
    }
    for (int64_t i = 0; i < rows * K; ++i) rowk::axpy(w[i], picked + i * D, y + (i / K) * D, D);
  }
  if (m.shared_experts) {
    mlp(*m.shared_experts, x, rows, ye, b);
    for (int64_t r = 0; r < rows; ++r) rowk::axpy(1.0f, ye + r * D, y + r * D, D);
  }
  if (m.shared_expert) {  // Qwen2-MoE: scaled by sigmoid(shared_expert_gate(x))
    float* gate = take(b.gate, rows);
    linear(*m.shared_expert_gate, x, rows, gate, b);
    mlp(*m.shared_expert, x, rows, ye, b);
    for (int64_t r = 0; r < rows; ++r) rowk::axpy(1.0f / (1.0f + std::exp(-gate[r])), ye + r * D, y + r * D, D);
  }
}

// The rows' positions, cache slots and visible keys (see ForwardInput); false when the step cannot take them.
bool plan_rows(const ForwardInput& in, std::vector<Row>& rows) {
  const KVCache& cache = *in.cache;
  const int64_t B = in.input_ids.size(0), T = in.input_ids.size(1), start = cache.length;
  if (T > 1) {  // one prompt's tokens: all in cache row 0, token t at start + t attending keys [0, start + t]
    rows.assign(static_cast<size_t>(T), Row{});
    for (int64_t t = 0; t < T; ++t) {
      Row& r = rows[static_cast<size_t>(t)];
      r.slot = r.pos = start + t;
      r.keys = r.slot + 1;
    }
    return true;
  }
  rows.assign(static_cast<size_t>(B), Row{});
  const bool per_row = !in.row_lengths.empty();
  for (int64_t b = 0; b < B; ++b) {
    Row& r = rows[static_cast<size_t>(b)];
    r.batch = b;
    r.slot = per_row ? in.row_lengths[static_cast<size_t>(b)] : start;
    r.pos = r.slot;
    r.keys = r.slot + 1;
  }
  if (per_row) return true;
  if (in.position_ids.defined()) {
    const auto pos = in.position_ids.to(torch::kCPU).to(torch::kLong).contiguous();
    if (pos.numel() != B) return false;
    for (int64_t b = 0; b < B; ++b) rows[static_cast<size_t>(b)].pos = pos.data_ptr<int64_t>()[b];
  }
  return true;
}

// A prompt's prefill through the step ([1, T] tokens, T > 1): one sequence continuing its cache, the logits of its
// last few tokens only. Through LibTorch a short prompt's forward pays a fixed cost of hundreds of dispatched ops
// (a served chat prompt of a small model spends longer there than in its arithmetic). Past the machine's crossover
// (gemm_rows) the float32 and bfloat16 products go to LibTorch's GEMMs, as in forward(); quantized layers' kernels
// pick their own path by row count.
bool prefill_applies(const CausalLMImpl& model, const ForwardInput& in) {
  const int64_t T = in.input_ids.size(1);
  if (in.input_ids.size(0) != 1 || in.last_logits < 1 || in.last_logits > T || !in.row_lengths.empty() ||
      in.position_ids.defined() || in.segment_ids.defined())
    return false;
  return T <= kPrefillRows;
}

}  // namespace

bool decode_step_enabled() {
  int v = g_enabled.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* e = std::getenv("DSOPEN_DECODE_STEP");
    v = (e && std::string(e) == "0") ? 0 : 1;
    g_enabled.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

void set_decode_step_enabled(bool on) { g_enabled.store(on ? 1 : 0, std::memory_order_relaxed); }

bool decode_step_applies(const CausalLMImpl& model, const ForwardInput& in) {
  if (!decode_step_enabled() || !in.cache || in.labels.defined() || torch::GradMode::is_enabled()) return false;
  const auto& ids = in.input_ids;
  if (!ids.defined() || ids.dim() != 2 || ids.size(1) == 0 || !ids.device().is_cpu() || ids.size(0) == 0) return false;
  const ModelConfig& c = model.config();
  const KVCache& cache = *in.cache;
  const auto& layers = model.model->layer_list;
  if (cache.layers.size() != layers.size()) return false;
  const int64_t B = ids.size(0), T = ids.size(1);
  if (T > 1 && !prefill_applies(model, in)) return false;
  for (const auto& lc : cache.layers) {
    if (!usable(lc.a, c.is_mla() ? 3 : 4) || !usable(lc.b, c.is_mla() ? 3 : 4) || lc.a.size(0) != B ||
        lc.a.scalar_type() != lc.b.scalar_type())
      return false;
  }
  if (in.segment_ids.defined() && (!in.position_ids.defined() || in.segment_ids.numel() != B)) return false;
  // Slots within the cache and positions within the rope table: otherwise forward() says what is wrong.
  const int64_t capacity = c.is_mla() ? cache.layers.front().a.size(1) : cache.layers.front().a.size(2);
  int64_t highest_slot = cache.length + T - 1, highest_pos = cache.length + T - 1;
  if (!in.row_lengths.empty()) {
    if (static_cast<int64_t>(in.row_lengths.size()) != B) return false;
    highest_slot = highest_pos = *std::max_element(in.row_lengths.begin(), in.row_lengths.end());
    if (*std::min_element(in.row_lengths.begin(), in.row_lengths.end()) < 0) return false;
  } else if (in.position_ids.defined()) {
    if (!in.position_ids.device().is_cpu() || in.position_ids.numel() != B) return false;
    highest_pos = in.position_ids.max().item<int64_t>();
    if (in.position_ids.min().item<int64_t>() < 0) return false;
  }
  if (highest_slot >= capacity || !model.rope().table(highest_pos + 1).first.defined()) return false;
  const auto* adapter_rows = ServedAdapterRows::current();
  const bool named = adapter_rows && std::any_of(adapter_rows->begin(), adapter_rows->end(), [](int64_t id) { return id != 0; });
  if (!usable(model.model->embed_tokens->weight, 2) || !norm_ok(model.model->norm)) return false;
  if (model.lm_head && !linear_ok(*model.lm_head, named)) return false;
  for (const auto& layer : layers)
    if (!layer_ok(*layer, c, named)) return false;
  return true;
}

torch::Tensor decode_step(const CausalLMImpl& model, const ForwardInput& in) {
  thread_local Buffers buffers;
  const ModelConfig& c = model.config();
  KVCache& cache = *in.cache;
  Step st;
  st.c = &c;
  st.b = &buffers;
  st.eps = static_cast<float>(c.rms_norm_eps);
  TORCH_CHECK(plan_rows(in, st.rows), "decode_step: position_ids must hold one position per row");
  const int64_t R = static_cast<int64_t>(st.rows.size()), D = c.hidden_size, V = c.vocab_size;
  int64_t highest = 0;
  for (const Row& r : st.rows) highest = std::max(highest, r.pos);
  const auto [cos, sin] = model.rope().table(highest + 1);
  TORCH_CHECK(cos.defined(), "decode_step: position ", highest, " is outside the rope table");
  st.cos = cos.data_ptr<float>();
  st.sin = sin.data_ptr<float>();
  if (in.segment_ids.defined()) {  // a left-padded batch: remember which cached keys are real (forward() does too)
    if (!cache.key_valid.defined()) cache.key_valid = torch::ones({R, cache.capacity}, torch::kBool);
    const auto seg = in.segment_ids.to(torch::kCPU).to(torch::kLong).contiguous();
    bool* valid = cache.key_valid.data_ptr<bool>();
    const int64_t cap = cache.key_valid.size(1);
    for (int64_t r = 0; r < R; ++r) {
      valid[r * cap + cache.length] = seg.data_ptr<int64_t>()[r] != 0;
      st.rows[static_cast<size_t>(r)].valid = valid + r * cap;
    }
  }

  // Embedding rows.
  Buffers& b = buffers;
  float* h = take(b.h, R * D);
  const auto ids = in.input_ids.contiguous();
  const auto& emb = model.model->embed_tokens->weight;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t id = ids.data_ptr<int64_t>()[r];
    TORCH_CHECK(id >= 0 && id < emb.size(0), "token id ", id, " is outside the vocabulary of ", emb.size(0));
    const float* e = as_f32(emb, id * D, D, h + r * D);
    if (e != h + r * D) std::memcpy(h + r * D, e, static_cast<size_t>(D) * 4);
  }

  float* xn = take(b.xn, R * D);
  float* sub = take(b.sub, R * D);
  const auto& layers = model.model->layer_list;
  for (size_t l = 0; l < layers.size(); ++l) {
    const DecoderLayerImpl& layer = *layers[l];
    rmsnorm(*layer.input_layernorm, h, D, xn, D, R, D, st);
    if (auto a = layer.attention()) attention(*a, cache.layers[l], xn, sub, st);
    else attention(*layer.mla(), cache.layers[l], xn, sub, st);
    if (layer.post_self_attn_layernorm) rmsnorm(*layer.post_self_attn_layernorm, sub, D, sub, D, R, D, st);
    for (int64_t i = 0; i < R * D; ++i) h[i] += sub[i];
    rmsnorm(*layer.post_attention_layernorm, h, D, xn, D, R, D, st);
    if (auto m = layer.mlp()) mlp(*m, xn, R, sub, b);
    else moe(*layer.moe(), xn, R, sub, st);
    if (layer.post_mlp_layernorm) rmsnorm(*layer.post_mlp_layernorm, sub, D, sub, D, R, D, st);
    for (int64_t i = 0; i < R * D; ++i) h[i] += sub[i];
  }
  const int64_t T = in.input_ids.size(1);
  if (in.row_lengths.empty()) cache.length += T;

  // Logits of every decoding row, or of a prompt's last in.last_logits tokens.
  const int64_t first = T > 1 ? R - in.last_logits : 0, L = R - first;
  rmsnorm(*model.model->norm, h + first * D, D, xn, D, L, D, st);
  auto logits = T > 1 ? torch::empty({1, L, V}, torch::kFloat32) : torch::empty({R, 1, V}, torch::kFloat32);
  if (model.lm_head) linear(*model.lm_head, xn, L, logits.data_ptr<float>(), b);
  else gemv_rows(xn, L, D, emb.data_ptr(), bf16(emb), V, nullptr, logits.data_ptr<float>());
  return logits;
}

}  // namespace dsopen::model
