// A model as one GGUF file for llama.cpp / Ollama (dsopen-convert --format gguf): the architecture llama.cpp knows
// the family as, its hyper-parameters under that architecture's keys, every weight under llama.cpp's tensor names
// (the same names and layouts as llama.cpp's convert_hf_to_gguf.py), the tokenizer and the chat template.
//
//   family (model_type)          GGUF architecture  what changes on the way
//   llama, mixtral               llama              q/k rows permuted from rotate-half to llama.cpp's adjacent pairs;
//                                                   Mixtral's experts stacked into ffn_{gate,up,down}_exps
//   qwen2, qwen3                 qwen2, qwen3       none (llama.cpp ropes these in rotate-half layout)
//   deepseek_v2, deepseek_v3     deepseek2          kv_b_proj split per head into attn_k_b (transposed) and attn_v_b
//                                                   for absorbed MLA; routed experts stacked; MTP modules left out
// Tensor types: 1-D tensors (norms, biases) and the MoE router stay F32; the rest take `type`, except that quantized
// types need rows of a multiple of 32 values (others fall back to F16) and q4_0 keeps the output head in q8_0 (as
// llama.cpp's quantizer keeps it at higher precision).
// Tokenizers: a SentencePiece model as GGUF "llama" (pieces, scores, types, no added space prefix); an HF
// tokenizer.json byte-level BPE as GGUF "gpt2" (tokens, merges, and the pre-tokenizer llama.cpp should use).
#pragma once

#include <string>

#include "model/gguf_writer.h"
#include "model/model_dir.h"
#include "model/transformer.h"

namespace dsopen::inference {

// "f32" | "f16" | "bf16" | "q8_0" | "q4_0"; a usage error naming `flag` for anything else.
model::gguf::TensorType gguf_type(const std::string& name, const std::string& flag = "--type");

// Usage errors, before any weight is read: a family, rope scaling or MoE layout llama.cpp cannot run (naming the
// config key).
void check_gguf_exportable(const model::ModelConfig& config);

// Writes `model` (loaded from `source`, with `adapter` merged when not empty) to `path` as GGUF. Usage errors: those of
// check_gguf_exportable, a tokenizer larger than the vocabulary.
void export_gguf(model::CausalLM& model, const model::ModelDir& source, const std::string& adapter,
                 const std::string& path, model::gguf::TensorType type);

}  // namespace dsopen::inference
