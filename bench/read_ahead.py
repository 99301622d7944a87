"""The read-ahead pool alone, reader threads vs reader processes: read GB/s and what the consumer thread
gets done meanwhile (the loader thread's Python competes with reader threads for the GIL).

    PYTHONPATH=src python bench/read_ahead.py CKPT_DIR [--read-procs 0 8 12] [--read-threads 12]
        [--buffers 8] [--chunk-mib 64] [--part-mib 16] [--spin-ms 0.5] [--repeat 2] [--pinned] [--out FILE]

Every tensor is read once through a Prefetcher, in chunks of at most --chunk-mib (one tensor's rows per
chunk, as the loader asks), into --buffers slots; the consumer takes each chunk in order, spins
--spin-ms of pure-Python work on it (a stand-in for the loader's per-chunk Python and kernel launches,
which hold the GIL) and hands it back. Per configuration (0 = reader threads):
  start_ms        Prefetcher() (reader processes: spawned, region mapped)
  first_ms        start -> first chunk ready
  GBps            checkpoint bytes / wall time, start to the last chunk
  spin_stretch    consumer spin time under reads / the same spin alone (1.0: the GIL never got in the way)
  take_wait_s     the consumer blocked waiting for reads
--pinned pins the pool (CUDA; with reader processes, cudaHostRegister of the shared region's slots).
Run it twice on a warm page cache (the first pass may read from disk); drop caches for cold numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fp8stream.checkpoint import DEFAULT_READ_THREADS, Checkpoint  # noqa: E402
from fp8stream.pipeline import Prefetcher, Request  # noqa: E402


def schedule(ckpt: Checkpoint, chunk_bytes: int) -> list[Request]:
    out = []
    for key, info in ckpt.tensors.items():
        rows = info.flat_shape[0] if info.shape else 1
        step = max(1, chunk_bytes // max(info.row_bytes, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out.append(Request(((key, r0, r1),), info.dtype, (r1 - r0) * info.row_bytes))
    return out


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:  # pure Python: holds the GIL between switch intervals
        x += 1


def spin_alone(n: int, seconds: float) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        spin(seconds)
    return time.perf_counter() - t0


def run(path: Path, procs: int, threads: int, buffers: int, chunk: int, part: int, spin_s: float, pinned: bool) -> dict:
    ckpt = Checkpoint(path, read_threads=threads)
    reqs = schedule(ckpt, chunk)
    total = sum(r.nbytes for r in reqs)
    t0 = time.perf_counter()
    pf = Prefetcher(ckpt, reqs, buffers=buffers, pinned=pinned, part_size=part, read_procs=procs)
    t_started = time.perf_counter()
    wait = spun = 0.0
    first = None
    try:
        for i in range(len(reqs)):
            a = time.perf_counter()
            _, slot = pf.take(i)
            b = time.perf_counter()
            wait += b - a
            if first is None:
                first = b
            spin(spin_s)
            spun += time.perf_counter() - b
            pf.release(slot, None)
        t_end = time.perf_counter()
    finally:
        pf.close()
        ckpt.close()
    alone = spin_alone(len(reqs), spin_s) if spin_s else 0.0
    return {"read_procs": procs, "read_threads": threads, "chunks": len(reqs), "GB": round(total / 1e9, 3),
            "start_ms": round(1e3 * (t_started - t0), 1), "first_ms": round(1e3 * (first - t0), 1),
            "GBps": round(total / (t_end - t0) / 1e9, 2), "take_wait_s": round(wait, 3),
            "spin_stretch": round(spun / alone, 2) if alone else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--read-procs", type=int, nargs="+", default=[0, 8], help="configurations to compare (0: reader threads)")
    ap.add_argument("--read-threads", type=int, default=DEFAULT_READ_THREADS)
    ap.add_argument("--buffers", type=int, default=8)
    ap.add_argument("--chunk-mib", type=float, default=64)
    ap.add_argument("--part-mib", type=float, default=16)
    ap.add_argument("--spin-ms", type=float, default=0.5, help="consumer Python work per chunk")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--pinned", action="store_true", help="pin the pool (needs CUDA)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.pinned:
        torch.empty(1, device="cuda")  # CUDA context outside the clock
    results = []
    for rep in range(args.repeat):
        for procs in args.read_procs:
            rec = {"repeat": rep, **run(Path(args.ckpt), procs, args.read_threads, args.buffers, int(args.chunk_mib * 2**20),
                                        int(args.part_mib * 2**20), args.spin_ms / 1e3, args.pinned)}
            print(json.dumps(rec), flush=True)
            results.append(rec)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
