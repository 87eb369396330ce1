"""Differential test of generation against transformers' generate(), for every tokenizer backend dsopen loads
(byte-level BPE tokenizer.json; SentencePiece without and with a dummy prefix).

The model is a random Llama whose head is scaled up, so its logits are peaked (greedy choices are far from ties)
and each control is decisive — the test checks that every control changes the output before comparing it:
  - greedy decoding: the same tokens as transformers;
  - repetition penalty (greedy): the same tokens, different from plain greedy;
  - an EOS list from generation_config.json: both stop at the first listed id;
  - stop strings: the tokens up to the one completing the string (transformers' stop_strings for tokenizer.json),
    and the text cut before it;
  - the text, in --json and streamed to stdout, is decode(prompt + new) - decode(prompt) by the reference library;
  - temperature, top-k, top-p and repetition penalty: 3000 sampled first tokens follow the distribution
    transformers' logits processors give (never a token they exclude; every frequency within 5 sigma).
Usage: diff_generation.py BIN_DIR"""
import json, math, os, shutil, subprocess, sys, tempfile
from collections import Counter

import sentencepiece as spm
import torch
import transformers as tf
from tokenizers import Tokenizer

BIN = sys.argv[1]
HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["The fool", "A wise man once said", "床前明月光", "Life is"]
failures = 0


def check(name, ok, detail=""):
    global failures
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok or not detail else ': ' + detail}")


def generate(model_dir, prompts, *flags, as_json=True):
    args = [os.path.join(BIN, "dsopen-generate"), "--model", model_dir]
    for p in prompts:
        args += ["--prompt", p]
    r = subprocess.run(args + list(flags) + (["--json"] if as_json else []), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"dsopen-generate failed: {r.stderr.strip()}")
    return json.loads(r.stdout) if as_json else r.stdout


class Backend:
    def __init__(self, name, files, vocab, decode, hf_tokenizer=None):
        self.name, self.files, self.vocab, self.decode, self.hf_tokenizer = name, files, vocab, decode, hf_tokenizer


def backends(tmp):
    out = []
    d = os.path.join(tmp, "bpe")
    subprocess.run([sys.executable, os.path.join(HERE, "make_hf_tokenizer.py"), d], check=True, capture_output=True)
    bpe = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    hf_tok = tf.PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
    out.append(Backend("byte-level BPE", [os.path.join(d, "tokenizer.json"), os.path.join(d, "tokenizer_config.json")],
                       bpe.get_vocab_size(True), lambda ids: bpe.decode(ids, skip_special_tokens=False), hf_tok))
    ours = os.path.join(tmp, "ours.model")
    subprocess.run([os.path.join(BIN, "dsopen-tokenizer"), "train", "--input", "/usr/share/games/fortunes/fortunes",
                    "/usr/share/games/fortunes/tang300", "--vocab-size", "3000", "--character-coverage", "0.98",
                    "--output", ours], check=True, capture_output=True)
    sp = spm.SentencePieceProcessor(model_file=ours)
    out.append(Backend("SentencePiece (dsopen-trained)", [ours], sp.get_piece_size(), sp.decode))
    prefix = os.path.join(tmp, "llama")
    spm.SentencePieceTrainer.train(input="/usr/share/games/fortunes/fortunes", model_prefix=prefix, vocab_size=1200,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", minloglevel=2)
    sp2 = spm.SentencePieceProcessor(model_file=prefix + ".model")
    out.append(Backend("SentencePiece (dummy prefix)", [prefix + ".model"], sp2.get_piece_size(), sp2.decode))
    return out


def make_model(tmp, backend):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=backend.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # peaked logits: greedy steps are far from ties
    d = os.path.join(tmp, "model_" + backend.name.split()[0].lower().replace("-", ""))
    model.save_pretrained(d, safe_serialization=True)
    for f in backend.files:
        name = "tokenizer.model" if f.endswith(".model") else os.path.basename(f)
        shutil.copy(f, os.path.join(d, name))
    if os.path.exists(os.path.join(d, "generation_config.json")):
        os.remove(os.path.join(d, "generation_config.json"))
    return model, d


def hf_new_tokens(model, prompt_ids, eos=None, **kw):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kw)[0, len(prompt_ids):].tolist()
    if eos is not None and out and out[-1] in eos:
        out = out[:-1]  # dsopen does not return the EOS that ended a sequence
    return out


def text_of(backend, prompt_ids, new):
    whole, head = backend.decode(prompt_ids + new), backend.decode(prompt_ids)
    return whole[len(head):] if whole.startswith(head) else None


def run_backend(tmp, backend):
    model, d = make_model(tmp, backend)
    greedy_flags = ["--temperature", "0", "--top-k", "0", "--top-p", "1", "--repetition-penalty", "1",
                    "--max-new-tokens", "24"]
    g = generate(d, PROMPTS, *greedy_flags, "--ignore-eos")
    prompt_ids = g["prompt_ids"]
    greedy_hf = [hf_new_tokens(model, p, do_sample=False, max_new_tokens=24, eos_token_id=None,
                               min_new_tokens=24) for p in prompt_ids]
    check(f"{backend.name}: greedy tokens equal transformers'", g["tokens"] == greedy_hf,
          f"{g['tokens'][0][:8]} vs {greedy_hf[0][:8]}")
    expect = [text_of(backend, p, t) for p, t in zip(prompt_ids, g["tokens"])]
    check(f"{backend.name}: --json text is decode(prompt + new) - decode(prompt)", g["texts"] == expect,
          f"{g['texts'][:2]} vs {expect[:2]}")
    streamed = generate(d, PROMPTS[:1], *greedy_flags, "--ignore-eos", as_json=False)
    check(f"{backend.name}: streamed text is the same", streamed == PROMPTS[0] + expect[0] + "\n",
          f"{streamed!r} vs {(PROMPTS[0] + expect[0])!r}")

    changed = False
    for penalty in (1.5, 0.6):  # below 1 a penalty encourages repeats
        rp = generate(d, PROMPTS, *greedy_flags[:6], "--repetition-penalty", str(penalty), "--max-new-tokens", "24",
                      "--ignore-eos")
        rp_hf = [hf_new_tokens(model, p, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                               repetition_penalty=penalty) for p in prompt_ids]
        changed |= rp["tokens"] != g["tokens"]
        check(f"{backend.name}: repetition penalty {penalty} tokens equal transformers'", rp["tokens"] == rp_hf,
              f"{rp['tokens'][0][:8]} vs {rp_hf[0][:8]}")
    check(f"{backend.name}: repetition penalty changes greedy output", changed)

    # EOS list in generation_config.json: ids greedy decoding reaches at different steps of two prompts.
    first = g["tokens"][0]
    e1 = next(t for i, t in enumerate(first) if i >= 4 and t not in first[:i])
    second = g["tokens"][1]
    e2 = next(t for i, t in enumerate(second) if i >= 2 and t not in second[:i] and t != e1)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"do_sample": False, "eos_token_id": [e1, e2], "bos_token_id": 1}, f)
    ge = generate(d, PROMPTS[:2], "--max-new-tokens", "24")
    model.generation_config = tf.GenerationConfig.from_pretrained(d)
    ge_hf = [hf_new_tokens(model, p, eos=[e1, e2], max_new_tokens=24) for p in prompt_ids[:2]]
    stops = [g["tokens"][0].index(e1) if e1 in g["tokens"][0] else 24, ]
    check(f"{backend.name}: an EOS list ends each sequence at its first listed id",
          ge["sampling"]["temperature"] == 0 and len(ge["tokens"][0]) == min(stops[0], first.index(e2) if e2 in first else 24)
          and ge["tokens"] == ge_hf, f"{ge['tokens']} vs {ge_hf}")
    os.remove(os.path.join(d, "generation_config.json"))
    model.generation_config = tf.GenerationConfig(bos_token_id=1, eos_token_id=2)

    # A stop string from the middle of the greedy text of prompt 0, absent from the prompt.
    text0 = expect[0]
    # (not one holding U+FFFD: a character whose bytes are still arriving)
    stop = next((text0[k:k + 3] for k in range(2, len(text0) - 3)
                 if text0[k:k + 3].strip() == text0[k:k + 3] and text0[k:k + 3] not in PROMPTS[0]
                 and "\ufffd" not in text0[k:k + 3] and text0.find(text0[k:k + 3]) == k), None)
    if stop is None:
        check(f"{backend.name}: a stop string could be chosen", False, repr(text0))
        return
    gs = generate(d, PROMPTS[:1], *greedy_flags, "--ignore-eos", "--stop", stop)
    n = next(i for i in range(1, 25) if stop in text_of(backend, prompt_ids[0], g["tokens"][0][:i]))
    ok = gs["tokens"][0] == g["tokens"][0][:n] and gs["texts"][0] == text0[:text0.find(stop)]
    if backend.hf_tokenizer is not None:
        hf_stop = hf_new_tokens(model, prompt_ids[0], do_sample=False, max_new_tokens=24, stop_strings=[stop],
                                tokenizer=backend.hf_tokenizer)
        ok = ok and gs["tokens"][0] == hf_stop
    check(f"{backend.name}: stop string {stop!r} ends after the token completing it, text cut before it", ok,
          f"{gs['tokens'][0]} / {gs['texts'][0]!r} vs {g['tokens'][0][:n]} / {text0[:text0.find(stop)]!r}")
    streamed = generate(d, PROMPTS[:1], *greedy_flags, "--ignore-eos", "--stop", stop, as_json=False)
    check(f"{backend.name}: streaming never shows a stop string's first characters",
          streamed == PROMPTS[0] + text0[:text0.find(stop)] + "\n", repr(streamed))

    # Sampling from the prompt whose next-token distribution is widest, so that each control matters.
    def entropy(p):
        with torch.no_grad():
            q = torch.softmax(model(torch.tensor([p])).logits[0, -1].double(), -1)
        return -(q * q.clamp_min(1e-30).log()).sum().item()
    sampling_cases(model, d, backend, max(prompt_ids, key=entropy))


def sampling_cases(model, d, backend, prompt_ids):
    N = 3000
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1].double()
    for temperature, top_k, top_p, penalty in [(0.7, 0, 1.0, 1.0), (1.0, 3, 1.0, 1.3), (1.5, 0, 0.7, 1.0), (1.2, 8, 0.9, 1.2)]:
        procs = tf.LogitsProcessorList()
        if penalty != 1.0:
            procs.append(tf.RepetitionPenaltyLogitsProcessor(penalty))
        procs.append(tf.TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(tf.TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(tf.TopPLogitsWarper(top_p))
        scores = procs(torch.tensor([prompt_ids]), logits.clone().unsqueeze(0).float())[0]
        ref = torch.softmax(scores.double(), -1)
        raw = torch.softmax(logits / temperature, -1)
        args = [os.path.join(BIN, "dsopen-generate"), "--model", d, "--max-new-tokens", "1", "--ignore-eos", "--json",
                "--temperature", str(temperature), "--top-k", str(top_k), "--top-p", str(top_p),
                "--repetition-penalty", str(penalty), "--seed", "11", "--no-bos"]
        ids_arg = ",".join(map(str, prompt_ids))
        for _ in range(N):
            args += ["--prompt-ids", ids_arg]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"dsopen-generate failed: {r.stderr.strip()}")
        counts = Counter(t[0] for t in json.loads(r.stdout)["tokens"])
        support = {i for i in range(len(ref)) if ref[i] > 0}
        outside = [t for t in counts if t not in support]
        worst = max(abs(counts.get(i, 0) / N - ref[i].item()) / math.sqrt(max(ref[i].item() * (1 - ref[i].item()), 1e-12) / N)
                    for i in support if ref[i] > 1e-4)
        # Decisive: the controls move the distribution far from plain softmax(logits / T).
        moved = (ref - raw).abs().sum().item()
        label = f"T={temperature} top_k={top_k} top_p={top_p} penalty={penalty}"
        check(f"{backend.name}: sampling {label}: {len(counts)} tokens seen, none excluded, worst {worst:.1f} sigma"
              f" (controls move {moved:.2f} of the mass)", not outside and worst < 5 and (moved > 0.05 or temperature != 1.0),
              f"outside the reference support: {outside[:5]}")


# Other families: greedy decoding of a batch of prompts of different lengths (left-padded, KV cache) must give the
# tokens transformers' generate gives each prompt alone.
FAMILIES = {
    "glm4": (tf.Glm4Config, tf.Glm4ForCausalLM, dict(head_dim=16, pad_token_id=0, attention_bias=True)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=16)),
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
    "llama3 rope": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
}


def family_greedy(tmp, backend):
    for name, (cfg_cls, model_cls, kw) in FAMILIES.items():
        torch.manual_seed(1)
        cfg = cfg_cls(**dict(dict(vocab_size=backend.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  initializer_range=0.2, bos_token_id=1, eos_token_id=2), **kw))
        model = model_cls(cfg).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(5.0)
        d = os.path.join(tmp, "family_" + name.replace(" ", "_"))
        model.save_pretrained(d, safe_serialization=True)
        for f in backend.files:
            shutil.copy(f, os.path.join(d, "tokenizer.model" if f.endswith(".model") else os.path.basename(f)))
        if os.path.exists(os.path.join(d, "generation_config.json")):
            os.remove(os.path.join(d, "generation_config.json"))
        g = generate(d, PROMPTS, "--temperature", "0", "--top-k", "0", "--top-p", "1", "--repetition-penalty", "1",
                     "--max-new-tokens", "16", "--ignore-eos")
        hf = [hf_new_tokens(model, p, do_sample=False, max_new_tokens=16, min_new_tokens=16, eos_token_id=None)
              for p in g["prompt_ids"]]
        check(f"{name}: batched greedy tokens equal transformers' per prompt", g["tokens"] == hf,
              f"{g['tokens'][0][:8]} vs {hf[0][:8]}")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        for i, backend in enumerate(backends(tmp)):
            if i == 0:
                family_greedy(tmp, backend)
            run_backend(tmp, backend)
    print(f"{failures} failed")
    sys.exit(1 if failures else 0)


main()
