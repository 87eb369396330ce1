"""Differential test of the safetensors reader against the reference library (`safetensors`, Rust): hand-written
corruptions of every rule in the format, plus random byte and header mutations of valid files, must be accepted
or refused by `dsopen-model-info --safetensors` exactly when `safetensors.safe_open` accepts or refuses them, and
accepted files must list the same tensors (name, dtype, shape) and metadata. One deliberate difference: a key
repeated in the header JSON is always refused by dsopen (the reference keeps the last copy, and with it whatever
that copy points at). Usage: diff_safetensors.py BIN_DIR [--cases N]"""
import json, os, random, struct, subprocess, sys, tempfile

from safetensors import safe_open

BIN = sys.argv[1]
N_RANDOM = int(sys.argv[sys.argv.index("--cases") + 1]) if "--cases" in sys.argv else 2000


def file_bytes(header=None, data=b"", raw=None, pad=b""):
    h = (raw if raw is not None else json.dumps(header).encode()) + pad
    return struct.pack("<Q", len(h)) + h + data


def reference(path):
    try:
        with safe_open(path, "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any refusal counts
        return None, str(e)


def ours(paths):
    """dsopen's verdict for every file, from one dsopen-model-info call (a JSON object per line)."""
    args = [os.path.join(BIN, "dsopen-model-info")]
    for p in paths:
        args += ["--safetensors", p]
    r = subprocess.run(args + ["--json"], capture_output=True, text=True, errors="replace")
    out = {}
    for line in r.stdout.splitlines():
        j = json.loads(line)
        if "error" in j:
            out[j["file"]] = (None, j["error"])
        else:
            out[j["file"]] = ({k: (v["dtype"], v["shape"]) for k, v in j["tensors"].items()}, j["metadata"])
    missing = [p for p in paths if p not in out]
    if missing:
        sys.exit(f"dsopen-model-info gave no verdict for {missing[:3]}: exit {r.returncode}, {r.stderr[:300]}")
    return out


A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
T = lambda dt, shape, b, e: {"dtype": dt, "shape": shape, "data_offsets": [b, e]}
CASES = {
    "valid": file_bytes({"__metadata__": {"format": "pt"}, "a": A, "b": T("BF16", [3], 8, 14)}, bytes(14)),
    "gap_before_first": file_bytes({"a": T("F32", [2], 4, 12)}, bytes(12)),
    "hole_between": file_bytes({"a": A, "b": T("F32", [1], 12, 16)}, bytes(16)),
    "overlap": file_bytes({"a": A, "b": T("F32", [2], 4, 12)}, bytes(12)),
    "bytes_after_last": file_bytes({"a": A}, bytes(12)),
    "past_end": file_bytes({"a": T("F32", [4], 0, 16)}, bytes(8)),
    "zero_size_middle": file_bytes({"a": T("F32", [1], 0, 4), "z": T("F32", [0], 4, 4), "b": T("F32", [1], 4, 8)}, bytes(8)),
    "zero_size_start_end": file_bytes({"z": T("F32", [0], 0, 0), "a": A, "y": T("I64", [0, 3], 8, 8)}, bytes(8)),
    "zero_size_outside": file_bytes({"a": A, "z": T("F32", [0], 9, 9)}, bytes(8)),
    "begin_after_end": file_bytes({"a": T("F32", [0], 8, 0)}, bytes(8)),
    "span_mismatch": file_bytes({"a": T("F32", [3], 0, 8)}, bytes(8)),
    "metadata_null": file_bytes({"__metadata__": None, "a": A}, bytes(8)),
    "metadata_number": file_bytes({"__metadata__": {"x": 1}, "a": A}, bytes(8)),
    "metadata_list": file_bytes({"__metadata__": [], "a": A}, bytes(8)),
    "extra_field": file_bytes({"a": dict(A, extra=[1, 2])}, bytes(8)),
    "missing_shape": file_bytes({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8)),
    "float_dim": file_bytes(raw=b'{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', data=bytes(8)),
    "exponent_offset": file_bytes(raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8e0]}}', data=bytes(8)),
    "negative_dim": file_bytes({"a": T("F32", [-2], 0, 8)}, bytes(8)),
    "huge_offset": file_bytes(raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551616]}}', data=bytes(8)),
    "shape_overflow": file_bytes({"a": T("F32", [2 ** 62, 4], 0, 8)}, bytes(8)),
    "huge_dim_but_empty": file_bytes({"a": A, "z": T("F32", [0, 2 ** 62], 8, 8)}, bytes(8)),
    "three_offsets": file_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, bytes(8)),
    "string_offsets": file_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, bytes(8)),
    "lowercase_dtype": file_bytes({"a": T("f32", [2], 0, 8)}, bytes(8)),
    "unknown_dtype": file_bytes({"a": T("F12", [2], 0, 8)}, bytes(8)),
    "fp8_u16_c64": file_bytes({"a": T("F8_E4M3", [2], 0, 2), "b": T("U16", [1], 2, 4), "c": T("C64", [1], 4, 12),
                               "d": T("F8_E5M2", [2], 12, 14), "e": T("U64", [1], 14, 22), "f": T("U32", [1], 22, 26)}, bytes(26)),
    "f4_whole_bytes": file_bytes({"a": T("F4", [4], 0, 2)}, bytes(2)),
    "f4_half_byte": file_bytes({"a": T("F4", [3], 0, 2)}, bytes(2)),
    "f6": file_bytes({"a": T("F6_E2M3", [4], 0, 3)}, bytes(3)),
    "bool": file_bytes({"a": T("BOOL", [2], 0, 2)}, bytes(2)),
    "empty_header": file_bytes({}),
    "empty_header_with_data": file_bytes({}, b"x"),
    "header_padded_spaces": file_bytes({"a": A}, bytes(8), pad=b"      "),
    "header_leading_whitespace": file_bytes(raw=b'\n\t {"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data=bytes(8)),
    "header_nul_padding": file_bytes({"a": A}, bytes(8), pad=b"\0\0"),
    "header_trailing_junk": file_bytes({"a": A}, bytes(8), pad=b"x"),
    "header_bom": file_bytes(raw=b'\xef\xbb\xbf{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data=bytes(8)),
    "header_not_utf8": file_bytes(raw=b'{"a\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data=bytes(8)),
    "header_array": file_bytes(raw=b"[]"),
    "header_zero_length": struct.pack("<Q", 0),
    "header_length_past_end": struct.pack("<Q", 64) + b"{}",
    "header_length_huge": struct.pack("<Q", 2 ** 40) + b"{}",
    "file_7_bytes": b"\0" * 7,
    "empty_name": file_bytes({"": A}, bytes(8)),
    "unicode_names": file_bytes({"gewicht.ü": A, "\u4e2d": T("F32", [0], 8, 8)}, bytes(8)),
    "duplicate_tensor_elsewhere": file_bytes(raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                                 b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', data=bytes(16)),
    "duplicate_field_in_tensor": file_bytes(raw=b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data=bytes(8)),
}
# Repeated keys: always refused here, sometimes accepted (last copy wins) by the reference.
REPEATED = {
    "duplicate_tensor_same_place": file_bytes(raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                                  b'"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},'
                                                  b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data=bytes(16)),
    "duplicate_metadata_key": file_bytes(raw=b'{"__metadata__":{"x":"1","x":"2"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data=bytes(8)),
}


def mutations(rng, n):
    """Random edits of valid files: a byte of the header changed, a number in it changed, bytes cut or added."""
    base = [CASES["valid"], CASES["zero_size_middle"], CASES["fp8_u16_c64"], CASES["zero_size_start_end"]]
    out = {}
    for i in range(n):
        b = bytearray(rng.choice(base))
        hlen = struct.unpack("<Q", bytes(b[:8]))[0]
        kind = rng.randrange(5)
        if kind == 0:  # one header byte replaced by a JSON-significant character or a digit
            b[8 + rng.randrange(hlen)] = ord(rng.choice('0123456789{}[],:" .-eE'))
        elif kind == 1:  # a number in the header nudged
            text = bytes(b[8:8 + hlen]).decode()
            digits = [j for j, c in enumerate(text) if c.isdigit()]
            j = rng.choice(digits)
            text = text[:j] + str((int(text[j]) + rng.choice([1, 2, 9])) % 10) + text[j + 1:]
            b[8:8 + hlen] = text.encode()
        elif kind == 2:  # the file cut short or extended
            b = b[:len(b) - rng.randrange(1, 5)] if rng.random() < 0.5 else b + bytes(rng.randrange(1, 5))
        elif kind == 3:  # the header length off by a little
            b[:8] = struct.pack("<Q", max(0, hlen + rng.choice([-2, -1, 1, 2])))
        else:  # a random byte anywhere in the first 16 bytes or the header
            b[rng.randrange(min(len(b), 8 + hlen))] = rng.randrange(256)
        out[f"mutation_{i}_{kind}"] = bytes(b)
    return out


def main():
    rng = random.Random(1234)
    cases = dict(CASES)
    cases.update(mutations(rng, N_RANDOM))
    failures = 0
    agreed_accept = agreed_refuse = 0
    with tempfile.TemporaryDirectory() as tmp:
        everything = list(cases.items()) + list(REPEATED.items())
        paths = {}
        for i, (name, content) in enumerate(everything):
            paths[name] = os.path.join(tmp, f"{i}.safetensors")
            with open(paths[name], "wb") as f:
                f.write(content)
        verdicts = ours(list(paths.values()))
        for name, _ in everything:
            path = paths[name]
            ref, ref_meta = reference(path)
            got, got_meta = verdicts[path]
            if name in REPEATED:
                ok = got is None and "duplicate key" in got_meta
                why = f"ours: {got_meta}"
            elif ref is None:
                ok = got is None
                agreed_refuse += ok
                why = f"reference refuses ({ref_meta[:80]}); ours {'refuses' if got is None else 'ACCEPTS'}"
            else:
                ok = got is not None and got == ref and got_meta == ref_meta
                agreed_accept += ok
                why = f"reference accepts {ref}; ours {got_meta if got is None else got}"
            if got is None and ok and not got_meta.startswith(path + ": "):
                ok, why = False, f"error does not name the file first: {got_meta}"
            if not ok:
                failures += 1
                print(f"FAIL {name}: {why}")
    print(f"{len(cases) + len(REPEATED) - failures} of {len(cases) + len(REPEATED)} agree "
          f"({agreed_accept} accepted by both, {agreed_refuse} refused by both, {len(REPEATED)} repeated-key files refused)")
    sys.exit(1 if failures else 0)


main()
