"""Differential test of config.json parsing against transformers: no key that changes the math may be accepted
and ignored. For each variant of a Llama, Qwen2, DeepSeek-V2, DeepSeek-V3, GLM-4, Qwen-MoE and Mixtral config (keys real checkpoints carry,
set to values that change the computation), transformers builds and saves a random model; dsopen-eval must then
either refuse the directory with an error naming the key, or give transformers' logits (relative error < 1e-4).
Usage: diff_config.py BIN_DIR"""
import json, os, subprocess, sys, tempfile

import torch
import transformers as tf
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import randomize_extras, write_token_rows  # noqa: E402

BIN = sys.argv[1]
torch.manual_seed(0)

DENSE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)
MLA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
           max_position_embeddings=256, initializer_range=0.1, n_group=4, topk_group=2)
LLAMA, QWEN, V2, V3 = ((tf.LlamaConfig, tf.LlamaForCausalLM), (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                       (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM), (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM))
QWEN3 = (tf.Qwen3Config, tf.Qwen3ForCausalLM)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256, "rope_theta": 1e4}
GLM4, QWEN2_MOE, QWEN3_MOE, MIXTRAL = ((tf.Glm4Config, tf.Glm4ForCausalLM), (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
                                       (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
                                       (tf.MixtralConfig, tf.MixtralForCausalLM))
QMOE = dict(DENSE, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=48)

# (name, family, config kwargs, rope parameters or None, key dsopen may refuse it by (None: must load and match)).
# Keys config.json files leave out are dropped after saving (`_drop`, dotted for rope_parameters), values transformers
# would refuse at construction are written after saving (`_set`).
CASES = [
    ("llama plain", LLAMA, DENSE, None, None),
    ("llama mlp_bias", LLAMA, dict(DENSE, mlp_bias=True), None, "mlp_bias"),
    ("llama attention_bias", LLAMA, dict(DENSE, attention_bias=True), None, None),
    ("llama head_dim 32", LLAMA, dict(DENSE, head_dim=32), None, None),
    ("llama pretraining_tp 2", LLAMA, dict(DENSE, pretraining_tp=2), None, None),
    ("llama tied embeddings", LLAMA, dict(DENSE, tie_word_embeddings=True), None, None),
    ("llama rope_theta 5e5, eps 1e-5", LLAMA, dict(DENSE, rms_norm_eps=1e-5), {"rope_type": "default", "rope_theta": 5e5}, None),
    ("llama eos list", LLAMA, dict(DENSE, eos_token_id=[2, 3]), None, None),
    ("llama rope linear", LLAMA, DENSE, {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, None),
    ("llama rope llama3", LLAMA, DENSE, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                         "rope_theta": 1e4}, None),
    ("llama rope dynamic", LLAMA, DENSE, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, None),
    ("llama rope longrope", LLAMA, DENSE, {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4,
                                           "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                           "original_max_position_embeddings": 64}, "rope_type"),
    ("qwen2 plain", QWEN, DENSE, None, None),
    ("qwen2 sliding window on", QWEN, dict(DENSE, use_sliding_window=True, sliding_window=8, max_window_layers=0),
     None, "sliding"),
    ("qwen2 sliding window off", QWEN, dict(DENSE, use_sliding_window=False, sliding_window=8, max_window_layers=0),
     None, None),
    ("v2 group_limited_greedy", V2, dict(MLA, q_lora_rank=None, topk_method="group_limited_greedy"), None, None),
    ("v2 greedy scaled", V2, dict(MLA, q_lora_rank=24, topk_method="greedy", n_group=1, topk_group=1,
                                  routed_scaling_factor=2.0), None, None),
    ("v2 attention_bias", V2, dict(MLA, q_lora_rank=24, attention_bias=True), None, "attention_bias"),
    ("v2 mlp_bias", V2, dict(MLA, q_lora_rank=24, mlp_bias=True), None, "mlp_bias"),
    ("v3 plain", V3, dict(MLA, q_lora_rank=24, norm_topk_prob=True, routed_scaling_factor=2.5), None, None),
    ("v3 rope_interleave false", V3, dict(MLA, q_lora_rank=24, norm_topk_prob=True, rope_interleave=False), None, None),
    ("v3 attention_bias", V3, dict(MLA, q_lora_rank=24, attention_bias=True), None, "attention_bias"),
    ("v3 no norm_topk_prob", V3, dict(MLA, q_lora_rank=None, norm_topk_prob=False), None, None),
    ("v3 all dense", V3, dict(MLA, q_lora_rank=24, first_k_dense_replace=3), None, None),
    ("llama yarn", LLAMA, DENSE, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                  "rope_theta": 1e4}, None),
    ("llama yarn mscale pair", LLAMA, DENSE, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                              "mscale": 1.0, "mscale_all_dim": 0.5, "rope_theta": 1e4}, None),
    ("llama yarn attention_factor", LLAMA, DENSE, {"rope_type": "yarn", "factor": 4.0, "attention_factor": 2.0,
                                                   "original_max_position_embeddings": 64, "rope_theta": 1e4}, None),
    ("llama yarn truncate false", LLAMA, DENSE, {"rope_type": "yarn", "factor": 4.0, "truncate": False,
                                                 "original_max_position_embeddings": 64, "rope_theta": 1e4}, None),
    ("llama rope_type and type disagree", LLAMA, DENSE, {"rope_type": "yarn", "type": "default", "factor": 4.0,
                                                         "original_max_position_embeddings": 64, "rope_theta": 1e4}, "type"),
    ("llama partial rotary", LLAMA, DENSE, {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial_rotary_factor"),
    ("glm4 partial rotary 0.25", GLM4, dict(DENSE, head_dim=32, pad_token_id=0, eos_token_id=1),
     {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}, None),
    ("glm4 no attention bias", GLM4, dict(DENSE, head_dim=16, pad_token_id=0, eos_token_id=1, attention_bias=False),
     None, None),
    ("qwen2_moe norm_topk_prob, dense layer 1", QWEN2_MOE, dict(QMOE, norm_topk_prob=True, mlp_only_layers=[1]),
     None, None),
    ("qwen2_moe qkv_bias false", QWEN2_MOE, dict(QMOE, qkv_bias=False), None, None),
    ("qwen2_moe sliding window on", QWEN2_MOE, dict(QMOE, use_sliding_window=True, sliding_window=8), None, "sliding"),
    ("qwen3_moe sparse step 2", QWEN3_MOE, dict(QMOE, head_dim=16, decoder_sparse_step=2, norm_topk_prob=True),
     None, None),
    ("mixtral sliding window 8", MIXTRAL, dict(DENSE, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
     None, "sliding_window"),
    ("mixtral top-1", MIXTRAL, dict(DENSE, num_local_experts=4, num_experts_per_tok=1), None, None),
    ("qwen3 head_dim absent: 128, as transformers' default", QWEN3, dict(DENSE, head_dim=128, _drop=["head_dim"]),
     None, None),
    ("glm4 head_dim absent: 128", GLM4, dict(DENSE, head_dim=128, pad_token_id=0, eos_token_id=1, _drop=["head_dim"]),
     None, None),
    ("qwen3 llama3 rope without original_max_position_embeddings", QWEN3,
     dict(DENSE, head_dim=16, _drop=["rope_parameters.original_max_position_embeddings"]), LLAMA3_ROPE, None),
    ("qwen3 yarn without original_max_position_embeddings", QWEN3,
     dict(DENSE, head_dim=16, max_position_embeddings=64, _drop=["rope_parameters.original_max_position_embeddings"]),
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}, None),
    ("qwen3 yarn mscale without mscale_all_dim", QWEN3, dict(DENSE, head_dim=16),
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707, "rope_theta": 1e4},
     "mscale"),
    ("llama rope llama3 without low_freq_factor", LLAMA, dict(DENSE, _drop=["rope_parameters.low_freq_factor"]),
     LLAMA3_ROPE, "low_freq_factor"),
    ("qwen3_moe mlp_only_layers as strings", QWEN3_MOE,
     dict(QMOE, head_dim=16, mlp_only_layers=[0], _set={"mlp_only_layers": ["0"]}), None, "mlp_only_layers"),
    ("v3 softmax scoring", V3, dict(MLA, q_lora_rank=24, scoring_func="softmax"), None, "scoring_func"),
    ("v3 yarn", V3, dict(MLA, q_lora_rank=24, norm_topk_prob=True),
     {"rope_type": "yarn", "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 1e4}, None),
]


def main():
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        ids = torch.randint(0, 256, (2, 40))
        tokens = os.path.join(tmp, "tokens.txt")
        write_token_rows(tokens, ids)
        for i, (name, (cfg_cls, model_cls), kw, rope, refuse_key) in enumerate(CASES):
            kw = dict(kw)
            drop, overwrite = kw.pop("_drop", []), kw.pop("_set", {})
            cfg = cfg_cls(**kw)
            if rope is not None:
                cfg.rope_parameters = rope
            model = model_cls(cfg).eval()
            randomize_extras(model, bias_std=0.1)  # biases that matter
            with torch.no_grad():
                ref = model(ids).logits
            d = os.path.join(tmp, f"case{i}")
            model.save_pretrained(d, safe_serialization=True)
            if drop or overwrite:
                path = os.path.join(d, "config.json")
                with open(path) as f:
                    j = json.load(f)
                for key in drop:
                    parent, _, leaf = key.rpartition(".")
                    (j[parent] if parent else j).pop(leaf, None)
                j.update(overwrite)
                with open(path, "w") as f:
                    json.dump(j, f)
            out = os.path.join(tmp, f"case{i}.safetensors")
            r = subprocess.run([os.path.join(BIN, "dsopen-eval"), "--model", d, "--tokens", tokens, "--dump-logits", out],
                               capture_output=True, text=True)
            if r.returncode != 0:
                msg = r.stderr.strip()
                # Config errors come together, one per line, each naming file:line and key.
                ok = refuse_key is not None and refuse_key in msg.splitlines()[0] and "config.json:" in msg
                ok = ok and len(set(msg.splitlines())) == len(msg.splitlines())
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {name}: refused: {msg}")
                continue
            ours = load_file(out)["logits"]
            rel = ((ours - ref).abs().max() / ref.abs().max()).item()
            ok = rel < 1e-4 and bool((ours.argmax(-1) == ref.argmax(-1)).all())
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name}: loaded, max relative error {rel:.1e}")
    print(f"{len(CASES) - failures} of {len(CASES)} agree")
    sys.exit(1 if failures else 0)


main()
