"""Where a load's time goes: setup phases, raw reads, host-to-device copies, the whole load under cProfile.

    python bench/profile_load.py CKPT_DIR [--scheme fp8_per_channel] [--out profile.json]

Each stage is measured on its own, in this process, so their sum can be compared with the load:
  setup      config.json, meta model, load plan, module swap (what happens before the clock in load())
  read       every tensor's bytes into pinned buffers with Checkpoint.read_into (1 and 4 chunks in flight)
  h2d        the same number of bytes from one pinned buffer to the device
  load       fp8stream.load wall time, then again under cProfile (top functions by own time)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import fp8stream  # noqa: E402
from fp8stream.checkpoint import Checkpoint  # noqa: E402
from fp8stream.load_plan import build_plan  # noqa: E402
from fp8stream.loader import _load_config  # noqa: E402
from fp8stream.meta_model import build_meta_model  # noqa: E402
from fp8stream.modules import replace_with_fp8  # noqa: E402

out = {}


def emit(key, value):
    out[key] = value
    print(json.dumps({key: value}), flush=True)


def setup(path: Path):
    t = {}
    t0 = time.perf_counter()
    config = _load_config(path)
    t["config_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt = Checkpoint(path)
    ckpt.check_index()
    t["headers_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = build_meta_model(config, torch.bfloat16)
    t["meta_model_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_plan(model, ckpt)
    t["plan_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    replace_with_fp8(model, "fp8_per_channel", [r"lm_head"], torch.bfloat16)
    t["swap_s"] = time.perf_counter() - t0
    ckpt.close()
    emit("setup", t)


def reads(path: Path, chunk_bytes: int, threads: int, in_flight: int):
    ckpt = Checkpoint(path, read_threads=threads)
    jobs, cur, size = [], [], 0
    for key, info in ckpt.tensors.items():
        rows = info.flat_shape[0] if info.shape else 1
        step = max(1, chunk_bytes // max(info.row_bytes, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            cur.append((key, r0, r1))
            size += (r1 - r0) * info.row_bytes
            if size >= chunk_bytes:
                jobs.append((cur, size))
                cur, size = [], 0
    if cur:
        jobs.append((cur, size))
    bufs = [torch.empty(max(s for _, s in jobs), dtype=torch.uint8, pin_memory=torch.cuda.is_available()) for _ in range(in_flight)]
    total = sum(s for _, s in jobs)

    def one(i):
        reads_, _ = jobs[i]
        buf, at, js = bufs[i % in_flight], 0, []
        for key, a, b in reads_:
            n = (b - a) * ckpt.tensors[key].row_bytes
            js.append((key, a, b, buf[at : at + n]))
            at += n
        ckpt.read_into(js)

    t0 = time.perf_counter()
    if in_flight == 1:
        for i in range(len(jobs)):
            one(i)
    else:
        with ThreadPoolExecutor(in_flight) as pool:
            for start in range(0, len(jobs), in_flight):
                list(pool.map(one, range(start, min(start + in_flight, len(jobs)))))
    dt = time.perf_counter() - t0
    ckpt.close()
    emit(f"read_threads{threads}_inflight{in_flight}_chunk{chunk_bytes >> 20}MiB", {"s": dt, "GB/s": total / dt / 1e9, "bytes": total, "chunks": len(jobs)})
    return total


def h2d(total: int, chunk_bytes: int):
    host = torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(chunk_bytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(total // chunk_bytes):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    emit(f"h2d_chunk{chunk_bytes >> 20}MiB", {"s": dt, "GB/s": (total // chunk_bytes) * chunk_bytes / dt / 1e9})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--scheme", default="fp8_per_channel")
    ap.add_argument("--out")
    args = ap.parse_args()
    path = Path(args.ckpt)
    torch.cuda.init()
    torch.empty(1, device="cuda")
    setup(path)
    total = 0
    for threads, in_flight, chunk in ((16, 1, 64), (16, 4, 64), (32, 4, 64), (16, 1, 256)):
        total = reads(path, chunk << 20, threads, in_flight)
    h2d(total, 64 << 20)
    for i in range(2):
        t0 = time.perf_counter()
        m = fp8stream.load(path, device="cuda", scheme=args.scheme, progress=False)
        torch.cuda.synchronize()
        emit(f"load_{i}", {"wall_s": time.perf_counter() - t0, "report_s": m.fp8stream_report.load_seconds,
                          "peak_minus_final_MiB": (m.fp8stream_report.peak_bytes - m.fp8stream_report.final_bytes) / 2**20})
        del m
        torch.cuda.empty_cache()
    # knobs: reader threads, pinned buffers, the interpreter's GIL switch interval (readers vs the loader thread)
    default_interval = sys.getswitchinterval()
    for threads, buffers, interval in ((16, 8, None), (8, 8, None), (16, 16, None), (16, 8, 0.0005), (8, 16, 0.0005), (32, 16, 0.0005)):
        if interval is not None:
            sys.setswitchinterval(interval)
        t0 = time.perf_counter()
        m = fp8stream.load(path, device="cuda", scheme=args.scheme, progress=False, read_threads=threads, prefetch_buffers=buffers)
        torch.cuda.synchronize()
        emit(f"sweep_threads{threads}_buffers{buffers}_switch{interval or default_interval}",
             {"wall_s": time.perf_counter() - t0, "report_s": m.fp8stream_report.load_seconds})
        sys.setswitchinterval(default_interval)
        del m
        torch.cuda.empty_cache()
    prof = cProfile.Profile()
    prof.enable()
    m = fp8stream.load(path, device="cuda", scheme=args.scheme, progress=False)
    torch.cuda.synchronize()
    prof.disable()
    del m
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    s2 = io.StringIO()
    pstats.Stats(prof, stream=s2).sort_stats("cumulative").print_stats(40)
    print(s.getvalue())
    print(s2.getvalue())
    emit("cprofile_tottime", s.getvalue()[-6000:])
    emit("cprofile_cumulative", s2.getvalue()[-8000:])
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
