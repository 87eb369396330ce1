"""Differential test of the tokenizers against the reference libraries (`sentencepiece`, `tokenizers`).

SentencePiece models, one trained by dsopen-tokenizer (identity normalizer, no dummy prefix) and one trained by
`sentencepiece` itself the Llama way (dummy prefix, byte fallback):
  - on text without a literal U+2581 ("▁"), dsopen encodes to the reference's ids exactly;
  - decoding any ids gives the reference's text;
  - encode -> decode is the identity on every string for dsopen-trained models, and on every string for the Llama-
    style model except what its own normalizer changes (it keeps a leading dummy space out of the text): dsopen keeps
    a literal ▁ as ▁ where the reference turns it into a space.
Byte-level BPE (tokenizer.json): ids equal `tokenizers`' on the same strings, decode equals its decode.
Usage: diff_tokenizers.py BIN_DIR"""
import json, os, random, subprocess, sys, tempfile

import sentencepiece as spm

BIN = sys.argv[1]
HERE = os.path.dirname(os.path.abspath(__file__))
META = "\u2581"


def run_jsonl(model, command, items):
    r = subprocess.run([os.path.join(BIN, "dsopen-tokenizer"), command, "--model", model, "--jsonl"],
                       input="".join(json.dumps(x) + "\n" for x in items), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"dsopen-tokenizer {command} failed: {r.stderr.strip()}")
    return [json.loads(line) for line in r.stdout.splitlines()]


def texts(rng, n, with_meta):
    alphabet = list("abcdefghij  \t\n.,!?0123456789") + ["你", "好", "世", "界", "🚀", "é", "ß", "\ue000", "\uf8ff"]
    if with_meta:
        alphabet += [META] * 4
    fixed = ["x" + META + "y", META + META + "a b", META, "a" + META, META + " " + META, "  " + META + "lead",
             "tail " + META, META + "你好" + META + "🚀", "\uf8ff" + META + "\uf8fe", "plain text, no meta"]
    out = [t for t in fixed if (META in t) == with_meta or not with_meta and META not in t]
    while len(out) < n:
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))))
    return [t for t in out if (META in t) == with_meta] if with_meta else [t for t in out if META not in t]


def check(name, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + detail}")
    return 0 if ok else 1


def sentencepiece_cases(tmp, rng):
    failures = 0
    ours_model = os.path.join(tmp, "ours.model")
    r = subprocess.run([os.path.join(BIN, "dsopen-tokenizer"), "train", "--input", "/usr/share/games/fortunes/fortunes",
                        "/usr/share/games/fortunes/tang300", "--vocab-size", "3000", "--character-coverage", "0.98",
                        "--output", ours_model],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"dsopen-tokenizer train failed: {r.stderr}")
    prefix = os.path.join(tmp, "llama")
    spm.SentencePieceTrainer.train(input="/usr/share/games/fortunes/fortunes", model_prefix=prefix, vocab_size=1200,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",
                                   split_digits=True, minloglevel=2)
    for label, model in [("dsopen-trained", ours_model), ("llama-style", prefix + ".model")]:
        sp = spm.SentencePieceProcessor(model_file=model)
        plain = texts(rng, 300, with_meta=False)
        got = run_jsonl(model, "encode", plain)
        want = [sp.encode(t) for t in plain]
        bad = [(t, g, w) for t, g, w in zip(plain, got, want) if g != w]
        failures += check(f"{label}: ids equal sentencepiece's on {len(plain)} texts without U+2581", not bad,
                          repr(bad[:2]))
        ids = [[rng.randrange(sp.get_piece_size()) for _ in range(rng.randrange(1, 30))] for _ in range(300)]
        got = run_jsonl(model, "decode", ids)
        want = [sp.decode(i) for i in ids]
        bad = [(i, g, w) for i, g, w in zip(ids, got, want) if g != w]
        failures += check(f"{label}: decode equals sentencepiece's on 300 random id lists", not bad, repr(bad[:2]))
        meta = texts(rng, 200, with_meta=True)
        enc = run_jsonl(model, "encode", meta)
        dec = run_jsonl(model, "decode", enc)
        strip = label == "llama-style"  # its dummy prefix is a space the reference also drops on decode
        bad = [(t, d) for t, d in zip(meta, dec) if d != t]
        failures += check(f"{label}: encode -> decode keeps U+2581 in {len(meta)} texts", not bad, repr(bad[:3]))
        ref_bad = sum(sp.decode(sp.encode(t)) != t for t in meta)
        print(f"     (the reference loses U+2581 in {ref_bad} of them)")
        if not strip:
            alltexts = plain + meta
            dec = run_jsonl(model, "decode", run_jsonl(model, "encode", alltexts))
            bad = [(t, d) for t, d in zip(alltexts, dec) if d != t]
            failures += check(f"{label}: encode -> decode is the identity on all {len(alltexts)} texts", not bad, repr(bad[:3]))
    return failures


def bytelevel_cases(tmp, rng):
    from tokenizers import Tokenizer
    d = os.path.join(tmp, "hf")
    r = subprocess.run([sys.executable, os.path.join(HERE, "make_hf_tokenizer.py"), d], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"make_hf_tokenizer.py failed: {r.stderr}")
    path = os.path.join(d, "tokenizer.json")
    ref = Tokenizer.from_file(path)
    sample = texts(rng, 200, with_meta=False) + texts(rng, 100, with_meta=True)
    got = run_jsonl(path, "encode", sample)
    want = [ref.encode(t, add_special_tokens=False).ids for t in sample]
    bad = [(t, g, w) for t, g, w in zip(sample, got, want) if g != w]
    failures = check(f"byte-level BPE: ids equal tokenizers' on {len(sample)} texts", not bad, repr(bad[:2]))
    dec = run_jsonl(path, "decode", got)
    want_dec = [ref.decode(i, skip_special_tokens=False) for i in got]
    bad = [(g, w) for g, w in zip(dec, want_dec) if g != w]
    failures += check("byte-level BPE: decode equals tokenizers'", not bad, repr(bad[:2]))
    return failures


def main():
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        failures = sentencepiece_cases(tmp, rng) + bytelevel_cases(tmp, rng)
    sys.exit(1 if failures else 0)


main()
