"""Decode, kernel by kernel: tokens/s and GPU kernel time per generated token, by kernel name.

One model per process (random weights, as bench_infer.py loads them), then `model.generate`:
  --path default   fp8stream's default (its own decode loop, the whole step one CUDA graph; decode_loop.py)
  --path compile   transformers' static-cache generate with the decode step torch.compile'd (mode reduce-overhead)
two warm-up calls, one timed call, one profiled call (torch.profiler, CUDA kernels only). Kernel time per token vs
wall time per token separates the GPU's work from gaps (launches, the host loop); the top kernels say where the GPU's
time goes.

    PYTHONPATH=src python3 bench/profile_decode.py [--path default] [--model llama-3.1-8b] [--batch 1] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_infer as BI  # noqa: E402

import fp8stream  # noqa: E402
from fp8stream.decode import graph_stats  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", choices=["default", "compile"], default="default")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    new, batch = args.new_tokens, args.batch
    model = fp8stream.load(BI._config_dir(args.model, None), device="cuda", scheme="fp8_per_channel",
                           load_format="dummy", progress=False).eval()
    if args.path == "compile":
        model.fp8stream_decode = "compile"
    ids = torch.randint(0, model.config.vocab_size, (batch, 32), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, max_new_tokens=new, min_new_tokens=new)

    def call():
        with torch.no_grad():
            model.generate(ids, **kw)
        torch.cuda.synchronize()

    call()
    call()
    t = time.perf_counter()
    call()
    wall = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
    kernels: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name][0] += ev.device_time_total / 1e3 / new
            kernels[ev.name][1] += 1
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]
    print("RESULT", json.dumps(dict(path=args.path, model=args.model, batch=batch, tok_s=round(batch * new / wall, 1),
                                    wall_ms_per_step=round(1e3 * wall / new, 3),
                                    kernel_ms_per_step=round(sum(v[0] for v in kernels.values()), 3),
                                    kernels_per_step=round(sum(v[1] for v in kernels.values()) / new, 1),
                                    stats=graph_stats(model),
                                    top=[(n[:100], round(v[0], 4), round(v[1] / new, 2)) for n, v in top])), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
