"""The transformers side of the generation benchmark: the same model directory (a dsopen checkpoint, an HF
directory, or a dsopen-quantize output, whose weights are dequantized here exactly as dsopen does on load), the same
prompt token ids, greedy `generate` with EOS ignored, the same dtype and thread count; int4 files and per-channel
int8 files run their nn.Linear layers through the same weight-only kernels dsopen uses (Int4Linear and Int8Linear
below, as in inference/quantized_linear.h; transformers' fused MoE expert tensors stay dequantized). Prefill and decode are split
by a stopping criterion that timestamps every generated token: the first call comes right after the prompt's
forward pass, the rest after each one-token decode step. Prints one JSON line (the fields dsopen-generate --json
prints).
Usage: generate_reference.py MODEL_DIR --prompt-ids-file F --new-tokens N --dtype fp32|bf16 --threads K"""
import argparse, json, os, shutil, tempfile, time

import torch
import transformers
from safetensors.torch import load_file, save_file

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--prompt-ids-file", required=True, help="one prompt per line, token ids separated by spaces")
p.add_argument("--new-tokens", type=int, default=64)
p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
p.add_argument("--threads", type=int, default=2)
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--repeat", type=int, default=1)
p.add_argument("--dequantize", action="store_true", help="float weights instead of the int4 / int8 kernels")
a = p.parse_args()

torch.set_num_threads(a.threads)
dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32


def row_layout(sd, bits):
    """dsopen-quantize's GPTQ tensors (qweight int32 [in * bits / 32, out] packed along the input, qzeros [G, out *
    bits / 32] holding zero - 1, scales [G, out], g_idx i // g) -> the row layout the kernels below take: qweight
    uint8 [out, in] (int4: two codes per byte, low nibble = even column), scales and zeros [out, G]."""
    per, mask, out = 32 // bits, (1 << bits) - 1, {}
    for name, t in sd.items():
        if name.endswith((".qzeros", ".g_idx", ".scales")):
            continue
        if not name.endswith(".qweight"):
            out[name] = t
            continue
        base = name[: -len(".qweight")]
        w = t.to(torch.int64) & 0xFFFFFFFF
        codes = torch.stack([(w >> (bits * j)) & mask for j in range(per)], 1).flatten(0, 1).t()  # [out, in]
        z = sd[base + ".qzeros"].to(torch.int64) & 0xFFFFFFFF
        zeros = torch.stack([(z >> (bits * j)) & mask for j in range(per)], 2).flatten(1, 2) + 1  # [G, out]
        out[name] = ((codes[:, 0::2] | (codes[:, 1::2] << 4)) if bits == 4 else codes).to(torch.uint8).contiguous()
        out[base + ".scales"] = sd[base + ".scales"].t().contiguous()
        out[base + ".zeros"] = zeros.t().to(sd[base + ".scales"].dtype).contiguous()
    return out


def dequantized_state_dict(path, bits):
    """model.safetensors of dsopen-quantize -> float32 weights: W = (q - zeros) * scales per group of columns."""
    sd = row_layout(load_file(path), bits)
    out = {}
    for name, t in sd.items():
        if name.endswith((".scales", ".zeros")):
            continue
        if not name.endswith(".qweight"):
            out[name] = t.float()
            continue
        base = name[: -len(".qweight")]
        scales, zeros = sd[base + ".scales"].float(), sd[base + ".zeros"].float()
        q = torch.stack([t & 15, t >> 4], -1).flatten(1) if bits == 4 else t  # int4: low nibble = even column
        g = q.shape[1] // scales.shape[1]
        out[base + ".weight"] = (q.float() - zeros.repeat_interleave(g, 1)) * scales.repeat_interleave(g, 1)
    return out


class Int4Linear(torch.nn.Module):
    """The int4 path of dsopen (inference/quantized_linear.h Int4Linear): up to 64 rows through LibTorch's packed int4 CPU
    kernel (bf16 activations, the kernel torchao's int4 weight-only CPU layout calls), more rows through the
    weight dequantized for the call and a float32 matmul."""

    def __init__(self, qweight, scales, zeros, bias):
        super().__init__()
        self.qweight, self.scales, self.zeros, self.bias = qweight, scales.float(), zeros.float(), bias
        self.g = qweight.shape[1] * 2 // scales.shape[1]
        codes = torch.stack([qweight & 15, qweight >> 4], -1).flatten(1)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        self.scale_zeros = torch.stack([self.scales.t(), ((8 - self.zeros) * self.scales).t()], -1).bfloat16().contiguous()

    def dequantized(self):
        codes = torch.stack([self.qweight & 15, self.qweight >> 4], -1).flatten(1).float()
        n, k = codes.shape
        w = (codes.view(n, k // self.g, self.g) - self.zeros.unsqueeze(2)) * self.scales.unsqueeze(2)
        return w.view(n, k)

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > 64:
            y = torch.nn.functional.linear(x2.float(), self.dequantized())
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.bfloat16().contiguous(), self.packed, self.g,
                                                           self.scale_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int8Linear(torch.nn.Module):
    """The per-channel int8 path of dsopen (inference/quantized_linear.h Int8Linear): up to 64 rows through
    LibTorch's int8 weight-only CPU kernel on codes q - 128 plus the zero-point term, more rows through the weight
    dequantized for the call and a float32 matmul."""

    def __init__(self, qweight, scales, zeros, bias):
        super().__init__()
        self.codes = (qweight.to(torch.int16) - 128).to(torch.int8).contiguous()
        self.scale = scales.float().flatten()
        self.offset = (128 - zeros.float().flatten()) * self.scale
        self.ones = torch.ones(self.codes.shape[0], dtype=torch.bfloat16)
        self.bias = bias

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > 64:
            w = self.codes * self.scale.unsqueeze(1) + self.offset.unsqueeze(1)
            y = torch.nn.functional.linear(x2.float(), w)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.bfloat16().contiguous(), self.codes, self.ones).float()
            y = y * self.scale + torch.outer(x2.float().sum(1), self.offset)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def use_packed_kernels(model, path, bits):
    """Replaces every nn.Linear whose weight the file holds as int4 codes, or as per-channel int8 codes with an
    input dimension divisible by 16 (what the int8 kernel takes); returns how many."""
    sd = row_layout(load_file(path), bits)
    n = 0
    for name, module in list(model.named_modules()):
        if not (isinstance(module, torch.nn.Linear) and name + ".qweight" in sd):
            continue
        q, scales, zeros = sd[name + ".qweight"], sd[name + ".scales"], sd[name + ".zeros"]
        if bits == 8 and (scales.shape[1] != 1 or q.shape[1] % 16 != 0):
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        layer = Int4Linear if bits == 4 else Int8Linear
        setattr(parent, name.rsplit(".", 1)[-1], layer(q, scales, zeros, module.bias))
        n += 1
    return n


cfg = transformers.AutoConfig.from_pretrained(a.model)
qcfg = getattr(cfg, "quantization_config", None)
if qcfg is not None:
    # A float copy of the directory that from_pretrained loads as usual (it also maps checkpoint names to the
    # module layout of this transformers version, e.g. fused expert tensors).
    tmp = tempfile.mkdtemp(prefix="dsopen_dequant_")
    try:
        del cfg.quantization_config
        cfg.save_pretrained(tmp)
        save_file(dequantized_state_dict(os.path.join(a.model, "model.safetensors"), int(qcfg["bits"])),
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
    finally:
        shutil.rmtree(tmp)
    if not a.dequantize:
        kernels = use_packed_kernels(model, os.path.join(a.model, "model.safetensors"), int(qcfg["bits"]))
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
model.eval()
if qcfg is None or a.dequantize:
    kernels = 0

prompts = [[int(x) for x in line.split()] for line in open(a.prompt_ids_file) if line.strip()]
assert len({len(x) for x in prompts}) == 1, "prompts of one length (no padding)"
ids = torch.tensor(prompts, dtype=torch.long)
B, P = ids.shape


class Clock(transformers.StoppingCriteria):
    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def run():
    clock = Clock()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                         min_new_tokens=a.new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                         pad_token_id=0, stopping_criteria=transformers.StoppingCriteriaList([clock]),
                         use_cache=True)
    return out[:, P:], clock.times[0] - t0, clock.times[-1] - clock.times[0], len(clock.times) - 1


for _ in range(a.warmup):
    run()
best_prefill = best_decode = float("inf")
for _ in range(a.repeat):
    tokens, prefill_s, decode_s, forwards = run()
    best_prefill, best_decode = min(best_prefill, prefill_s), min(best_decode, decode_s)
print(json.dumps({"impl": "transformers", "model": a.model, "dtype": a.dtype, "threads": a.threads, "batch": B,
                  "prompt_tokens": B * P, "generated_tokens": tokens.numel(), "decode_forwards": forwards,
                  "prefill_s": best_prefill, "decode_s": best_decode,
                  "prefill_tokens_per_s": B * P / best_prefill, "decode_tokens_per_s": B * forwards / best_decode,
                  "kernel_layers": kernels,
                  "rss_mb": int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGESIZE") / 2**20, "tokens": tokens.tolist(), "torch": torch.__version__, "transformers": transformers.__version__}))
