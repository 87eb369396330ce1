// The CPU decode step: one new token for each row of a batch against its KV cache (or a prompt's tokens against
// its sequence's cache, each token a row), the whole model (embedding, every decoder layer, final norm, head)
// computed over raw float32 buffers by the project's own kernels.
//
// A decode step of a small model is hundreds of tiny operations; through LibTorch each one pays its dispatch,
// its output allocation and a parallel region, which on a 12.5M-parameter model costs more than the arithmetic
// (docs/BENCHMARKS.md "llama.cpp"). Here a step is one call chain: matrix-vector products that stream each weight
// once (model/gemv.h; int8 layers' codes read in place), RMSNorm, rope applied in place, attention over the
// cache in place (MHA/GQA, and MLA in absorbed form as DeepSeek-V3's inference/model.py does), SwiGLU, MoE routing
// and only the chosen experts, per row. Buffers are reused between steps (per thread): after the first step a step
// allocates only its logits.
//
// Activations are float32 whatever the weights' dtype (float32 or bfloat16, read and widened in registers); the
// cache keeps its own dtype. Results equal forward()'s up to float32 summation order (bf16 models: forward()
// rounds activations to bf16 between ops; this path does not).
#pragma once

#include <torch/torch.h>

#include "model/transformer.h"

namespace dsopen::model {

// Whether CausalLM::forward(in) takes the decode step: CPU tensors, autograd off, a cache (float32 or bfloat16)
// and no labels; one token per row with uniform length, per-row lengths (continuous batching) or a left-padded
// batch (position and segment ids), or one prompt's tokens [1, T] continuing its cache with last_logits >= 1
// (prefill: T up to 512); float32/bfloat16 weights or packed
// quantized layers; no attached LoRA adapter and no served adapter named for a row; every routed expert held by
// this process; positions within the rope table. Anything else runs forward()'s general path.
bool decode_step_applies(const CausalLMImpl& model, const ForwardInput& in);

// logits float32 [B, 1, V] (a prompt: [1, last_logits, V]); writes the new (key, value) or (latent, rope key) of
// every token into the cache, all of them before any attends, and advances cache->length as forward() does.
torch::Tensor decode_step(const CausalLMImpl& model, const ForwardInput& in);

// On unless the environment sets DSOPEN_DECODE_STEP=0; tests and benchmarks switch it per process.
bool decode_step_enabled();
void set_decode_step_enabled(bool on);

}  // namespace dsopen::model
