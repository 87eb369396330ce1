#!/usr/bin/env python3
"""Makes HuggingFace byte-level BPE tokenizer.json files and their reference encodings for the C++ loader's tests.

usage: make_hf_tokenizer.py OUT_DIR

Trains a small byte-level BPE (HF `tokenizers`) on the Debian fortunes corpus (English + Tang poems) with a
DeepSeek-V3-style pre-tokenizer and writes, in OUT_DIR:
  tokenizer.json, tokenizer_config.json, expected.jsonl   DeepSeek-V3 style (Split x3 + ByteLevel without regex)
  <variant>/tokenizer.json, <variant>/expected.jsonl      the same vocabulary and merges under other
                                                          pre-tokenizers: gpt2 (top-level ByteLevel with the GPT-2
                                                          regex), qwen2 (Qwen2's Split regex), llm (DeepSeek-LLM:
                                                          five Splits + Digits)
Each expected.jsonl line is {"text": ..., "ids": [...]} as `tokenizers` encodes it (no BOS/EOS added), plus
"decoded" where decoding the ids does not give the text back; the main
directory also gets corpus.jsonl: the same for every paragraph of the corpus plus two held-out fortune files.
"""
import json
import os
import re
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
CORPUS = ["/usr/share/games/fortunes/fortunes", "/usr/share/games/fortunes/tang300"]
HELD_OUT = ["/usr/share/games/fortunes/chinese", "/usr/share/games/fortunes/song100"]

# The letters class of DeepSeek's tokenizer.json files (Latin, Greek, Cyrillic, Armenian, Georgian, ... letters).
LETTERS = ("A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7d"
           "ᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ"
           "𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃")
PUNCT = "!-/:-~！-／：-～‘-‟　-。"


def split(pattern):
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)


def byte_level():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


# DeepSeek-V3: digits in groups of up to three, CJK runs, then letters / punctuation / whitespace.
V3 = pre_tokenizers.Sequence([
    split(r"\p{N}{1,3}"),
    split("[一-龥\u3040-ゟ゠-ヿ]+"),
    split(rf"[\r\n]|\s?[{LETTERS}]+|\s?[{PUNCT}]+|\s+$|\s+(?=\S)|\s+"),
    byte_level(),
])
VARIANTS = {
    "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "qwen2": pre_tokenizers.Sequence([
        split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
        byte_level(),
    ]),
    "llm": pre_tokenizers.Sequence([
        split(r"[\r\n]"),
        split(rf"\s?[{LETTERS}]+"),
        split(rf"\s?[{PUNCT}]+"),
        split(r"\s+$"),
        split("[一-龥ࠀ-一가-\ud7ff]+"),
        pre_tokenizers.Digits(individual_digits=True),
        byte_level(),
    ]),
}

TEXTS = [
    "Hello, world! 你好，世界。",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "The quick brown fox jumps over the lazy dog. It's 9:45 and we'll've done it; they're sure I'd go.",
    "Numbers: 1234567, 3.14159, -42, 2026-11-29, ０１２３ and ٣٤٥ (Arabic-Indic), ⅣⅫ.",
    "emoji 🚀🎉👍🏽 and rare 𠜎𪚥 characters, Ünïcödé ©® ½ café naïve Straße Ελληνικά русский язык",
    "日本語のテキスト：ひらがな、カタカナ、漢字。한국어 텍스트도 있어요.",
    "code:\n\tfor (int i = 0; i < n; ++i) {\n\t\tx[i] *= 2;  // double\n\t}\n",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": None}  # comment\n\n\n",
    "  leading spaces,\ttabs\tand\nnewlines\n\n   trailing   ",
    "a \n b\t\t\n\n  c   \r\n  \r\n\n",
    "    ",
    "\n",
    "",
    "x",
    f"{BOS}{USER}What is 2+2?{ASSISTANT}4{EOS}",
    f"inline {USER} specials {ASSISTANT}and{EOS}{EOS}twice, and a partial <｜User",
    "<think>\nreasoning here\n</think>\n\nanswer",
    "mask: a   <mask>   b",
    "whitespace zoo: \u00a0nbsp\u3000ideographic\u2003em\u0085nel\x0bvt\x0cff end",
    "format characters: mongolian\u180evowel \u180e sep, zero\u200bwidth \u200b, bom\ufeff, rtl\u202emark",
    "URL https://example.com/path?q=1&r=%20x#frag and e-mail a.b@c.de",
    "ALL CAPS SHOUTING, MiXeD cAsE, it'S DON'T I'M",
    "repetition " * 20 + "ha" * 40,
    "一" * 300 + "，" + "abc" * 100,
]


def corpus_lines():
    ansi = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    for path in CORPUS:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = ansi.sub("", line)
                if line.strip() and line.strip() != "%":
                    yield line


def paragraphs(paths):
    """Fortune entries (separated by '%' lines), escapes kept: a realistic mix of text, whitespace and controls."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for entry in f.read().split("\n%\n"):
                if entry.strip():
                    yield entry


def write_expected(tok, path, texts=TEXTS):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False).ids
            line = {"text": text, "ids": ids}
            decoded = tok.decode(ids, skip_special_tokens=False)
            if decoded != text:  # lstrip/rstrip added tokens absorb the whitespace around them
                line["decoded"] = decoded
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = V3
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=2, show_progress=False,
                                  special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer)
    # Non-special added tokens (as DeepSeek-R1's <think>) and an lstrip/rstrip one (as RoBERTa's <mask>).
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=True)])
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, special=True)])
    # DeepSeek files prepend BOS in the post-processor; encode() in C++ never adds it (add_special_tokens=False).
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(os.path.join(out, "tokenizer.json"))

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "eos_token": EOS,
        "pad_token": {"__type": "AddedToken", "content": EOS},
        "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
                          "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                          "{{ '<｜User｜>' + message['content'] }}{% elif message['role'] == 'assistant' %}"
                          "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"),
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)

    # Reference encodings from the files as saved (what the C++ loader reads).
    main_tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    write_expected(main_tok, os.path.join(out, "expected.jsonl"))
    write_expected(main_tok, os.path.join(out, "corpus.jsonl"), list(paragraphs(CORPUS + HELD_OUT)))
    for name, pre in VARIANTS.items():
        variant = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
        variant.pre_tokenizer = pre
        os.makedirs(os.path.join(out, name), exist_ok=True)
        variant.save(os.path.join(out, name, "tokenizer.json"))
        write_expected(Tokenizer.from_file(os.path.join(out, name, "tokenizer.json")),
                       os.path.join(out, name, "expected.jsonl"))


if __name__ == "__main__":
    main()
