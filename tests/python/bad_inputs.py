#!/usr/bin/env python3
"""Every binary on a table of bad inputs.

For each row the binary must: exit 1 (runtime) or 2 (usage), never by a signal or an abort; print exactly one
`error:` line on stderr, naming the input at fault (a file, key, flag or field) with no library internals; and leave
no output behind (the output paths the row names do not exist afterwards, and inputs are unchanged).

Usage: bad_inputs.py BIN_DIR
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

BIN = sys.argv[1]
FORTUNES = "/usr/share/games/fortunes/fortunes"
W = tempfile.mkdtemp(prefix="dsopen-bad-")
INTERNALS = ("terminate called", "what():", "Exception raised from", "c10::", "basic_filebuf", "std::", "Traceback",
             "nlohmann", "YAML::", "cxxopts", "json.exception", ".cc(", "rename into place")


def run(args, stdin=None, timeout=120):
    return subprocess.run(args, input=stdin, capture_output=True, text=True, errors="replace", timeout=timeout)


def must(args):
    r = run(args, timeout=600)
    if r.returncode != 0:
        sys.exit(f"fixture failed: {' '.join(args)}\n{r.stdout}\n{r.stderr}")
    return r


def write(name, data, mode="w"):
    path = os.path.join(W, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(data)
    return path


def digest(path):
    if os.path.isdir(path):
        return {n: digest(os.path.join(path, n)) for n in sorted(os.listdir(path))}
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a tokenizer, shards and a small trained model (real files made by the binaries themselves).
# ---------------------------------------------------------------------------------------------------------------
b = lambda name: os.path.join(BIN, "dsopen-" + name)
TOK = os.path.join(W, "tok.model")
must([b("tokenizer"), "train", "--input", FORTUNES, "--vocab-size", "400", "--character-coverage", "0.999",
      "--output", TOK])
must([b("preprocess"), "--tokenizer", TOK, "--input", FORTUNES, "--doc-separator", "%", "--output",
      os.path.join(W, "shards/f")])
RUN_YAML = write("run.yaml", f"""run: {{name: bad, output_dir: {W}/run, seed: 3, log_every: 1, threads: 1}}
model: {{flavor: debug, vocab_size: 400}}
tokenizer: {{path: {TOK}}}
data: {{train: [{W}/shards/f_*.bin], seq_len: 16}}
train: {{max_steps: 2, micro_batch_size: 2, lr: 1.0e-3}}
checkpoint: {{every: 2}}
""")
must([b("train"), "--config", RUN_YAML])
MODEL = os.path.join(W, "run/checkpoints/step_00000002")
assert os.path.exists(os.path.join(MODEL, "config.json")), os.listdir(os.path.join(W, "run/checkpoints"))
SHARD = os.path.join(W, "shards/f_00000")


def broken_model(name, edit):
    """A copy of the model directory with one file edited by `edit(dir)`."""
    d = os.path.join(W, name)
    shutil.copytree(MODEL, d)
    edit(d)
    return d


def truncate(path, frac=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * frac))


def overwrite(path, data):
    with open(path, "wb") as f:
        f.write(data)


def broken_shard(name, edit):
    prefix = os.path.join(W, "badshards", name)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    shutil.copy(SHARD + ".bin", prefix + ".bin")
    shutil.copy(SHARD + ".idx", prefix + ".idx")
    edit(prefix)
    return prefix


M_TRUNC_WEIGHTS = broken_model("m_trunc", lambda d: truncate(os.path.join(d, "model.safetensors")))
M_GARBAGE_WEIGHTS = broken_model("m_garbage", lambda d: overwrite(os.path.join(d, "model.safetensors"), os.urandom(4096)))
M_NO_WEIGHTS = broken_model("m_noweights", lambda d: os.remove(os.path.join(d, "model.safetensors")))
M_BAD_JSON = broken_model("m_badjson", lambda d: overwrite(os.path.join(d, "config.json"), b'{"hidden_size": 64,'))
M_EMPTY_JSON = broken_model("m_emptyjson", lambda d: overwrite(os.path.join(d, "config.json"), b""))
M_LATIN1_JSON = broken_model("m_latin1", lambda d: overwrite(os.path.join(d, "config.json"), b'{"model_type": "caf\xe9"}'))
M_ABSURD = broken_model("m_absurd", lambda d: overwrite(
    os.path.join(d, "config.json"),
    open(os.path.join(MODEL, "config.json")).read().replace('"vocab_size": 400', '"vocab_size": 1000000000000').encode()))
M_WRONG_TYPE = broken_model("m_wrongtype", lambda d: overwrite(
    os.path.join(d, "config.json"),
    open(os.path.join(MODEL, "config.json")).read().replace('"vocab_size": 400', '"vocab_size": "400"').encode()))
M_DIR_JSON = broken_model("m_dirjson", lambda d: (os.remove(os.path.join(d, "config.json")),
                                                   os.mkdir(os.path.join(d, "config.json"))))
M_BAD_TOK = broken_model("m_badtok", lambda d: overwrite(os.path.join(d, "tokenizer.model"), b"not a sentencepiece model"))
EMPTY_DIR = os.path.join(W, "emptydir")
os.makedirs(EMPTY_DIR)
S_TRUNC = broken_shard("trunc", lambda p: truncate(p + ".bin", 0.7))
S_BAD_IDX = broken_shard("badidx", lambda p: overwrite(p + ".idx", b'{"format": "dsopen-shard", "tokens": '))
S_HIGH_ID = broken_shard("highid", lambda p: overwrite(p + ".bin", b"\xff\xff" * (os.path.getsize(SHARD + ".bin") // 2)))
CORRUPT_TOK = write("corrupt.model", os.urandom(512), "wb")
EMPTY_FILE = write("empty.txt", "")
NON_UTF8 = write("latin1.txt", b"caf\xe9 cr\xe8me\n" * 50, "wb")
TOKENS_BAD = write("tokens_bad.txt", "1 2 x\n")
TOKENS_HIGH = write("tokens_high.txt", "1 2 99999\n")


def config(name, text):
    return write(name, text)


def cfg_with(extra):
    return open(RUN_YAML).read() + extra


CFG_DUP_KEY = config("dup_key.yaml", cfg_with("train: {max_steps: 1}\n").replace(
    "train: {max_steps: 2", "train: {max_steps: 2, max_steps: 3", 1))
CFG_DUP_SECTION = config("dup_section.yaml", cfg_with("train: {max_steps: 1}\n"))
CFG_TRUNC = config("trunc.yaml", open(RUN_YAML).read()[:-40])
CFG_NON_UTF8 = write("latin1.yaml", b"run: {name: caf\xe9}\n", "wb")
CFG_TAB = config("tab.yaml", "model:\n\tflavor: debug\n")
CFG_LIST_ROOT = config("list.yaml", "- a\n- b\n")
OUT = lambda name: os.path.join(W, "out", name)  # outputs that must not exist after a failure

# ---------------------------------------------------------------------------------------------------------------
# The table: (binary, arguments, what the error line must name, outputs that must not exist afterwards[, stdin])
# ---------------------------------------------------------------------------------------------------------------
CASES = []


def case(binary, args, names, outputs=(), stdin=None):
    CASES.append((binary, [str(a) for a in args], names, list(outputs), stdin))


# Configs (dsopen-train and dsopen-model-info read the same files)
for binary in ("train", "model-info", "bench-model"):
    case(binary, ["--config", "/nonexistent.yaml"], "/nonexistent.yaml")
    case(binary, ["--config", EMPTY_DIR], EMPTY_DIR)
    case(binary, ["--config", EMPTY_FILE], EMPTY_FILE)
    case(binary, ["--config", CFG_TRUNC], CFG_TRUNC)
    case(binary, ["--config", CFG_NON_UTF8], CFG_NON_UTF8)
    case(binary, ["--config", CFG_TAB], CFG_TAB)
    case(binary, ["--config", CFG_LIST_ROOT], CFG_LIST_ROOT)
    case(binary, ["--config", CFG_DUP_KEY], "max_steps")
    case(binary, ["--config", CFG_DUP_SECTION], "train")
    case(binary, ["--config", CORRUPT_TOK], CORRUPT_TOK)
for binary in ("train", "model-info"):
    for key, value in (("model.hidden_size", "2147483648"), ("model.vocab_size", "1000000000000"),
                       ("model.num_hidden_layers", "1000000000"), ("model.hidden_size", "-64"),
                       ("model.hidden_size", "abc"), ("model.hidden_size", "6.5"), ("model.rms_norm_eps", "-1"),
                       ("model.num_attention_heads", "0"), ("model.flavor", "nosuch")):
        case(binary, ["--config", RUN_YAML, "--set", f"{key}={value}"], key.split(".")[1], [os.path.join(W, "run2")])
    case(binary, ["--config", RUN_YAML, "--set", "nosuchsection.x=1"], "nosuchsection")
    case(binary, ["--config", RUN_YAML, "--set", "model.hidden_size"], "model.hidden_size")
def train_case(setting, names, outputs):
    """dsopen-train on the fixture config with its output in $W/run2 and one --set."""
    case("train", ["--config", RUN_YAML, "--set", f"run.output_dir={W}/run2", "--set", setting], names, outputs)

train_case("train.lr=-1", "train.lr", [f"{W}/run2"])
train_case("train.max_steps=-5", "train.max_steps", [f"{W}/run2"])
train_case("data.seq_len=100000", "data.seq_len", [f"{W}/run2"])
train_case("train.precision=fp8", "train.precision", [f"{W}/run2"])
train_case(f"data.train=[{W}/nosuch_*.bin]", "nosuch_", [f"{W}/run2/checkpoints"])
train_case(f"data.train=[{S_TRUNC}.bin]", S_TRUNC, [f"{W}/run2/checkpoints"])
train_case(f"data.train=[{S_BAD_IDX}.bin]", S_BAD_IDX, [f"{W}/run2/checkpoints"])
train_case(f"data.train=[{S_HIGH_ID}.bin]", S_HIGH_ID, [f"{W}/run2/checkpoints"])
train_case(f"tokenizer.path={CORRUPT_TOK}", CORRUPT_TOK, [f"{W}/run2/checkpoints"])
train_case(f"checkpoint.resume={M_TRUNC_WEIGHTS}", M_TRUNC_WEIGHTS, [f"{W}/run2/checkpoints"])
train_case(f"model.pretrained={M_BAD_JSON}", M_BAD_JSON, [f"{W}/run2"])
case("train", ["--config", RUN_YAML, "--set", f"model.pretrained={MODEL}"], "checkpoint.dir")
# Expert parallelism: E must divide the routed experts and the ranks started, and needs a MoE model.
train_case("parallel.expert_parallel=3", "parallel.expert_parallel", [f"{W}/run2"])
train_case("parallel.expert_parallel=0", "parallel.expert_parallel", [f"{W}/run2"])
train_case("parallel.expert_parallel=2", "parallel.expert_parallel", [f"{W}/run2/checkpoints"])
case("train", ["--config", RUN_YAML, "--set", f"run.output_dir={W}/run2", "--set", "model.n_routed_experts=0",
               "--set", "parallel.expert_parallel=2"], "parallel.expert_parallel", [f"{W}/run2"])
case("model-info", ["--config", RUN_YAML, "--world-size", "4", "--expert-parallel", "3"], "--expert-parallel")
case("model-info", ["--config", RUN_YAML, "--world-size", "2", "--expert-parallel", "0"], "--expert-parallel")
case("model-info", ["--config", RUN_YAML, "--world-size", "32", "--expert-parallel", "16"], "--expert-parallel")
case("model-info", ["--config", RUN_YAML, "--world-size", "0"], "--world-size")
case("model-info", ["--config", RUN_YAML, "--world-size", "4", "--strategy", "zero4"], "--strategy")
case("model-info", ["--config", RUN_YAML, "--strategy", "zero3", "--micro-batch", "0"], "--micro-batch")
case("model-info", ["--config", RUN_YAML, "--strategy", "zero3", "--micro-batch", "9223372036854775807"], "--micro-batch")
case("model-info", ["--config", RUN_YAML, "--strategy", "zero3", "--precision", "fp8"], "--precision")
case("model-info", ["--config", RUN_YAML, "--world-size", "two"], "--world-size")
case("model-info", ["--config", RUN_YAML, "--seq-len", "-5"], "--seq-len")
case("model-info", ["--config", os.path.join(M_BAD_JSON, "config.json")], M_BAD_JSON)
case("model-info", ["--config", os.path.join(M_ABSURD, "config.json")], "vocab_size")
case("model-info", ["--config", RUN_YAML, "--hf-config", EMPTY_DIR], EMPTY_DIR)
for flag, value in (("--batch", "0"), ("--batch", "x"), ("--steps", "-1"), ("--precision", "fp8"), ("--device", "tpu"),
                    ("--seq-len", "0"), ("--warmup", "-2")):
    case("bench-model", ["--config", RUN_YAML, flag, value], flag)

# Model directories (everything that loads a model)
LOADERS = {
    "generate": ["--prompt", "hi", "--max-new-tokens", "2"],
    "eval": ["--tokens", TOKENS_HIGH.replace("high", "ok"), "--dump-logits", OUT("logits.safetensors")],
    "convert": ["--out", OUT("convert")],
    "quantize": ["--method", "rtn-int8", "--out", OUT("quantize")],
}
write("tokens_ok.txt", "1 2 3 4\n")
for binary, extra in LOADERS.items():
    outs = [OUT(binary), OUT("logits.safetensors")]
    case(binary, ["--model", "/nonexistent/model", *extra], "/nonexistent/model", outs)
    case(binary, ["--model", EMPTY_DIR, *extra], EMPTY_DIR, outs)
    case(binary, ["--model", EMPTY_FILE, *extra], EMPTY_FILE, outs)
    case(binary, ["--model", M_BAD_JSON, *extra], M_BAD_JSON, outs)
    case(binary, ["--model", M_EMPTY_JSON, *extra], M_EMPTY_JSON, outs)
    case(binary, ["--model", M_LATIN1_JSON, *extra], M_LATIN1_JSON, outs)
    case(binary, ["--model", M_DIR_JSON, *extra], M_DIR_JSON, outs)
    case(binary, ["--model", M_WRONG_TYPE, *extra], "vocab_size", outs)
    case(binary, ["--model", M_ABSURD, *extra], "vocab_size", outs)
    case(binary, ["--model", M_TRUNC_WEIGHTS, *extra], M_TRUNC_WEIGHTS, outs)
    case(binary, ["--model", M_GARBAGE_WEIGHTS, *extra], M_GARBAGE_WEIGHTS, outs)
    case(binary, ["--model", M_NO_WEIGHTS, *extra], M_NO_WEIGHTS, outs)
    if binary != "quantize":
        case(binary, ["--model", MODEL, "--adapter", EMPTY_DIR, *extra], EMPTY_DIR, outs)
    case(binary, ["--model", MODEL, "--threads", "abc", *extra], "--threads", outs) if binary != "convert" else None
case("generate", ["--model", M_BAD_TOK, "--prompt", "hi"], M_BAD_TOK)
case("generate", ["--model", MODEL, "--tokenizer", CORRUPT_TOK, "--prompt", "hi"], CORRUPT_TOK)
case("generate", ["--model", MODEL, "--prompt-file", "/nonexistent.txt"], "/nonexistent.txt")
case("generate", ["--model", MODEL, "--prompt-file", EMPTY_DIR], EMPTY_DIR)
case("generate", ["--model", MODEL, "--prompt-ids", "1 x 3"], "--prompt-ids")
case("generate", ["--model", MODEL, "--prompt-ids", "1 99999"], "99999")
for flag, value in (("--max-new-tokens", "-1"), ("--max-new-tokens", "abc"), ("--temperature", "-1"),
                    ("--temperature", "nan"), ("--top-p", "2"), ("--top-k", "-1"), ("--repetition-penalty", "0"),
                    ("--dtype", "fp8"), ("--repeat", "0")):
    case("generate", ["--model", MODEL, "--prompt", "hi", flag, value], flag)
case("eval", ["--model", MODEL, "--tokens", TOKENS_BAD, "--dump-logits", OUT("logits.safetensors")], TOKENS_BAD,
     [OUT("logits.safetensors")])
case("eval", ["--model", MODEL, "--tokens", TOKENS_HIGH, "--dump-logits", OUT("logits.safetensors")], TOKENS_HIGH,
     [OUT("logits.safetensors")])
case("eval", ["--model", MODEL, "--tokens", EMPTY_FILE, "--dump-logits", OUT("logits.safetensors")], EMPTY_FILE,
     [OUT("logits.safetensors")])
case("eval", ["--model", MODEL, "--tokens", NON_UTF8, "--dump-logits", OUT("logits.safetensors")], NON_UTF8,
     [OUT("logits.safetensors")])
case("eval", ["--model", MODEL, "--tokens", "/nonexistent.txt", "--dump-logits", OUT("logits.safetensors")], "/nonexistent.txt",
     [OUT("logits.safetensors")])
case("eval", ["--model", MODEL, "--ppl", "--data", f"{S_TRUNC}.bin"], S_TRUNC)
case("eval", ["--model", MODEL, "--ppl", "--data", f"{W}/nosuch_*.bin"], "nosuch_")
case("eval", ["--model", MODEL, "--ppl", "--data", f"{SHARD}.bin", "--seq-len", "0"], "--seq-len")
case("eval", ["--model", MODEL, "--tokens", os.path.join(W, "tokens_ok.txt"), "--dump-logits",
              os.path.join(MODEL, "model.safetensors")], "--dump-logits")
case("convert", ["--model", MODEL, "--out", MODEL], "--out")
case("convert", ["--model", MODEL, "--out", OUT("convert"), "--dtype", "int3"], "--dtype", [OUT("convert")])
case("convert", ["--model", MODEL, "--out", OUT("convert"), "--max-shard-mb", "0"], "--max-shard-mb", [OUT("convert")])
case("quantize", ["--model", MODEL, "--method", "int7", "--out", OUT("quantize")], "--method", [OUT("quantize")])
case("quantize", ["--model", MODEL, "--method", "rtn-int4", "--group-size", "7", "--out", OUT("quantize")],
     "--group-size", [OUT("quantize")])
case("quantize", ["--model", MODEL, "--method", "rtn-int4", "--group-size", "0", "--out", OUT("quantize")],
     "--group-size", [OUT("quantize")])
case("quantize", ["--model", MODEL, "--method", "gptq-int4", "--calib-data", f"{W}/nosuch_*.bin", "--out",
                  OUT("quantize")], "nosuch_", [OUT("quantize")])
case("quantize", ["--model", MODEL, "--method", "gptq-int4", "--calib-data", f"{SHARD}.bin", "--damp", "-1", "--out",
                  OUT("quantize")], "--damp", [OUT("quantize")])
case("quantize", ["--model", MODEL, "--method", "rtn-int8", "--scale-dtype", "int8", "--out", OUT("quantize")],
     "--scale-dtype", [OUT("quantize")])
case("quantize", ["--model", MODEL, "--method", "rtn-int8", "--out", MODEL], "--out")

# Tokenizers and corpora
case("tokenizer", ["encode", "--model", CORRUPT_TOK, "--text", "hi"], CORRUPT_TOK)
case("tokenizer", ["encode", "--model", EMPTY_FILE, "--text", "hi"], EMPTY_FILE)
case("tokenizer", ["encode", "--model", EMPTY_DIR, "--text", "hi"], EMPTY_DIR)
case("tokenizer", ["decode", "--model", TOK, "--ids", "1 x"], "--ids")
case("tokenizer", ["decode", "--model", TOK, "--jsonl"], "stdin:1", stdin='"not a list"\n')
case("tokenizer", ["encode", "--model", TOK, "--jsonl"], "stdin:2", stdin='"ok"\n{not json\n')
case("tokenizer", ["train", "--input", "/nonexistent.txt", "--output", OUT("t.model")], "/nonexistent.txt", [OUT("t.model")])
case("tokenizer", ["train", "--input", EMPTY_FILE, "--output", OUT("t.model")], EMPTY_FILE, [OUT("t.model")])
case("tokenizer", ["train", "--input", NON_UTF8, "--output", OUT("t.model")], NON_UTF8, [OUT("t.model")])
case("tokenizer", ["train", "--input", FORTUNES, "--vocab-size", "10", "--output", OUT("t.model")], "--vocab-size",
     [OUT("t.model")])
case("tokenizer", ["train", "--input", FORTUNES, "--model-type", "wordpiece", "--output", OUT("t.model")],
     "--model-type", [OUT("t.model")])
case("tokenizer", ["train", "--input", FORTUNES, "--output", EMPTY_DIR], EMPTY_DIR)
case("tokenizer", ["train", "--input", NON_UTF8, "--output", NON_UTF8], "--output")
case("preprocess", ["--tokenizer", TOK, "--input", "/nonexistent.txt", "--output", OUT("pp/x")], "/nonexistent.txt",
     [OUT("pp")])
case("preprocess", ["--tokenizer", TOK, "--input", EMPTY_FILE, "--output", OUT("pp/x")], EMPTY_FILE, [OUT("pp")])
case("preprocess", ["--tokenizer", TOK, "--input", NON_UTF8, "--invalid-utf8", "fail", "--output", OUT("pp/x")],
     NON_UTF8, [OUT("pp")])
case("preprocess", ["--tokenizer", CORRUPT_TOK, "--input", FORTUNES, "--output", OUT("pp/x")], CORRUPT_TOK, [OUT("pp")])
case("preprocess", ["--tokenizer", TOK, "--input", FORTUNES, "--shard-tokens", "0", "--output", OUT("pp/x")],
     "--shard-tokens", [OUT("pp")])
case("preprocess", ["--tokenizer", TOK, "--input", FORTUNES, "--invalid-utf8", "maybe", "--output", OUT("pp/x")],
     "--invalid-utf8", [OUT("pp")])
case("preprocess", ["--tokenizer", TOK, "--input", os.path.dirname(NON_UTF8), "--output", os.path.join(W, "inside/x")],
     "--output", [os.path.join(W, "inside")])
case("preprocess", ["--tokenizer", TOK, "--input", FORTUNES, "--jsonl-field", "", "--output", OUT("pp/x")],
     "--jsonl-field", [OUT("pp")])

# Outputs that would damage an input, the model or a system file; paths the OS refuses.
FIFO = os.path.join(W, "fifo")
os.mkfifo(FIFO)
LOOP = os.path.join(W, "loop")
os.symlink(LOOP, LOOP)
RUN_DIR = os.path.join(W, "run")
TOKENS_OK = os.path.join(W, "tokens_ok.txt")
OTHER_DIR = os.path.join(W, "other")
os.makedirs(OTHER_DIR)
write("other/notes.txt", "not a model")
M_LINK = os.path.join(W, "m_link")
os.symlink(MODEL, M_LINK)
for target in (TOKENS_OK, os.path.join(MODEL, "logits.safetensors"), os.path.join(M_LINK, "logits.safetensors"),
               "/dev/full", "", EMPTY_DIR):
    case("eval", ["--model", MODEL, "--tokens", TOKENS_OK, "--dump-logits", target], "--dump-logits",
         [os.path.join(MODEL, "logits.safetensors")])
for target in ("/dev/full", os.path.join(MODEL, "config.json"), RUN_YAML, EMPTY_DIR):
    case("model-info", ["--config", RUN_YAML, "--hf-config", target], "--hf-config")
for target in (os.path.join(MODEL, "model.safetensors"), os.path.join(MODEL, "tokenizer.model"), os.path.join(MODEL, "trace.json"),
               EMPTY_DIR):
    case("generate", ["--model", MODEL, "--prompt", "hi", "--max-new-tokens", "1", "--profile", target], "--profile",
         [os.path.join(MODEL, "trace.json")])
for target in (RUN_YAML, EMPTY_DIR, "/dev/full"):
    case("bench-model", ["--config", RUN_YAML, "--steps", "1", "--warmup", "0", "--batch", "1", "--profile", target],
         "--profile")
for binary, extra in (("convert", []), ("quantize", ["--method", "rtn-int8", "--group-size", "-1"])):
    for target in (RUN_DIR, os.path.join(RUN_DIR, "checkpoints"), os.path.join(MODEL, "sub"),
                   os.path.join(M_LINK, "sub"), OTHER_DIR, TOKENS_OK, "", "/"):
        case(binary, ["--model", MODEL, *extra, "--out", target], "--out", [os.path.join(MODEL, "sub"),
                                                                             os.path.join(RUN_DIR, "config.json"),
                                                                             os.path.join(OTHER_DIR, "config.json"),
                                                                             "/config.json"])
case("tokenizer", ["train", "--input", FORTUNES, "--vocab-size", "400", "--output", ""], "--output")
case("tokenizer", ["train", "--input", FORTUNES, "--vocab-size", "400", "--user-symbols", "<s>", "--output",
                   OUT("t.model")], "--user-symbols", [OUT("t.model")])
case("tokenizer", ["train", "--input", FORTUNES, "--vocab-size", "400", "--user-symbols", "<|a|>,<|a|>", "--output",
                   OUT("t.model")], "--user-symbols", [OUT("t.model")])
case("tokenizer", ["decode", "--model", TOK, "--jsonl"], "stdin:1", stdin="[1, 2, 99999]\n")
case("quantize", ["--model", MODEL, "--method", "gptq-int4", "--group-size", "16", "--calib-data", f"{SHARD}.bin",
                  "--calib-seq-len", "0", "--out", OUT("quantize")], "--calib-seq-len", [OUT("quantize")])

# Config files and values no tool could mean
CFG_ALIAS = config("alias.yaml", "model: &m {flavor: debug, x: *m}\n")
CFG_KEY = config("key.yaml", "model: {flavor: debug, [a, b]: 3}\n")
CFG_BASE_DIR = config("basedir.yaml", f"base: {EMPTY_DIR}\n")
CFG_NUL = write("nul.yaml", b"model: {flavor: debug}\n\x00\x01\n", "wb")
CFG_TWO_DOCS = config("two_docs.yaml", open(RUN_YAML).read() + "---\nmodel: {flavor: tiny}\n")
CFG_NULL_MODEL = config("null_model.yaml", open(RUN_YAML).read().replace("model: {flavor: debug, vocab_size: 400}", "model:"))
for binary in ("train", "model-info", "bench-model"):
    for cfg, names in ((FIFO, FIFO), (LOOP, LOOP), (CFG_ALIAS, "alias.yaml"), (CFG_KEY, "key.yaml"),
                       (CFG_BASE_DIR, EMPTY_DIR), (CFG_NUL, "nul.yaml"), (CFG_TWO_DOCS, "two_docs.yaml"),
                       (CFG_NULL_MODEL, "model")):
        case(binary, ["--config", cfg], names, [os.path.join(W, "run2")])
for binary in ("train", "model-info"):
    case(binary, ["--config", RUN_YAML, "--set", "model.rope_theta=.inf"], "model.rope_theta")
    case(binary, ["--config", RUN_YAML, "--set", "model=null"], "model")
case("model-info", ["--config", RUN_YAML, "--seq-len", "2000000000000"], "--seq-len")
for args, names in (([EMPTY_DIR], "metrics.jsonl"), (["/nonexistent"], "/nonexistent"), ([], "RUN_DIR"),
                    ([RUN_DIR, "--out", EMPTY_DIR], "--out"), ([RUN_DIR, "--out", "/dev/full"], "--out"),
                    ([RUN_DIR, "--out", os.path.join(RUN_DIR, "metrics.jsonl")], "--out"),
                    ([RUN_DIR, "--width", "5"], "--width"), ([RUN_DIR, "--height", "x"], "--height")):
    case("plot", [*args] if "--out" in args else [*args, "--out", OUT("p.png")], names, [OUT("p.png")])
train_case("train.grad_accum_steps=1000000000000", "train.grad_accum_steps", [f"{W}/run2"])
train_case("run.threads=100000", "run.threads", [f"{W}/run2"])
train_case('data.train=[""]', "data.train", [f"{W}/run2"])
try:
    import torch
    cuda = torch.cuda.is_available()
except ImportError:
    cuda = False
if not cuda:
    train_case("run.device=cuda", "run.device", [f"{W}/run2"])
for value in ("100000", "-3"):
    case("bench-model", ["--config", RUN_YAML, "--threads", value], "--threads")
for binary, extra in LOADERS.items():
    case(binary, ["--model", LOOP, *extra], LOOP, [OUT(binary), OUT("logits.safetensors")])
# Exports refuse files that dsopen itself (or transformers) would refuse later, instead of copying them on.
M_GEN_EOS = broken_model("m_gen_eos", lambda d: overwrite(os.path.join(d, "generation_config.json"),
                                                          b'{"eos_token_id": 99999}'))
M_TOK_DUP = broken_model("m_tok_dup", lambda d: (os.remove(os.path.join(d, "tokenizer.model")),
                                                 overwrite(os.path.join(d, "tokenizer.json"), b'{"a": 1, "a": 2}')))
for binary, extra in (("convert", []), ("quantize", ["--method", "rtn-int8", "--group-size", "-1"])):
    case(binary, ["--model", M_GEN_EOS, *extra, "--out", OUT(binary)], "generation_config.json", [OUT(binary)])
    case(binary, ["--model", M_TOK_DUP, *extra, "--out", OUT(binary)], "tokenizer.json", [OUT(binary)])

# GGUF exports and GPTQ directories (a real quantized model, then damaged copies).
QUANT = os.path.join(W, "quant")
subprocess.run([os.path.join(BIN, "dsopen-quantize"), "--model", MODEL, "--method", "rtn-int4", "--group-size", "16",
                "--out", QUANT], check=True, capture_output=True)


def broken_quant(name, edit_tensors=None, edit_config=None):
    from safetensors.torch import load_file, save_file
    d = os.path.join(W, name)
    shutil.copytree(QUANT, d)
    if edit_tensors:
        t = load_file(os.path.join(d, "model.safetensors"))
        edit_tensors(t)
        save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        c = json.load(open(os.path.join(d, "config.json")))
        edit_config(c["quantization_config"])
        overwrite(os.path.join(d, "config.json"), json.dumps(c).encode())
    return d


def nan_scale(t):
    t["model.layers.0.mlp.up_proj.scales"][0, 0] = float("nan")


Q_NAN = broken_quant("q_nan", edit_tensors=nan_scale)
Q_FORMAT = broken_quant("q_format", edit_config=lambda q: q.update(checkpoint_format=5))
Q_BITS = broken_quant("q_bits", edit_config=lambda q: q.update(bits=3))
Q_GIDX = broken_quant("q_gidx", edit_tensors=lambda t: t.update({"model.layers.0.mlp.up_proj.g_idx":
                                                                   t["model.layers.0.mlp.up_proj.g_idx"] + 1000}))
for binary, extra in LOADERS.items():
    outs = [OUT(binary), OUT("logits.safetensors")]
    case(binary, ["--model", Q_NAN, *extra], "up_proj.scales", outs)
    case(binary, ["--model", Q_FORMAT, *extra], "checkpoint_format", outs)
    case(binary, ["--model", Q_BITS, *extra], "bits 3", outs)
    case(binary, ["--model", Q_GIDX, *extra], "up_proj.g_idx", outs)
# An HF-style directory (tokenizer.json, no tokenizer.model) whose tokenizer_config.json is not an object.
HF_EXPORT = os.path.join(W, "hf_export")
subprocess.run([os.path.join(BIN, "dsopen-convert"), "--model", MODEL, "--out", HF_EXPORT], check=True,
               capture_output=True)
M_TOKCFG = broken_model("m_tokcfg", lambda d: (os.remove(os.path.join(d, "tokenizer.model")),
                                               shutil.copy(os.path.join(HF_EXPORT, "tokenizer.json"), d),
                                               overwrite(os.path.join(d, "tokenizer_config.json"), b"[]")))
GGUF = OUT("model.gguf")
NOT_GGUF = write("not_a_model.gguf", "my notes\n")
for args, names in ((["--format", "gguf", "--type", "q5_k"], "--type"), (["--type", "q8_0"], "--type"),
                    (["--format", "gguf", "--dtype", "bf16"], "--dtype"), (["--format", "ggml"], "--format"),
                    (["--format", "gguf", "--max-shard-mb", "1"], "--max-shard-mb"),
                    (["--format", "gguf", "--keep-mtp"], "--keep-mtp")):
    case("convert", ["--model", MODEL, *args, "--out", GGUF], names, [GGUF])
case("convert", ["--model", MODEL, "--format", "gguf", "--out", OUT("exported")], ".gguf", [OUT("exported")])
case("convert", ["--model", MODEL, "--format", "gguf", "--out", NOT_GGUF], NOT_GGUF)
case("convert", ["--model", M_TOKCFG, "--out", OUT("convert")], "tokenizer_config.json", [OUT("convert")])
case("quantize", ["--model", MODEL, "--method", "rtn-int4", "--group-size", "0"], "--group-size")
case("quantize", ["--model", MODEL, "--method", "gptq-int4", "--group-size", "16", "--calib-data", f"{W}/nope_*.bin"],
     "--calib-data")
case("plot", [os.path.join(W, "run"), "--out", os.path.join(W, "run", "metrics.jsonl")], "--out")

# ---------------------------------------------------------------------------------------------------------------
inputs_before = {p: digest(p) for p in (MODEL, TOK, SHARD + ".bin", SHARD + ".idx", NON_UTF8, RUN_YAML)}
failures = []
for binary, args, names, outputs, stdin in CASES:
    label = f"dsopen-{binary} {' '.join(args)}".replace(W, "$W")
    shutil.rmtree(os.path.join(W, "run2"), ignore_errors=True)  # a failed run keeps its logs; each case starts clean
    try:
        r = run([b(binary), *args], stdin=stdin)
    except subprocess.TimeoutExpired:
        failures.append(f"{label}: did not finish in 120 s")
        continue
    problems = []
    if r.returncode < 0 or r.returncode >= 128:
        problems.append(f"killed by a signal or abort (exit {r.returncode})")
    elif r.returncode not in (1, 2):
        problems.append(f"exit {r.returncode}, want 1 or 2")
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    if len(errors) != 1:
        problems.append(f"{len(errors)} error: lines")
    elif names not in errors[0]:
        problems.append(f"the error does not name {names!r}")
    elif any(s in errors[0] for s in INTERNALS):
        problems.append("library internals in the error")
    for o in outputs:
        if os.path.exists(o):
            problems.append(f"left {o.replace(W, '$W')} behind")
            shutil.rmtree(o, ignore_errors=True) if os.path.isdir(o) else os.remove(o)
    if problems:
        failures.append(f"{label}: {'; '.join(problems)}\n    stderr: {(errors or r.stderr.splitlines()[-1:] or [''])[0]}")
    else:
        print(f"ok   {label[:150]}\n       {errors[0].replace(W, '$W')[:200]}")
for p, d in inputs_before.items():
    if digest(p) != d:
        failures.append(f"input {p} was changed")

# Values with commas pass through --set whole (cxxopts would split them into two assignments).
r = run([b("model-info"), "--config", RUN_YAML, "--set", "model.rope_scaling={type: yarn, factor: 4}", "--json"])
if r.returncode != 0:
    failures.append(f"--set with a flow mapping: exit {r.returncode}: {r.stderr.strip()[-200:]}")
# A mistyped DSOPEN_FUSED_OPS is refused, not silently ignored.
r = subprocess.run([b("bench-model"), "--config", RUN_YAML, "--steps", "1", "--warmup", "0"], capture_output=True,
                   text=True, env={**os.environ, "DSOPEN_FUSED_OPS": "flase"}, timeout=120)
if r.returncode != 2 or "DSOPEN_FUSED_OPS" not in r.stderr or any(i in r.stderr for i in INTERNALS):
    failures.append(f"DSOPEN_FUSED_OPS=flase: exit {r.returncode}: {r.stderr.strip()[-200:]}")
# A run refused while starting (the tokenizer does not fit the model) leaves the directory's resolved config alone.
resolved = os.path.join(W, "run", "config.resolved.yaml")
if os.path.exists(resolved):
    before = digest(resolved)
    r = run([b("train"), "--config", RUN_YAML, "--set", "model.vocab_size=16"])
    if r.returncode != 2 or digest(resolved) != before:
        failures.append(f"refused run: exit {r.returncode}, config.resolved.yaml {'kept' if digest(resolved) == before else 'replaced'}")
else:
    failures.append(f"fixture run left no {resolved}")
if not os.path.exists("/dev/full") or not os.path.stat.S_ISCHR(os.stat("/dev/full").st_mode):
    failures.append("/dev/full is no longer a character device")

print(f"\n{len(CASES)} bad inputs, {len(failures)} failures")
for f in failures:
    print("FAIL", f)
if not failures:
    shutil.rmtree(W)
sys.exit(1 if failures else 0)
