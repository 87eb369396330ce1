"""What the end-to-end test scripts share: dsopen's binaries by name, running them, and collecting checks.

    H = Harness(sys.argv[1], "dsopen-gguf-")   # BIN_DIR, prefix of the scratch directory H.work
    H.must([H.b("convert"), ...])              # exits the script with the command's output when it fails
    H.check(ok, "what was checked")            # prints ok / FAIL and remembers failures
    H.finish()                                 # removes H.work when all passed; exit status 1 on any failure
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

    def finish(self):
        print(f"\n{len(self.failures)} failures")
        if not self.failures:
            shutil.rmtree(self.work)
        sys.exit(1 if self.failures else 0)
