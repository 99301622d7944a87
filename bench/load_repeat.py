"""Load one checkpoint N times in one process; one JSON line per load: time, peak, and what the process holds
after the model is freed (native threads, open fds, RssAnon, device memory, pinned host memory) -- the figures
that must not grow from load to load (issue 18), and A/B runs of loader changes.

    PYTHONPATH=src python bench/load_repeat.py CKPT_DIR [--n 20] [--scheme fp8_per_channel] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

import fp8stream


def _held(device: str) -> dict:
    """What the process holds right now (after a load's model is freed)."""
    rss = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("RssAnon:"))
    names: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            comm = open(f"/proc/self/task/{tid}/comm").read().strip()
        except OSError:
            continue
        names[comm] = names.get(comm, 0) + 1
    import threading

    out = {"threads": len(os.listdir("/proc/self/task")), "thread_names": names,
           "python_threads": sorted(t.name for t in threading.enumerate()), "fds": len(os.listdir("/proc/self/fd")), "rss_anon_mib": round(rss / 2**20, 1)}
    if device.startswith("cuda"):
        out["cuda_allocated_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        out["cuda_reserved_mib"] = round(torch.cuda.memory_reserved() / 2**20, 1)
        stats = getattr(torch.cuda, "host_memory_stats", lambda: {})()  # the caching host (pinned) allocator
        out["pinned_allocated_mib"] = round(stats.get("allocated_bytes.current", stats.get("allocation.current", 0)) / 2**20, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--scheme", default="fp8_per_channel")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    torch.empty(1, device=args.device)
    print(json.dumps({"label": args.label, "i": "before", **_held(args.device)}), flush=True)
    for i in range(args.n):
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        m = fp8stream.load(args.ckpt, device=args.device, scheme=args.scheme, progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        r = m.fp8stream_report
        peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else r.peak_bytes
        del m
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(json.dumps({"label": args.label, "i": i, "wall_s": round(wall, 3), "load_s": round(r.load_seconds, 3),
                          "setup_s": round(r.setup_seconds, 3), "streaming_s": round(r.streaming_seconds, 3),
                          "peak_mib": round(peak / 2**20, 1), "peak_minus_final_mib": round((r.peak_bytes - r.final_bytes) / 2**20, 1),
                          **_held(args.device)}), flush=True)


if __name__ == "__main__":
    main()
