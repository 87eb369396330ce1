#!/usr/bin/env python3
"""dsopen-convert --format gguf, read back with the `gguf` package (llama.cpp's own Python reader).

Three small models are trained for two steps and exported: a DeepSeek-V3-style model (MLA, MoE, MTP), a Llama-style
model with grouped-query attention and a Qwen3 model (q/k norms). For each:
  - the metadata is llama.cpp's: architecture, hyper-parameters under its keys, the SentencePiece vocabulary (pieces,
    scores, types) equal to the `sentencepiece` library's view of the tokenizer, special ids, no added space prefix,
    and the chat template of the HF export;
  - every tensor name is the one gguf's own TensorNameMap gives the HF tensor (experts merged, MTP left out,
    kv_b_proj split into attn_k_b / attn_v_b), with llama.cpp's shapes;
  - f32 tensors equal the HF export's weights after the documented re-layouts (computed here independently: q/k
    rows to adjacent rope pairs for Llama, per-head k_b transposed, experts stacked); f16 and bf16 equal torch's
    casts; q8_0 and q4_0 blocks are byte-identical to gguf.quants.quantize (the numpy port of ggml's reference
    quantizers), 1-D tensors and the router stay f32, and q4_0 keeps the output head in q8_0.
Bad input: a family llama.cpp does not run, an unknown --type, --dtype with gguf, an output inside the model.

Usage: gguf_export.py BIN_DIR
"""
import json
import os
import sys

import numpy as np
import sentencepiece as spm
import torch
from gguf import GGUFReader, GGMLQuantizationType as Q, quants
from gguf.constants import MODEL_ARCH_NAMES, MODEL_ARCH
from gguf.tensor_mapping import get_tensor_name_map
from safetensors.torch import load_file
from harness import Harness

H = Harness(sys.argv[1], "dsopen-gguf-")
W, b, run, must, check = H.work, H.b, H.run, H.must, H.check
FORTUNES = "/usr/share/games/fortunes/fortunes"


must([b("tokenizer"), "train", FORTUNES, "--vocab-size", "600", "--character-coverage", "0.999",
      "--user-symbols", "<|User|>,<|Assistant|>", "--output", os.path.join(W, "tok.model")])
MODELS = {
    "v3": "{flavor: debug, vocab_size: 600, use_mtp: true}",
    "llama": "{flavor: tiny-dense, vocab_size: 640, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
             "num_attention_heads: 4, num_key_value_heads: 2}",
    "qwen3": "{flavor: qwen3-8b, vocab_size: 600, hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, "
             "num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, tie_word_embeddings: true, "
             "bos_token_id: 1, eos_token_id: 2}",
}
for name, model in MODELS.items():
    with open(os.path.join(W, f"{name}.yaml"), "w") as f:
        f.write(f"""run: {{name: {name}, output_dir: {W}/{name}, seed: 3, log_every: 1, threads: 2}}
model: {model}
tokenizer: {{path: {W}/tok.model}}
data:
  train: [{W}/shards/f_*.bin]
  seq_len: 32
  build: {{inputs: [{FORTUNES}], output: {W}/shards/f, doc_separator: "%"}}
train: {{max_steps: 2, micro_batch_size: 2, lr: 1.0e-2}}
checkpoint: {{every: 2}}
""")
    must([b("train"), "--config", os.path.join(W, f"{name}.yaml")])
    must([b("convert"), "--model", os.path.join(W, name), "--out", os.path.join(W, f"{name}-hf")])

sp = spm.SentencePieceProcessor(model_file=os.path.join(W, "tok.model"))


def meta(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    if len(f.types) > 1 or f.types[0].name == "ARRAY":  # arrays
        return [f.contents(i) for i in range(len(f.data))]
    return f.contents()


def half_to_pairs(w, heads):  # convert_hf_to_gguf.py LlamaModel.permute, written again from its description
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(name, cfg, hf):
    """GGUF name -> float32 array in torch order, computed from the HF export with gguf's own name map."""
    arch = {"deepseek_v3": MODEL_ARCH.DEEPSEEK2, "llama": MODEL_ARCH.LLAMA, "qwen3": MODEL_ARCH.QWEN3}[cfg["model_type"]]
    L = cfg["num_hidden_layers"]
    nmap = get_tensor_name_map(arch, L)
    out, experts = {}, {}
    for hf_name, t in hf.items():
        t = t.float().numpy()
        if hf_name.startswith("model.layers.") and int(hf_name.split(".")[2]) >= L:
            continue  # MTP
        if ".mlp.experts." in hf_name:
            layer, e, proj = hf_name.split(".")[2], int(hf_name.split(".")[5]), hf_name.split(".")[6]
            experts.setdefault((layer, proj), {})[e] = t
            continue
        if hf_name.endswith("kv_b_proj.weight"):
            layer = hf_name.split(".")[2]
            H, nope, v, r = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
            kv = t.reshape(H, nope + v, r)
            out[f"blk.{layer}.attn_k_b.weight"] = np.ascontiguousarray(kv[:, :nope].transpose(0, 2, 1))
            out[f"blk.{layer}.attn_v_b.weight"] = np.ascontiguousarray(kv[:, nope:])
            continue
        # as llama.cpp's converter renames it before mapping (conversion/base.py)
        g = nmap.get_name(hf_name.replace("e_score_correction_bias", "e_score_correction.bias"),
                          try_suffixes=(".weight", ".bias"))
        assert g is not None, hf_name
        if arch == MODEL_ARCH.LLAMA and ".q_proj." in hf_name:
            t = half_to_pairs(t, cfg["num_attention_heads"])
        if arch == MODEL_ARCH.LLAMA and ".k_proj." in hf_name:
            t = half_to_pairs(t, cfg["num_key_value_heads"])
        out[g] = t
    for (layer, proj), per in experts.items():
        g = nmap.get_name(f"model.layers.{layer}.mlp.experts.{proj}.weight", try_suffixes=(".weight",))
        out[g] = np.stack([per[e] for e in sorted(per)])
    if cfg.get("tie_word_embeddings"):
        out.pop("output.weight", None)
    return out


def dequantized(t):
    return quants.dequantize(t.data, t.tensor_type).reshape(list(reversed([int(x) for x in t.shape])))


for name in MODELS:
    hf_dir = os.path.join(W, f"{name}-hf")
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    hf = load_file(os.path.join(hf_dir, "model.safetensors"))
    expected = expected_tensors(name, cfg, hf)
    tok_config = json.load(open(os.path.join(hf_dir, "tokenizer_config.json")))
    for typ in ("f32", "f16", "bf16", "q8_0", "q4_0"):
        path = os.path.join(W, f"{name}-{typ}.gguf")
        must([b("convert"), "--model", os.path.join(W, name), "--format", "gguf", "--type", typ, "--out", path])
        r = GGUFReader(path)
        tensors = {t.name: t for t in r.tensors}
        arch = meta(r, "general.architecture")
        if typ == "f32":
            want_arch = {"v3": "deepseek2", "llama": "llama", "qwen3": "qwen3"}[name]
            check(arch == want_arch and meta(r, f"{arch}.block_count") == cfg["num_hidden_layers"] and
                  meta(r, f"{arch}.embedding_length") == cfg["hidden_size"] and
                  meta(r, f"{arch}.attention.head_count") == cfg["num_attention_heads"] and
                  meta(r, f"{arch}.vocab_size") == cfg["vocab_size"],
                  f"{name}: architecture {arch} and its sizes")
            pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
            # user-defined chat markers "<|...|>" are written as control tokens, as llama.cpp reads them anyway
            types = [3 if sp.is_control(i) or pieces[i] in ("<|User|>", "<|Assistant|>") else 2 if sp.is_unknown(i)
                     else 6 if sp.is_byte(i) else 1 for i in range(len(pieces))]
            n = len(pieces)
            V = cfg["vocab_size"]
            tokens, scores, ttypes = meta(r, "tokenizer.ggml.tokens"), meta(r, "tokenizer.ggml.scores"), \
                meta(r, "tokenizer.ggml.token_type")
            check(meta(r, "tokenizer.ggml.model") == "llama" and tokens[:n] == pieces and len(tokens) == V and
                  all(t == f"[PAD{i}]" for i, t in enumerate(tokens) if i >= n) and
                  np.allclose(scores[:n], [sp.get_score(i) for i in range(n)]) and ttypes[:n] == types and
                  all(t == 5 for t in ttypes[n:]),
                  f"{name}: the SentencePiece vocabulary ({n} pieces, {V - n} unused rows up to vocab_size)")
            check((meta(r, "tokenizer.ggml.bos_token_id"), meta(r, "tokenizer.ggml.eos_token_id"),
                   meta(r, "tokenizer.ggml.add_bos_token"), meta(r, "tokenizer.ggml.add_space_prefix")) ==
                  (sp.bos_id(), sp.eos_id(), True, False), f"{name}: special ids, BOS added, no space prefix")
            check(meta(r, "tokenizer.chat_template") == tok_config["chat_template"],
                  f"{name}: the chat template is the HF export's")
            if arch == "deepseek2":
                check((meta(r, "deepseek2.attention.kv_lora_rank"), meta(r, "deepseek2.attention.q_lora_rank"),
                       meta(r, "deepseek2.attention.key_length_mla"), meta(r, "deepseek2.expert_count"),
                       meta(r, "deepseek2.expert_used_count"), meta(r, "deepseek2.leading_dense_block_count"),
                       meta(r, "deepseek2.expert_gating_func"), meta(r, "deepseek2.attention.head_count_kv")) ==
                      (cfg["kv_lora_rank"], cfg["q_lora_rank"], cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"],
                       cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["first_k_dense_replace"],
                       2 if cfg["scoring_func"] == "sigmoid" else 1, 1), f"{name}: MLA and MoE keys")
            check(set(tensors) == set(expected),
                  f"{name}: tensor names are gguf's TensorNameMap names ({sorted(set(tensors) ^ set(expected))[:6]})")
            bad = [g for g, t in tensors.items() if g in expected and
                   not np.array_equal(dequantized(t), expected[g])]
            check(not bad, f"{name}: f32 tensors equal the HF weights after llama.cpp's re-layouts ({bad[:4]})")
            continue
        bad, wrong_type = [], []
        for g, t in tensors.items():
            want = expected.get(g)
            if want is None:
                bad.append(g)
                continue
            kind = Q.F32 if want.ndim == 1 or "ffn_gate_inp" in g else \
                {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[typ]
            if kind in (Q.Q8_0, Q.Q4_0) and want.shape[-1] % 32:
                kind = Q.F16
            if kind == Q.Q4_0 and g == "output.weight":
                kind = Q.Q8_0
            if t.tensor_type != kind:
                wrong_type.append((g, t.tensor_type.name, kind.name))
                continue
            if kind == Q.F32:
                ok = np.array_equal(dequantized(t), want)
            elif kind == Q.F16:
                ok = np.array_equal(dequantized(t), want.astype(np.float16).astype(np.float32))
            elif kind == Q.BF16:
                ok = np.array_equal(dequantized(t), torch.from_numpy(want).bfloat16().float().numpy())
            else:
                ok = np.array_equal(np.asarray(t.data).reshape(-1), quants.quantize(want, kind).reshape(-1))
            if not ok:
                bad.append(g)
        check(not bad and not wrong_type and len(tensors) == len(expected),
              f"{name} {typ}: {len(tensors)} tensors of the right type and bytes ({bad[:3]} {wrong_type[:3]})")

# --- bad input ------------------------------------------------------------------------------------------------------
def one_error(args, needle, what):
    r = run(args)
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    check(r.returncode in (1, 2) and len(errors) == 1 and needle in errors[0], f"{what}: {errors}")


with open(os.path.join(W, "glm.yaml"), "w") as f:
    f.write(open(os.path.join(W, "qwen3.yaml")).read().replace("flavor: qwen3-8b", "flavor: glm4-9b, pad_token_id: 0")
            .replace(f"{W}/qwen3", f"{W}/glm"))
must([b("train"), "--config", os.path.join(W, "glm.yaml")])
one_error([b("convert"), "--model", os.path.join(W, "glm"), "--format", "gguf", "--out", os.path.join(W, "glm.gguf")],
          "model_type", "a family llama.cpp does not run")
check(not os.path.exists(os.path.join(W, "glm.gguf")), "... and writes nothing")
one_error([b("convert"), "--model", os.path.join(W, "v3"), "--format", "gguf", "--type", "q5_k", "--out",
           os.path.join(W, "x.gguf")], "--type", "an unknown --type")
one_error([b("convert"), "--model", os.path.join(W, "v3"), "--format", "gguf", "--dtype", "bf16", "--out",
           os.path.join(W, "x.gguf")], "--dtype", "--dtype with --format gguf")
one_error([b("convert"), "--model", os.path.join(W, "v3"), "--format", "gguf", "--out",
           os.path.join(W, "v3", "checkpoints")], "--out", "an output that is the model's directory")
one_error([b("convert"), "--model", os.path.join(W, "v3"), "--format", "gguf", "--out", os.path.join(W, "exported")],
          ".gguf", "an output name without .gguf (a directory was probably meant)")
nested = os.path.join(W, "new", "dir", "v3.gguf")
must([b("convert"), "--model", os.path.join(W, "v3"), "--format", "gguf", "--out", nested])
check(os.path.getsize(nested) > 0, "the output's directory is created, as for an HF export")

H.finish()
