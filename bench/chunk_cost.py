"""The loader thread's per-chunk device work alone, no reads: pinned buffer -> Source._copy_in -> quantize_rows_into.

    PYTHONPATH=src python3 bench/chunk_cost.py ROWS WIDTH CHUNKS     # e.g. 1024 2048 300

Two passes in one fresh process; prints per pass the time to issue the work and the wall time per chunk. The
first pass also pays CUDA's lazy module loads (what loader._KernelWarmup takes off a real load's path); the
second is the loader thread's own cost per chunk when nothing else competes for the GIL.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from fp8stream.source import Source
from fp8stream.quantize import quantize_rows_into


def main(rows: int, width: int, chunks: int) -> None:
    dev = torch.device("cuda")
    torch.empty(1, device=dev)
    bufs = []
    for _ in range(8):  # the read-ahead pool's shape: 8 registered host buffers
        b = torch.empty(rows * width * 2, dtype=torch.uint8).zero_()
        torch.cuda.cudart().cudaHostRegister(b.data_ptr(), b.numel(), 0)
        bufs.append(b.view(torch.bfloat16).view(rows, width))
    w = torch.empty(chunks * rows, width, dtype=torch.float8_e4m3fn, device=dev)
    s = torch.empty(chunks * rows, device=dev)
    for rep in range(2):
        src = Source(None, torch.bfloat16, dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(chunks):
            x, _ = src._copy_in(bufs[i % 8])
            quantize_rows_into(x, w[i * rows : (i + 1) * rows], s[i * rows : (i + 1) * rows])
            del x
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(json.dumps({"pass": rep, "rows": rows, "width": width, "chunks": chunks,
                          "issue_ms_per_chunk": round(1e3 * (t1 - t0) / chunks, 3),
                          "wall_ms_per_chunk": round(1e3 * (t2 - t0) / chunks, 3),
                          "GBps": round(chunks * rows * width * 2 / (t2 - t0) / 1e9, 1)}))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
