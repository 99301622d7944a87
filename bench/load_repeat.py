"""Load one checkpoint N times in one process; one JSON line per load (for A/B runs of loader changes).

    PYTHONPATH=src python bench/load_repeat.py CKPT_DIR [--n 3] [--scheme fp8_per_channel] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import fp8stream


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--scheme", default="fp8_per_channel")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    torch.empty(1, device=args.device)
    for i in range(args.n):
        t0 = time.perf_counter()
        m = fp8stream.load(args.ckpt, device=args.device, scheme=args.scheme, progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        r = m.fp8stream_report
        print(json.dumps({"label": args.label, "i": i, "wall_s": round(time.perf_counter() - t0, 3), "streaming_s": round(r.load_seconds, 3),
                          "peak_minus_final_mib": round((r.peak_bytes - r.final_bytes) / 2**20, 1), "fp8stream": fp8stream.__file__}), flush=True)
        del m
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
