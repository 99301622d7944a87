"""Where a streaming load waits: reader threads vs the loader thread, from timestamps of one real load.

    PYTHONPATH=src python3 bench/trace_load.py CKPT_DIR [--loads 2] [--out trace.json]

Instruments (by wrapping, nothing in the package changes) every positional read of the reader pool
(thread, start, end, bytes), the loader thread's waits for a filled buffer (Prefetcher.take), its
host->device hand-off (_Source._copy_in, which waits for the device to finish the chunk before last),
and the time to the first read. Prints per load:
  setup_s            load() call -> first positional read (config, headers, meta model, plan, pinning)
  stream_s           first read -> load() returns
  read GB/s          bytes / stream_s; readers_busy = summed read time / (threads x stream_s)
  part_gap_ms        mean time a reader thread spends between two of its reads (queueing, the GIL)
  take_wait_s        the loader thread blocked waiting for reads (read-bound when large)
  copy_in_s          the loader thread inside _copy_in (device-bound when large)
  loader_other_s     the rest of the loader thread's streaming time: Python + kernel launches
  phases             per step of load() (config, headers, meta model, plan, ..., warm-up join, pinning,
                     the end: close, report): [first start, last end] after the call, and summed seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

import fp8stream
from fp8stream import loader as L
from fp8stream import pipeline as P
from fp8stream.checkpoint import Checkpoint

EVENTS: list[tuple] = []  # (kind, thread ident, t0, t1, nbytes)
_lock = threading.Lock()


def _wrap(owner, name, kind, nbytes_of=None):
    orig = getattr(owner, name)

    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            t1 = time.perf_counter()
            with _lock:
                EVENTS.append((kind, threading.get_ident(), t0, t1, nbytes_of(args) if nbytes_of else 0))

    setattr(owner, name, wrapped)


PEAKS: list[tuple] = []  # (target, kind, chunk rows, max_memory_allocated after it - before the load)


def _wrap_peak(name):
    orig = getattr(L, name)

    def wrapped(t, c, *args, **kwargs):
        out = orig(t, c, *args, **kwargs)
        torch.cuda.synchronize()
        PEAKS.append((t.name, getattr(c, "kind", name), c.step, torch.cuda.max_memory_allocated()))
        return out

    setattr(L, name, wrapped)


SRC = getattr(L, "Source", None) or getattr(L, "_Source")  # the chunk source (source.py; loader._Source before the split)

# load()'s steps, in call order: wrapped where load() looks them up, so their timestamps land in EVENTS.
# A step missing from an older loader tree (A/B runs) is skipped.
PHASES = [(L, "_load_config"), (Checkpoint, "__init__"), (L, "build_meta_model"), (L, "build_plan"),
          (L, "replace_with_fp8"), (L, "_targets"), (L.MemoryLedger, "check_fits"), (L, "_quantized_chunks"),
          (L, "_kept_chunks"), (L, "_schedule"), (SRC, "start"), (P.Prefetcher, "_new_buffer"),
          (getattr(L, "_KernelWarmup", None), "join"), (L.MemoryLedger, "start"), (SRC, "close"),
          (Checkpoint, "close"), (L.MemoryLedger, "stop"), (L, "_attach_generation_config")]


def _phase_name(owner, name) -> str:
    return f"{getattr(owner, '__name__', 'loader').split('.')[-1]}.{name}"


def instrument() -> None:
    _wrap(Checkpoint, "_pread", "read", lambda a: len(a[3]))
    _wrap(P.Prefetcher, "take", "take")
    _wrap(SRC, "_copy_in", "copy_in")
    for owner, name in PHASES:
        if owner is not None and hasattr(owner, name):
            _wrap(owner, name, "phase:" + _phase_name(owner, name))


def phases(t_call: float) -> dict:
    """{step: [first start, last end] after the call (s), summed s, calls}, in order of first start."""
    out: dict[str, list] = {}
    for kind, _, t0, t1, _ in sorted((e for e in EVENTS if e[0].startswith("phase:") and e[2] >= t_call), key=lambda e: e[2]):
        rec = out.setdefault(kind[6:], [t0 - t_call, t1 - t_call, 0.0, 0])
        rec[1], rec[2], rec[3] = max(rec[1], t1 - t_call), rec[2] + t1 - t0, rec[3] + 1
    return {k: [round(v[0], 3), round(v[1], 3), round(v[2], 3), v[3]] for k, v in out.items()}


def summarize(t_call: float, t_end: float, threads: int) -> dict:
    ev = [e for e in EVENTS if e[2] >= t_call]
    reads = [e for e in ev if e[0] == "read"]
    if not reads:
        return {"load_s": t_end - t_call, "note": "no positional reads"}
    first = min(e[2] for e in reads)
    stream = t_end - first
    per_thread = defaultdict(list)
    for e in reads:
        per_thread[e[1]].append(e)
    gaps = []
    for es in per_thread.values():
        es.sort(key=lambda e: e[2])
        gaps += [b[2] - a[3] for a, b in zip(es, es[1:])]
    busy = sum(e[3] - e[2] for e in reads)
    total = sum(e[4] for e in reads)
    loader = [e for e in ev if e[0] in ("take", "copy_in")]
    takes = [e for e in loader if e[0] == "take"]
    take = sum(e[3] - e[2] for e in loader if e[0] == "take")
    copy = sum(e[3] - e[2] for e in loader if e[0] == "copy_in")
    return {
        "load_s": round(t_end - t_call, 3), "setup_s": round(first - t_call, 3), "stream_s": round(stream, 3),
        "read_GBps": round(total / stream / 1e9, 2), "reads": len(reads), "read_MiB_mean": round(total / len(reads) / 2**20, 2),
        "reader_threads_seen": len(per_thread), "readers_busy": round(busy / (threads * stream), 3),
        "read_s_mean_ms": round(1e3 * busy / len(reads), 3),
        "part_gap_ms_mean": round(1e3 * sum(gaps) / max(1, len(gaps)), 3),
        "part_gap_ms_p90": round(1e3 * sorted(gaps)[int(0.9 * len(gaps))], 3) if gaps else None,
        "take_wait_s": round(take, 3), "copy_in_s": round(copy, 3),
        "loader_other_s": round(stream - take - copy, 3), "chunks": len(takes),
        "first_read_s": round(first - t_call, 3), "first_chunk_s": round(min(e[3] for e in takes) - t_call, 3) if takes else None,
        "last_chunk_s": round(max(e[3] for e in takes) - t_call, 3) if takes else None,
        "phases": phases(t_call),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--loads", type=int, default=2)
    ap.add_argument("--scheme", default="fp8_per_channel")
    ap.add_argument("--read-threads", type=int, default=None)
    ap.add_argument("--prefetch-buffers", type=int, default=None)
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval for a trial")
    ap.add_argument("--part-mib", type=float, default=None, help="read-ahead part size for a trial (pipeline.PART_BYTES)")
    ap.add_argument("--device", default="cuda", help="cpu: smoke test (no read-ahead pool on the CPU)")
    ap.add_argument("--peak-trace", action="store_true", help="sync after every parameter; print where the device peak rises")
    ap.add_argument("--model-code-outside-clock", action="store_true",
                    help="import the modeling code and build transformers' renaming table first, as bench_load.py does")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cuda = args.device != "cpu"
    import transformers
    from transformers import AutoModelForCausalLM  # noqa: F401  (import cost outside the clock, as bench_load)

    transformers.logging.set_verbosity_error()
    if args.model_code_outside_clock:
        from bench_load import import_model_code  # this script's own directory is on sys.path

        import_model_code(args.ckpt)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.part_mib:
        P.Prefetcher.__init__.__defaults__ = (8, True, int(args.part_mib * 2**20))  # buffers, pinned, part_size
    if cuda:
        torch.empty(1, device="cuda")
    instrument()
    if args.peak_trace:
        _wrap_peak("_load_quantized")
        _wrap_peak("_load_kept")
    kw = {k: v for k, v in (("read_threads", args.read_threads), ("prefetch_buffers", args.prefetch_buffers)) if v}
    threads = args.read_threads or fp8stream.checkpoint.DEFAULT_READ_THREADS
    results = []
    for i in range(args.loads):
        EVENTS.clear()
        PEAKS.clear()
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        model = fp8stream.load(args.ckpt, device=args.device, scheme=args.scheme, progress=False, **kw)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        rec = {"load": i, **summarize(t0, t1, threads), "report_load_s": round(model.fp8stream_report.load_seconds, 3),
               "peak_minus_final_MiB": round((model.fp8stream_report.peak_bytes - model.fp8stream_report.final_bytes) / 2**20, 1)}
        print(json.dumps(rec), flush=True)
        results.append(rec)
        if PEAKS:
            last = 0
            for name, kind, step, peak in PEAKS:
                if peak > last:
                    print(f"  peak {(peak - base) / 2**20:9.1f} MiB after {name} ({kind}, {step} rows per chunk)")
                    last = peak
            print(f"  final (report) {model.fp8stream_report.final_bytes / 2**20:.1f} MiB")
        del model
        if cuda:
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "loads": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
