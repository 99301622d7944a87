"""Means per tree of a bench/ab_load.sh output: total, setup, streaming, loader waits, chunks, peak - final.

    python3 bench/ab_summary.py AB_OUTPUT.txt [--runs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

FIELDS = ("load_s", "setup_s", "stream_s", "take_wait_s", "copy_in_s", "loader_other_s", "readers_busy", "chunks", "peak_minus_final_MiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ab_output")
    ap.add_argument("--runs", action="store_true", help="also print every run")
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    tree: dict[str, str] = {}
    label = None
    for line in open(args.ab_output):
        if line.startswith("== "):
            label = line.split()[1]
            tree[label] = line.rsplit("(", 1)[-1].rstrip(")\n")
        elif line.startswith("{") and label is not None:
            runs.setdefault(label, []).append(json.loads(line))
    print("| tree | runs | " + " | ".join(FIELDS) + " |")
    print("|---" * (len(FIELDS) + 2) + "|")
    for label, recs in runs.items():
        means = [statistics.mean(r[f] for r in recs) for f in FIELDS]
        print(f"| {label} ({tree[label]}) | {len(recs)} | " + " | ".join(f"{m:.3f}" if m < 100 else f"{m:.1f}" for m in means) + " |")
        if args.runs:
            for r in recs:
                print(f"|   {label} | | " + " | ".join(str(r[f]) for f in FIELDS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
