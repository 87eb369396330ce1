"""What the end-to-end test scripts share: dsopen's binaries by name, running them, and collecting checks.

    H = Harness(sys.argv[1], "dsopen-gguf-")   # BIN_DIR, prefix of the scratch directory H.work
    H.must([H.b("convert"), ...])              # exits the script with the command's output when it fails
    H.check(ok, "what was checked")            # prints ok / FAIL and remembers failures
    H.finish()                                 # removes H.work when all passed; exit status 1 on any failure
    H.train_small("m", "{flavor: tiny-dense, ...}", steps=40)  # a quickly trained model's last checkpoint
"""
import os
import shutil
import subprocess
import sys
import tempfile


class Harness:
    def __init__(self, bin_dir, prefix):
        self.bin = bin_dir
        self.work = tempfile.mkdtemp(prefix=prefix)
        self.failures = []

    def b(self, name):
        return os.path.join(self.bin, "dsopen-" + name)

    def run(self, args, stdin=None):
        return subprocess.run(args, input=stdin, capture_output=True, text=True)

    def must(self, args, stdin=None):
        r = self.run(args, stdin)
        if r.returncode != 0:
            sys.exit(f"failed: {' '.join(args)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return r.stdout

    def check(self, ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            self.failures.append(what)

    def train_small(self, name, model, steps, vocab=600, micro_batch=4, warmup=None, lr=1.0e-2):
        """A tokenizer (trained once, with the SFT chat markers) and a `model` (YAML flow mapping) trained for
        `steps` on fortunes, 64-token rows; returns the directory of its last checkpoint."""
        fortunes = "/usr/share/games/fortunes/fortunes"
        tok = os.path.join(self.work, f"tok{vocab}.model")
        if not os.path.exists(tok):
            self.must([self.b("tokenizer"), "train", fortunes, "--vocab-size", str(vocab), "--character-coverage",
                       "0.999", "--user-symbols", "<|User|>,<|Assistant|>,<|System|>,<|end|>", "--output", tok])
        warm = f", warmup_steps: {warmup}" if warmup is not None else ""
        config = os.path.join(self.work, f"{name}.yaml")
        with open(config, "w") as f:
            f.write(f"""run: {{name: {name}, output_dir: {self.work}/{name}, seed: 3, log_every: 10, threads: 2}}
model: {model}
tokenizer: {{path: {tok}}}
data:
  train: [{self.work}/shards{vocab}/f_*.bin]
  seq_len: 64
  build: {{inputs: [{fortunes}], output: {self.work}/shards{vocab}/f, doc_separator: "%"}}
train: {{max_steps: {steps}, micro_batch_size: {micro_batch}, lr: {lr}{warm}}}
checkpoint: {{every: {steps}}}
""")
        self.must([self.b("train"), "--config", config])
        return os.path.join(self.work, name, "checkpoints", f"step_{steps:08d}")

    def finish(self):
        print(f"\n{len(self.failures)} failures")
        if not self.failures:
            shutil.rmtree(self.work)
        sys.exit(1 if self.failures else 0)
