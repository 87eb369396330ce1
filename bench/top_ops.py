"""Summarises a Chrome trace written by `dsopen-bench-model --profile`: total time per operator, top N.
Usage: top_ops.py TRACE.json [N]"""
import collections, json, sys

events = json.load(open(sys.argv[1]))
events = events["traceEvents"] if isinstance(events, dict) else events
total = collections.Counter()
count = collections.Counter()
for e in events:
    if e.get("ph") == "X" and "dur" in e:
        total[e["name"]] += e["dur"]
        count[e["name"]] += 1
n = int(sys.argv[2]) if len(sys.argv) > 2 else 15
print(f"{'op':45s} {'ms':>9s} {'calls':>7s}")
for name, us in total.most_common(n):
    print(f"{name[:45]:45s} {us / 1e3:9.1f} {count[name]:7d}")
