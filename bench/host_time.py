"""Host (CPU) time of the FP8 forward: what the GPU waits for when a forward is host-bound (issue 3).

1. Issue time per call, no sync, of fp8stream's launches on Qwen1.5-MoE expert shapes (4096 tokens, top-4):
   the row quantization (plain, gathered, through the fp8stream::quant_rows operator) and the grouped GEMM
   (TMA and pointer kernels, through fp8stream::fp8_gemm). A call whose GPU time is longer than its issue time
   fills the launch queue and then measures the GPU instead (the GEMMs here).
2. Issue time of whole eager forwards (2-layer models, 1 x 4096), bf16 vs FP8, and Python's profiler over five
   of them, by own time and by cumulative time.

    PYTHONPATH=src python3 bench/host_time.py --models llama-3.1-8b > /tmp/host_time.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_infer as BI  # noqa: E402

from fp8stream import kernels as K  # noqa: E402


def issue_us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return round(us, 1)


def launches() -> None:
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, 4096, (16384,), device="cuda")
    print("quant_triton 4096 x 2048, us/call", issue_us(lambda: K.quant_triton(x, "row")))
    print("quant_triton gathered 16384 rows", issue_us(lambda: K.quant_triton(x, "row", idx=idx)))
    print("fp8stream::quant_rows operator", issue_us(lambda: torch.ops.fp8stream.quant_rows(x, idx, False)))
    print("two torch.empty", issue_us(lambda: (torch.empty(4096, 2048, device="cuda"), torch.empty(4096, device="cuda"))))
    e, n, k, rows = 60, 2816, 2048, 16384
    w = torch.randn(e, n, k, device="cuda").to(torch.float8_e4m3fn)
    ws = torch.rand(e, n, device="cuda")
    q, s = K.quant_triton(torch.randn(rows, k, device="cuda", dtype=torch.bfloat16), "row")
    counts = torch.full((e,), rows // e, device="cuda")
    counts[-1] += rows - counts.sum()
    ends = counts.cumsum(0).to(torch.int32)
    starts = (ends - counts).to(torch.int32)
    print("grouped GEMM, TMA kernel", issue_us(lambda: K._launch_gemm(q, s, w, ws, None, starts, ends, False, torch.bfloat16)))
    print("grouped GEMM, pointer kernel", issue_us(
        lambda: K._launch_gemm(q, s, w, ws, None, starts, ends, False, torch.bfloat16, config=(64, 256, 128, 8, 4))))
    print("fp8stream::fp8_gemm operator", issue_us(
        lambda: torch.ops.fp8stream.fp8_gemm(q, s, w, ws, None, starts, ends, False, "bfloat16")))


def forwards(model_name: str, variant: str, layers: int) -> None:
    model, _ = BI.build_model(model_name, variant, layers)
    ids = torch.randint(0, 1000, (1, 4096), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        issue = []
        for _ in range(5):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            issue.append(round((time.perf_counter() - t) * 1e3, 2))
            torch.cuda.synchronize()
        print(model_name, variant, f"ms to issue one forward ({layers} layers)", issue)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        prof.disable()
        torch.cuda.synchronize()
    for key in ("tottime", "cumtime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(28)
        print(out.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-3.1-8b")
    ap.add_argument("--variants", default="bf16,fp8_per_channel")
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    K.prepare("cuda")
    launches()
    for m in filter(None, args.models.split(",")):
        for v in args.variants.split(","):
            forwards(m, v, args.layers)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
