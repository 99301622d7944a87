"""reload() against load() in one fresh process: from the checkpoint directory (page cache) and from bf16 tensors
already on the GPU (a colocated trainer), with and without the NaN / Inf pre-pass.

    PYTHONPATH=src python bench/bench_reload.py CKPT_DIR [--repeats 3] [--out results.json]

Per step: wall seconds (CUDA synchronised), bf16 GB/s of the checkpoint's bytes, and peak - final device memory
(torch.cuda.max_memory_allocated after a reset, minus what was allocated before the step; the GPU source tensors are
allocated before, so they are the caller's memory, not the reload's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import fp8stream


def _timed(fn) -> tuple[float, int]:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, torch.cuda.max_memory_allocated() - base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from safetensors.torch import load_file

    torch.empty(1, device="cuda")
    model = None

    def load():
        nonlocal model
        model = fp8stream.load(args.ckpt, device="cuda", progress=False)

    t, peak = _timed(load)
    rep = model.fp8stream_report
    nbytes = rep.read_bytes
    rows = [{"step": "load (first in process)", "s": round(t, 3), "GBps": round(nbytes / t / 1e9, 1), "peak_minus_final_MiB": round((peak - rep.final_bytes) / 2**20, 1)}]
    staging = rep.staging_bytes
    gpu = {}
    for f in sorted(Path(args.ckpt).glob("*.safetensors")):
        gpu.update(load_file(str(f), device="cuda"))
    steps = {
        "reload dir": lambda: fp8stream.reload(model, args.ckpt),
        "reload dir, check_finite=False": lambda: fp8stream.reload(model, args.ckpt, check_finite=False),
        "reload GPU tensors": lambda: fp8stream.reload(model, gpu.items()),
        "reload GPU tensors, check_finite=False": lambda: fp8stream.reload(model, gpu.items(), check_finite=False),
    }
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    for name, fn in steps.items():
        times, peaks = [], []
        for _ in range(args.repeats):
            s, p = _timed(fn)
            times.append(s)
            peaks.append(p)
        rows.append({"step": name, "s_median": round(statistics.median(times), 3), "s_min": round(min(times), 3),
                     "s_max": round(max(times), 3), "GBps": round(nbytes / statistics.median(times) / 1e9, 1),
                     "peak_minus_final_MiB": round(max(peaks) / 2**20, 1), "staging_MiB": staging / 2**20})
        print(json.dumps(rows[-1]), flush=True)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs, "a reload moved a parameter"
    gpu.clear()
    del model
    torch.cuda.empty_cache()
    t, peak = _timed(load)
    rows.append({"step": "load (second in process)", "s": round(t, 3), "GBps": round(nbytes / t / 1e9, 1),
                 "peak_minus_final_MiB": round((peak - model.fp8stream_report.final_bytes) / 2**20, 1)})
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "bf16_bytes": nbytes, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
