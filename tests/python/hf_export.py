#!/usr/bin/env python3
"""An exported model directory is complete for transformers users.

A dsopen run (SentencePiece tokenizer with chat markers, a DeepSeek-V3-style model with MTP) is exported with
dsopen-convert, then read with transformers:
  - AutoTokenizer gives the ids dsopen gives (BOS first) on every paragraph of the fortunes corpus, Chinese included,
    and decodes them back; its special tokens are the model's.
  - apply_chat_template renders the conversation format dsopen's SFT trains on, and its token ids equal the prompt
    dsopen-generate --chat builds.
  - AutoModelForCausalLM loads the weights with no missing or unexpected key (MTP left out), and with --keep-mtp the
    MTP tensors are there (transformers lists them as unexpected).
  - A custom data.chat_template of the run travels into the export; dsopen-quantize's output carries the same files.

Usage: hf_export.py BIN_DIR
"""
import json
import os
import shutil
import sys

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging
from harness import Harness

hf_logging.set_verbosity_error()
H = Harness(sys.argv[1], "dsopen-export-")
W, b, run, must, check = H.work, H.b, H.run, H.must, H.check
FORTUNES = "/usr/share/games/fortunes/fortunes"


with open(os.path.join(W, "run.yaml"), "w") as f:
    f.write(f"""run: {{name: export, output_dir: {W}/run, seed: 3, log_every: 1, threads: 2}}
model: {{flavor: debug, vocab_size: 600, use_mtp: true}}
tokenizer:
  path: {W}/tok.model
  train: {{inputs: [{FORTUNES}], vocab_size: 600, character_coverage: 0.999,
          user_symbols: ["<|System|>", "<|User|>", "<|Assistant|>", "<|end|>"]}}
data:
  train: [{W}/shards/f_*.bin]
  seq_len: 32
  build: {{inputs: [{FORTUNES}], output: {W}/shards/f, doc_separator: "%"}}
train: {{max_steps: 2, micro_batch_size: 2, lr: 1.0e-3}}
checkpoint: {{every: 2}}
""")
must([b("train"), "--config", os.path.join(W, "run.yaml")])
EXPORT = os.path.join(W, "export")
must([b("convert"), "--model", os.path.join(W, "run"), "--out", EXPORT])  # a run directory: its latest checkpoint
for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer.model",
             "tokenizer_config.json", "special_tokens_map.json"):
    check(os.path.exists(os.path.join(EXPORT, name)), f"export has {name}")

# --- ids: AutoTokenizer against dsopen's tokenizer -----------------------------------------------------------------
tok = AutoTokenizer.from_pretrained(EXPORT)
check((tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>"),
      f"special tokens {tok.bos_token!r} {tok.eos_token!r} {tok.pad_token!r} {tok.unk_token!r}")
check((tok.bos_token_id, tok.eos_token_id) == (1, 2), "special token ids")
texts = []
for path in (FORTUNES, "/usr/share/games/fortunes/chinese", "/usr/share/games/fortunes/tang300"):
    if os.path.exists(path):
        texts += [t for t in open(path, encoding="utf-8", errors="ignore").read().split("\n%\n") if t]
texts += ["a   b", "  leading spaces", "tabs\t\there", "hello\n\nworld  ", "3.14159 2024", "emoji 🙂 and ü",
          "<|User|>hi\n<|Assistant|>yo<|end|>\n"]
ours = must([b("tokenizer"), "encode", "--model", os.path.join(EXPORT, "tokenizer.model"), "--jsonl"],
            stdin="".join(json.dumps(t) + "\n" for t in texts)).splitlines()
mismatch = []
undecoded = 0
for text, line in zip(texts, ours):
    want = [1] + json.loads(line)
    got = tok(text).input_ids
    if got != want:
        mismatch.append((text[:40], want[:12], got[:12]))
    if tok.decode(got, skip_special_tokens=True) != text:
        undecoded += 1
check(len(ours) == len(texts) and not mismatch,
      f"AutoTokenizer ids == [BOS] + dsopen ids on {len(texts)} texts ({len(mismatch)} differ: {mismatch[:2]})")
check(undecoded == 0, f"AutoTokenizer decodes its ids back to the text ({undecoded} differ)")

# --- chat template ---------------------------------------------------------------------------------------------------
conversations = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "你好，世界 — what is 2+2?"}],
]
for conv in conversations:
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    want = "<s>" + "".join({"system": "<|System|>", "user": "<|User|>"}[m["role"]] + m["content"] + "\n" for m in conv)
    want += "<|Assistant|>"
    check(text == want, f"apply_chat_template renders dsopen's SFT format: {text!r}")
    ids = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    args = [b("generate"), "--model", EXPORT, "--chat", "--max-new-tokens", "1", "--temperature", "0", "--json",
            "--prompt", conv[-1]["content"]]
    if conv[0]["role"] == "system":
        args += ["--system", conv[0]["content"]]
    prompt_ids = json.loads(must(args).strip().splitlines()[-1])["prompt_ids"][0]
    check(list(ids) == prompt_ids, f"apply_chat_template ids == dsopen-generate --chat prompt ({len(prompt_ids)} tokens)")
full = conversations[0] + [{"role": "assistant", "content": "Hi."}]
check(tok.apply_chat_template(full, tokenize=False).endswith("<|Assistant|>Hi.<|end|>\n</s>"),
      "a final assistant message ends with its suffix and EOS, as SFT trains it")

# --- weights: MTP left out by default, kept on request ---------------------------------------------------------------
_, info = AutoModelForCausalLM.from_pretrained(EXPORT, output_loading_info=True)
check(not info["missing_keys"] and not info["unexpected_keys"],
      f"transformers loads the export with no missing/unexpected keys: {sorted(info['missing_keys'])[:3]} "
      f"{sorted(info['unexpected_keys'])[:3]}")
KEEP = os.path.join(W, "export-mtp")
must([b("convert"), "--model", os.path.join(W, "run"), "--out", KEEP, "--keep-mtp"])
_, info = AutoModelForCausalLM.from_pretrained(KEEP, output_loading_info=True)
check(len(info["unexpected_keys"]) > 0 and all(".layers.2." in k or "layers.2" in k for k in info["unexpected_keys"]),
      f"--keep-mtp keeps the MTP module ({len(info['unexpected_keys'])} tensors under model.layers.2)")

# --- a run's own chat template travels ---------------------------------------------------------------------------------
step = os.path.join(W, "run/checkpoints/step_00000002")
custom = os.path.join(W, "custom")
shutil.copytree(step, custom)
cfg = yaml.safe_load(open(os.path.join(custom, "dsopen.yaml")))
cfg["data"]["chat_template"] = {"user_prefix": "### User: ", "user_suffix": "\n\n", "assistant_prefix": "### Bot: ",
                                "assistant_suffix": "\n\n", "add_bos": False}
yaml.safe_dump(cfg, open(os.path.join(custom, "dsopen.yaml"), "w"), default_style='"')
must([b("convert"), "--model", custom, "--out", os.path.join(W, "export-custom")])
t2 = AutoTokenizer.from_pretrained(os.path.join(W, "export-custom"))
text = t2.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
check(text == "### User: hi\n\n### Bot: ", f"the run's data.chat_template is the export's: {text!r}")

# --- quantized directories carry the same files ---------------------------------------------------------------------------
QUANT = os.path.join(W, "quant")
must([b("quantize"), "--model", EXPORT, "--method", "rtn-int8", "--group-size", "16", "--out", QUANT])
same = all(open(os.path.join(QUANT, n), "rb").read() == open(os.path.join(EXPORT, n), "rb").read()
           for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"))
check(same, "dsopen-quantize's output carries the export's tokenizer and generation files")

H.finish()
