"""Compiled decode, kernel by kernel: tokens/s and GPU kernel time per generated token (issue 3).

One model per process, loaded as bench_infer.py loads it (random weights), then transformers' static-cache generate
(the decode step compiled with CUDA graphs): two warm-up calls, one timed call, one profiled call (torch.profiler,
CUDA kernels only). The kernel time per token separates what the GPU does from the host loop around it, whose
share makes tokens/s vary by +-15 % between runs of the same model.

    PYTHONPATH=src python3 bench/profile_decode.py {unfused,fused,unaliased} [--model llama-3.1-8b] [--new-tokens 128]

fused: load(fuse_gate_up=True); unaliased: fused, then gate_proj / up_proj get their own storage back (the forward
falls back to the model's own), to tell the cost of the two parameters being views of one storage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_infer as BI  # noqa: E402

import fp8stream  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["unfused", "fused", "unaliased"])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    new = args.new_tokens
    model = fp8stream.load(BI._config_dir(args.model, None), device="cuda", scheme="fp8_per_channel",
                           load_format="dummy", progress=False, fuse_gate_up=args.mode != "unfused").eval()
    if args.mode == "unaliased":
        for mod in model.modules():
            if hasattr(mod, "fp8_gate_up"):
                for lin in (mod.gate_proj, mod.up_proj):
                    lin.weight = torch.nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
                    lin.weight_scale = torch.nn.Parameter(lin.weight_scale.detach().clone(), requires_grad=False)
    tok_s, _ = BI._decode_tok_s(model, 1, new, True, new, 1)  # warm-up with the same length: no recompile
    ids = torch.randint(0, model.config.vocab_size, (1, 32), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, cache_implementation="static",
              max_new_tokens=new, min_new_tokens=new)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(ids, **kw)
        torch.cuda.synchronize()
    kernels: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name][0] += ev.device_time_total / 1e3 / new
            kernels[ev.name][1] += 1
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]
    print("RESULT", json.dumps(dict(mode=args.mode, tok_s=round(tok_s, 1),
                                    kernel_ms_per_token=round(sum(v[0] for v in kernels.values()), 3),
                                    top=[(n[:90], round(v[0], 4), v[1]) for n, v in top])), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
