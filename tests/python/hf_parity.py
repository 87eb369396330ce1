"""Parity with HuggingFace transformers: random tiny models of every supported architecture (and every rope scaling
type) are saved with save_pretrained (fp32), dsopen-eval dumps its logits for the same tokens, and both must agree
at every position (relative error <= 1e-5, identical argmax); dsopen-convert's export of each, loaded back in
transformers, must give the same logits. Usage: hf_parity.py BIN_DIR [CASE ...]"""
import json, os, subprocess, sys, tempfile

import torch
from safetensors.torch import load_file
import transformers as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import randomize_extras, write_token_rows  # noqa: E402

BIN = sys.argv[1]
torch.manual_seed(0)

MLA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
           max_position_embeddings=256, initializer_range=0.1)
YARN = {"rope_type": "yarn", "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
DENSE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, initializer_range=0.1)

# Families with biases, q/k norms or post-norms get random biases and norm weights (HF initialises them to 0 and 1,
# which would hide a bias or a norm in the wrong place).
EXTRAS = dict(bias_std=0.1, norm_std=0.2)
GLM = dict(DENSE, num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=[1, 2])
CASES = {
    "llama_gqa": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(DENSE, num_key_value_heads=2)),
    "llama_mha_bias": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(DENSE, num_key_value_heads=4, attention_bias=True)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(DENSE, num_key_value_heads=2)),
    "v2_group_limited_softmax": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM,
                                 dict(MLA, q_lora_rank=None, n_group=4, topk_group=2, topk_method="group_limited_greedy")),
    "v2_qlora_greedy_yarn": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM,
                             dict(MLA, q_lora_rank=24, topk_method="greedy", n_group=1, topk_group=1,
                                  rope_scaling=YARN)),
    "v3_sigmoid_noaux_tc_yarn": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
                                 dict(MLA, q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
                                      routed_scaling_factor=2.5, rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0))),
    "v3_no_qlora": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
                    dict(MLA, q_lora_rank=None, n_group=2, topk_group=1, norm_topk_prob=True)),
    # Rope scaling types on a Llama (head_dim 16: wavelengths on both sides of the llama3 thresholds).
    "llama3_rope": (tf.LlamaConfig, tf.LlamaForCausalLM,
                    dict(DENSE, num_key_value_heads=2,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_linear_rope": (tf.LlamaConfig, tf.LlamaForCausalLM,
                          dict(DENSE, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # 40 tokens past max_position_embeddings 32: the base grows for this forward pass.
    "llama_dynamic_rope": (tf.LlamaConfig, tf.LlamaForCausalLM,
                           dict(DENSE, num_key_value_heads=2, max_position_embeddings=32,
                                rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "glm": (tf.GlmConfig, tf.GlmForCausalLM, GLM),
    "glm4": (tf.Glm4Config, tf.Glm4ForCausalLM, GLM),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(DENSE, num_key_value_heads=2, head_dim=16)),
    "qwen3_bias": (tf.Qwen3Config, tf.Qwen3ForCausalLM,
                   dict(DENSE, num_key_value_heads=1, head_dim=24, attention_bias=True)),
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                  dict(DENSE, num_hidden_layers=3, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[0])),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  dict(DENSE, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, num_experts=8,
                       num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2)),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                dict(DENSE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
}
EXTRA_CASES = {"glm", "glm4", "qwen3", "qwen3_bias", "qwen2_moe", "qwen3_moe"}
if len(sys.argv) > 2:
    CASES = {k: v for k, v in CASES.items() if k in sys.argv[2:]}

failures = 0
with tempfile.TemporaryDirectory() as tmp:
    ids = torch.randint(0, 256, (2, 40))
    tokens = os.path.join(tmp, "tokens.txt")
    write_token_rows(tokens, ids)
    for name, (cfg_cls, model_cls, kw) in CASES.items():
        kw = dict(kw)
        rope = kw.pop("rope_scaling", None)
        cfg = cfg_cls(**kw)
        if rope is not None:  # transformers 5 keeps rope settings in rope_parameters
            cfg.rope_parameters = dict(rope, rope_theta=10000.0)
        model = model_cls(cfg).eval()
        randomize_extras(model, **(EXTRAS if name in EXTRA_CASES else {}))
        with torch.no_grad():
            ref = model(ids).logits
        d = os.path.join(tmp, name)
        model.save_pretrained(d, safe_serialization=True)
        out = os.path.join(tmp, name + ".safetensors")
        r = subprocess.run([os.path.join(BIN, "dsopen-eval"), "--model", d, "--tokens", tokens, "--dump-logits", out],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"FAIL {name}: dsopen-eval exited {r.returncode}: {r.stderr.strip()}")
            failures += 1
            continue
        ours = load_file(out)["logits"]
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        same_argmax = bool((ours.argmax(-1) == ref.argmax(-1)).all())
        ok = rel <= 1e-5 and same_argmax
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max relative error {rel:.2e}, argmax identical: {same_argmax}")
        # Round trip: load in dsopen, write an HF directory (sharded), load that in transformers: same logits.
        exported = os.path.join(tmp, name + "_exported")
        r = subprocess.run([os.path.join(BIN, "dsopen-convert"), "--model", d, "--out", exported, "--max-shard-mb", "0.05"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"FAIL {name} export: {r.stderr.strip()}")
            failures += 1
            continue
        with torch.no_grad():
            again = model_cls.from_pretrained(exported, dtype=torch.float32).eval()(ids).logits
        rt = ((again - ref).abs().max() / ref.abs().max()).item()
        sharded = os.path.exists(os.path.join(exported, "model.safetensors.index.json"))
        ok = rt < 1e-6 and sharded
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name} round trip through dsopen-convert (sharded: {sharded}): {rt:.2e}")
print(f"{2 * len(CASES) - failures} passed, {failures} failed")
sys.exit(1 if failures else 0)
