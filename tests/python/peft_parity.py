"""Parity with HuggingFace peft: LoRA adapters move between dsopen and peft with the same logits.

For random tiny transformers models (DeepSeek-V3 with and without q_lora, Llama with GQA, GLM-4, Qwen3,
Qwen2-MoE, Mixtral), saved with
save_pretrained as the base:
  ours -> peft   dsopen-train fine-tunes LoRA adapters on the shipped chat set for a few steps; peft loads the
                 checkpoint directory (adapter_config.json + adapter_model.safetensors) onto the transformers base
                 and must give dsopen-eval --adapter's logits; the base merged by dsopen-convert --adapter, loaded
                 in transformers, must give them too.
  peft -> ours   peft creates and saves an adapter (per-module ranks and alphas, rsLoRA, LoRA on fused routed
                 experts); dsopen-eval --adapter must give peft's logits.
Tolerance: max |ours - peft| / max |peft| < 1e-4 and the same argmax. Usage: peft_parity.py BIN_DIR [CASE ...]"""
import json, os, subprocess, sys, tempfile

import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

BIN = sys.argv[1]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.manual_seed(0)

MLA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
           max_position_embeddings=256, initializer_range=0.1, n_group=4, topk_group=2, norm_topk_prob=True)
DENSE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)
V3_ATTN = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GLM_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
QWEN_MOE = dict(DENSE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=48)

# name: (config class, model class, kwargs, our lora: section, peft LoraConfig kwargs)
CASES = {
    "v3_attention_patterns": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, dict(MLA, q_lora_rank=24),
                              {"r": 4, "alpha": 8, "target_modules": V3_ATTN, "rank_pattern": {"kv_b_proj": 6},
                               "alpha_pattern": {"o_proj": 24}},
                              dict(r=4, lora_alpha=8, target_modules=V3_ATTN, rank_pattern={"kv_b_proj": 6},
                                   alpha_pattern={"o_proj": 24})),
    "v3_no_qlora_rslora_regex": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, dict(MLA, q_lora_rank=None),
                                 {"r": 8, "alpha": 4, "use_rslora": True,
                                  "target_modules": r"model\.layers\.1\.self_attn\.(q_proj|kv_b_proj|o_proj)"},
                                 dict(r=8, lora_alpha=4, use_rslora=True,
                                      target_modules=r"model\.layers\.1\.self_attn\.(q_proj|kv_b_proj|o_proj)")),
    # Routed experts: transformers >= 5 fuses them (gate_up_proj, down_proj tensors) and peft adapts those tensors,
    # and only those, when asked for gate_proj / up_proj / down_proj. Our per-expert adapter (the per-expert HF
    # checkpoint names) is converted by peft on load; peft's fused adapter is split per expert by ours.
    "v3_routed_experts": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, dict(MLA, q_lora_rank=24),
                          {"r": 4, "alpha": 8, "routed_experts": True,
                           "target_modules": r"model\.layers\.1\.mlp\.experts\.[0-9]+\.(gate_proj|up_proj|down_proj)"},
                          dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])),
    "llama_gqa_all_projections": (tf.LlamaConfig, tf.LlamaForCausalLM, DENSE,
                                  {"r": 4, "alpha": 16, "target_modules": LLAMA_ALL},
                                  dict(r=4, lora_alpha=16, target_modules=LLAMA_ALL)),
    "glm4_fused_gate_up": (tf.Glm4Config, tf.Glm4ForCausalLM, dict(DENSE, head_dim=16, pad_token_id=0, eos_token_id=[1, 2]),
                           {"r": 4, "alpha": 8, "target_modules": GLM_ALL},
                           dict(r=4, lora_alpha=8, target_modules=GLM_ALL)),
    "qwen3_qk_norm": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(DENSE, head_dim=16),
                      {"r": 4, "alpha": 8, "target_modules": LLAMA_ALL},
                      dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL)),
    # Routed experts left out on our side; the shared expert and its gate are ordinary projections.
    "qwen2_moe_shared_expert": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, QWEN_MOE,
                                {"r": 4, "alpha": 8, "target_modules": ATTN + ["shared_expert_gate", "down_proj"]},
                                dict(r=4, lora_alpha=8, target_modules=ATTN + ["shared_expert_gate"])),
    "mixtral_attention": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(DENSE, num_local_experts=4, num_experts_per_tok=2),
                          {"r": 4, "alpha": 8, "target_modules": ATTN},
                          dict(r=4, lora_alpha=8, target_modules=ATTN)),
}
if len(sys.argv) > 2:
    CASES = {k: v for k, v in CASES.items() if k in sys.argv[2:]}


def run(args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{os.path.basename(args[0])} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-2000:]}")
    return r.stdout


def ours_logits(model_dir, adapter, tokens, out):
    args = [os.path.join(BIN, "dsopen-eval"), "--model", model_dir, "--tokens", tokens, "--dump-logits", out]
    if adapter:
        args += ["--adapter", adapter]
    run(args)
    return load_file(out)["logits"]


def compare(name, what, ours, ref):
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    same = bool((ours.argmax(-1) == ref.argmax(-1)).all())
    ok = rel < 1e-4 and same
    print(f"{'ok  ' if ok else 'FAIL'} {name} {what}: max relative error {rel:.2e} "
          f"(max abs {(ours - ref).abs().max().item():.2e}), argmax identical: {same}")
    return ok


failures, checks = 0, 0
with tempfile.TemporaryDirectory() as tmp:
    tok = os.path.join(tmp, "tok.model")
    run([os.path.join(BIN, "dsopen-tokenizer"), "train", "--input", "/usr/share/games/fortunes/fortunes",
         "--vocab-size", "500", "--character-coverage", "0.999", "--output", tok])
    ids = torch.randint(0, 500, (2, 24))
    tokens = os.path.join(tmp, "tokens.txt")
    with open(tokens, "w") as f:
        for row in ids.tolist():
            f.write(" ".join(map(str, row)) + "\n")

    for name, (cfg_cls, model_cls, kw, ours_lora, peft_kw) in CASES.items():
        base_dir = os.path.join(tmp, name)
        model_cls(cfg_cls(**kw)).eval().save_pretrained(base_dir, safe_serialization=True)
        load_base = lambda: model_cls.from_pretrained(base_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            base_ref = load_base()(ids).logits

        # ours -> peft: a few training steps so that B is not zero.
        try:
            run_dir = os.path.join(tmp, name + "_run")
            cfg = {
                "run": {"name": name, "output_dir": run_dir, "seed": 3, "log_every": 1, "threads": 2},
                "model": {"pretrained": base_dir},
                "tokenizer": {"path": tok},
                "data": {"format": "sft", "train": [os.path.join(REPO, "configs/data/chat.jsonl")], "seq_len": 48},
                "train": {"max_steps": 3, "micro_batch_size": 4, "lr": 2e-2, "min_lr": 2e-2, "warmup_steps": 0,
                          "schedule": "constant"},
                "checkpoint": {"every": 0},
                "lora": dict(ours_lora, enabled=True),
            }
            cfg_path = os.path.join(tmp, name + ".yaml")
            with open(cfg_path, "w") as f:
                json.dump(cfg, f)  # JSON is YAML
            run([os.path.join(BIN, "dsopen-train"), "--config", cfg_path])
            ck = os.path.join(run_dir, "checkpoints", open(os.path.join(run_dir, "checkpoints", "latest")).read().strip())
            ours = ours_logits(base_dir, ck, tokens, os.path.join(tmp, name + "_ours.safetensors"))
            moved = ((ours - base_ref).abs().max() / base_ref.abs().max()).item()
            with torch.no_grad():
                peft_model = PeftModel.from_pretrained(load_base(), ck).eval()
                ref = peft_model(ids).logits
            checks += 1
            ok = compare(name, f"ours -> peft (the adapter moves the logits by {moved:.1e})", ours, ref) and moved > 1e-3
            failures += not ok
            merged_dir = os.path.join(tmp, name + "_merged")
            run([os.path.join(BIN, "dsopen-convert"), "--model", base_dir, "--adapter", ck, "--out", merged_dir])
            with torch.no_grad():
                merged = model_cls.from_pretrained(merged_dir, dtype=torch.float32).eval()(ids).logits
            checks += 1
            failures += not compare(name, "merged by dsopen-convert --adapter, in transformers", merged, ref)
        except Exception as e:  # report and go on with the other cases
            checks += 1
            failures += 1
            print(f"FAIL {name} ours -> peft: {e}")

        # peft -> ours
        try:
            torch.manual_seed(1)
            pm = get_peft_model(load_base(), LoraConfig(task_type="CAUSAL_LM", **peft_kw))
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0.0, 0.05)
            pm.eval()
            adapter_dir = os.path.join(tmp, name + "_peft")
            pm.save_pretrained(adapter_dir)
            with torch.no_grad():
                ref = pm(ids).logits
            ours = ours_logits(base_dir, adapter_dir, tokens, os.path.join(tmp, name + "_from_peft.safetensors"))
            moved = ((ref - base_ref).abs().max() / base_ref.abs().max()).item()
            checks += 1
            failures += not (compare(name, f"peft -> ours (the adapter moves the logits by {moved:.1e})", ours, ref)
                             and moved > 1e-3)
        except Exception as e:
            checks += 1
            failures += 1
            print(f"FAIL {name} peft -> ours: {e}")

print(f"{checks - failures} passed, {failures} failed")
sys.exit(1 if failures else 0)
