"""The one tile config per decode kernel (kernels._gemv_config) that is fastest over a decode step's Linear shapes, from bench/sweep_gemv.py's
JSON lines: sum over shapes of (µs at that config) x (that shape's Linears per Llama-3.1-8B layer). Prints
the best BN/BK/WARPS/STAGES per kernel and the weighted sums against its default tiles.

    python bench/pick_gemv_config.py SWEEP.jsonl --m 8 [--kernels gemv]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

PER_LAYER = {(4096, 4096): 2, (1024, 4096): 2, (14336, 4096): 2, (4096, 14336): 1}  # q,o; k,v; gate,up; down


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep")
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--kernels", default="gemv")
    ap.add_argument("--scheme", default="fp8_per_channel")
    args = ap.parse_args(argv)
    recs = [json.loads(line) for line in open(args.sweep) if line.strip()]
    recs = [r for r in recs if r["m"] == args.m and r["scheme"] == args.scheme and (r["n"], r["k"]) in PER_LAYER]
    for kern in args.kernels.split(","):
        total: dict[tuple, float] = defaultdict(float)
        seen: dict[tuple, int] = defaultdict(int)
        for r in recs:
            for cfg, us in r.get(f"{kern}_all", []):
                total[tuple(cfg)] += us * PER_LAYER[(r["n"], r["k"])]
                seen[tuple(cfg)] += 1
        full = {c: t for c, t in total.items() if seen[c] == len(recs)}
        if not full:
            print(f"# {kern}: no config timed on every shape")
            continue
        best = min(full, key=full.get)
        default = sum(r[f"{kern}_default_us"] * PER_LAYER[(r["n"], r["k"])] for r in recs if f"{kern}_default_us" in r)
        print(f"# {kern}: best {best} {full[best]:.1f} us per layer (default tiles {default:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
