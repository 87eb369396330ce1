#!/usr/bin/env python3
"""dsopen-quantize writes the GPTQ checkpoint layout, read here by a dequantizer written from the format's
description (AutoGPTQ / GPTQModel's QuantLinear, transformers' GPTQ docs), not from our code:

  qweight int32 [in * bits / 32, out]   word r of column o packs inputs r * 32/bits ..., first input lowest
  qzeros  int32 [G, out * bits / 32]    zero points minus one ("gptq" v1), packed along the output the same way
  scales  fp16  [G, out]
  g_idx   int32 [in]                    group of each input
  W[o, i] = scales[g_idx[i], o] * (q[i, o] - (zero[g_idx[i], o] + 1))

For rtn-int4 (asym, group 16), rtn-int4 --sym, rtn-int8 per channel and gptq-int4 (act-order, group 16) of a small
DeepSeek-V3-style model, every quantized layer dequantized here equals, bit for bit, the float weights
dsopen-convert writes from the same directory (our loader), and every other tensor is carried unchanged.
config.json's quantization_config and quantize_config.json hold what GPTQ loaders read. transformers' own GPTQ
loading needs optimum plus a GPTQ kernel package (gptqmodel), which PyPI offers only as a source package that builds
native kernels; when it is importable the logits of transformers and dsopen are compared as well.

Usage: gptq_layout.py BIN_DIR
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file
from harness import Harness

H = Harness(sys.argv[1], "dsopen-gptq-")
W, b, run, must, check = H.work, H.b, H.run, H.must, H.check
FORTUNES = "/usr/share/games/fortunes/fortunes"


with open(os.path.join(W, "run.yaml"), "w") as f:
    f.write(f"""run: {{name: gptq, output_dir: {W}/run, seed: 3, log_every: 1, threads: 2}}
model: {{flavor: debug, vocab_size: 600}}
tokenizer:
  path: {W}/tok.model
  train: {{inputs: [{FORTUNES}], vocab_size: 600, character_coverage: 0.999}}
data:
  train: [{W}/shards/f_*.bin]
  seq_len: 64
  build: {{inputs: [{FORTUNES}], output: {W}/shards/f, doc_separator: "%"}}
train: {{max_steps: 20, micro_batch_size: 4, lr: 3.0e-3}}
checkpoint: {{every: 20}}
""")
must([b("train"), "--config", os.path.join(W, "run.yaml")])
RUN = os.path.join(W, "run")
FLOAT = load_file(os.path.join(RUN, "checkpoints/step_00000020/model.safetensors"))
L = json.load(open(os.path.join(RUN, "checkpoints/step_00000020/config.json")))["num_hidden_layers"]
# Quantized models are for inference: the multi-token-prediction module (layers L and up) is left out.
FLOAT = {k: v for k, v in FLOAT.items() if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= L)}


def unpack(words, bits, dim):
    """int32 words -> codes, unpacking along `dim` (first value in the lowest bits)."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> (bits * j)) & ((1 << bits) - 1) for j in range(per)]
    return torch.stack(parts, dim + 1).flatten(dim, dim + 1)


def dequantize(t, base, bits, v1=True):
    q = unpack(t[base + ".qweight"], bits, 0)    # [in, out]
    z = unpack(t[base + ".qzeros"], bits, 1)     # [G, out]
    if v1:
        z = z + 1
    g = t[base + ".g_idx"].long()
    s = t[base + ".scales"].float()
    return (s[g] * (q.float() - z[g].float())).t()  # [out, in]


CASES = {
    "rtn-int4-g16": ["--method", "rtn-int4", "--group-size", "16"],
    "rtn-int4-sym": ["--method", "rtn-int4", "--group-size", "16", "--sym"],
    "rtn-int8-channel": ["--method", "rtn-int8", "--group-size", "-1", "--quantize-head"],
    "gptq-int4-g16": ["--method", "gptq-int4", "--group-size", "16", "--calib-data", f"{W}/shards/f_*.bin",
                      "--calib-samples", "16", "--calib-seq-len", "64"],
}
for name, args in CASES.items():
    out = os.path.join(W, name)
    must([b("quantize"), "--model", RUN, "--out", out] + args)
    cfg = json.load(open(os.path.join(out, "config.json")))
    qc = cfg["quantization_config"]
    bits, group = qc["bits"], qc["group_size"]
    check(qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and
          qc["sym"] == ("--sym" in args) and qc["desc_act"] == name.startswith("gptq") and
          qc["lm_head"] == ("--quantize-head" in args) and
          json.load(open(os.path.join(out, "quantize_config.json"))) == qc,
          f"{name}: quantization_config {dict((k, qc[k]) for k in ('bits', 'group_size', 'sym', 'desc_act'))} "
          "and quantize_config.json agree")
    t = load_file(os.path.join(out, "model.safetensors"))
    layers = sorted(k[:-len(".qweight")] for k in t if k.endswith(".qweight"))
    must([b("convert"), "--model", out, "--out", out + "-float"])
    ours = load_file(os.path.join(out + "-float", "model.safetensors"))
    shapes_ok = all(t[l + ".qweight"].dtype == torch.int32 and t[l + ".qzeros"].dtype == torch.int32 and
                    t[l + ".scales"].dtype == torch.float16 and t[l + ".g_idx"].dtype == torch.int32 and
                    t[l + ".qweight"].shape == (FLOAT[l + ".weight"].shape[1] * bits // 32, FLOAT[l + ".weight"].shape[0])
                    for l in layers)
    check(len(layers) > 10 and shapes_ok, f"{name}: {len(layers)} layers as int32 qweight/qzeros, fp16 scales, int32 g_idx")
    bad = [l for l in layers if not torch.equal(dequantize(t, l, bits), ours[l + ".weight"])]
    check(not bad, f"{name}: the format's dequantization equals dsopen's loaded weights ({bad[:3]})")
    g_ok = all(torch.equal(t[l + ".g_idx"].long(),
                           torch.arange(t[l + ".g_idx"].numel()) // (group if group > 0 else t[l + ".g_idx"].numel()))
               for l in layers)
    check(g_ok, f"{name}: g_idx is i // group_size")
    zeros_ok = all(unpack(t[l + ".qzeros"], bits, 1).min() >= 0 for l in layers)
    if "--sym" in args:
        zeros_ok = all(torch.all(unpack(t[l + ".qzeros"], bits, 1) + 1 == 2 ** (bits - 1)) for l in layers)
    check(zeros_ok, f"{name}: zero points {'in the middle code' if '--sym' in args else '>= 1'}")
    rest = [k for k in FLOAT if k[:-len(".weight")] not in layers and k in t and not torch.equal(t[k], FLOAT[k])]
    check(not rest and all(k in t for k in FLOAT if k[:-len(".weight")] not in layers),
          f"{name}: the other tensors are carried unchanged ({rest[:3]})")
    if name.startswith("rtn"):  # GPTQ trades weight error for output error: no such bound there
        err = max((dequantize(t, l, bits) - FLOAT[l + ".weight"]).abs().max().item() /
                  FLOAT[l + ".weight"].abs().max().item() for l in layers)
        check(err < (0.1 if bits == 4 else 0.01), f"{name}: largest error {err:.4f} of a layer's range")

try:
    import optimum  # noqa: F401
    import gptqmodel  # noqa: F401
    have_backend = True
except ImportError:
    have_backend = False
    print("note: optimum + gptqmodel are not installed (PyPI offers gptqmodel only as a source package that builds native kernels); transformers' own GPTQ "
          "loading is not compared here")
if have_backend:
    from transformers import AutoModelForCausalLM
    out = os.path.join(W, "rtn-int4-g16")
    m = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ids = torch.tensor([[1, 17, 42, 99, 250, 7, 300]])
    theirs = m(ids).logits.float()
    ref = AutoModelForCausalLM.from_pretrained(out + "-float")
    ours = ref(ids).logits.float()
    check(torch.allclose(theirs, ours, atol=5e-2, rtol=5e-2), "transformers loads the GPTQ directory with our logits")

H.finish()
