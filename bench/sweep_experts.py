"""MoE experts at decode sizes: the W8A16 pair kernels (the decode rule) vs the grouped W8A8 path, with a tile search.

    PYTHONPATH=src python3 bench/sweep_experts.py --out /tmp/experts.jsonl [--tokens 1,8,16] [--no-grid]

For the Qwen1.5-MoE-A2.7B (60 experts, top-4, H 2048, I 1408) and Qwen3-30B-A3B (128, top-8, 2048, 768)
expert shapes and T tokens, times one FP8Experts forward in a replayed CUDA graph (GPU time), cycling over
8 layer copies with their own random routing so that L2 does not hold the routed experts' weights: the
decode path (kernels._experts_decode: two gemv kernels over (token, expert) pairs), the same with every
tile config of the grid for each of its two kernels, and the grouped W8A8 path the experts take above
MOE_GEMV_MAX_T tokens (sort, quantize, torch._scaled_grouped_mm twice, combine). One JSON line per point.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infer import _quantize_weight  # noqa: E402
from sweep_gemv import best_config, emit, time_graph  # noqa: E402

from fp8stream import _kernel_caps  # noqa: E402
from fp8stream import kernels as K  # noqa: E402

SHAPES = {"qwen1.5-moe": (60, 4, 2048, 1408), "qwen3-30b": (128, 8, 2048, 768)}  # E, top-k, H, I
LAYERS = 8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="1,8,16")
    ap.add_argument("--schemes", default="fp8_per_channel,fp8_per_block")
    ap.add_argument("--no-grid", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    caps = K.caps(dev)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} caps {caps}", flush=True)
    grid = list(itertools.product([4, 8, 16], [256, 512, 1024], [4, 8], [2, 3]))  # BN, BK, warps, stages
    act = torch.nn.SiLU()
    for scheme in args.schemes.split(","):
        for name, (e, topk, h, i) in SHAPES.items():
            def weights(n, k):
                qs = [_quantize_weight(torch.randn(n, k, device=dev) * 0.02, scheme) for _ in range(e)]
                return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
            layers = [(*weights(2 * i, h), *weights(h, i)) for _ in range(LAYERS)]
            for t in [int(v) for v in args.tokens.split(",")]:
                x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
                routes = [(torch.stack([torch.randperm(e, device=dev)[:topk] for _ in range(t)]),
                           torch.rand(t, topk, device=dev).softmax(-1).to(torch.bfloat16)) for _ in range(LAYERS)]
                rec = {"scheme": scheme, "shape": name, "experts": e, "top_k": topk, "hidden": h, "inter": i, "tokens": t}

                def fns(caps_, run=K.experts_fast):
                    return [lambda w=w, r=r: run(x, r[0], r[1], *w[:2], *w[2:], act, scheme, caps_) for w, r in zip(layers, routes)]

                rec["decode_us"] = time_graph(fns(caps))
                gemv_max = _kernel_caps.MOE_GEMV_MAX_T
                _kernel_caps.MOE_GEMV_MAX_T = 0  # the grouped W8A8 path at this size
                try:
                    rec["grouped_w8a8_us"] = time_graph(fns(caps))
                finally:
                    _kernel_caps.MOE_GEMV_MAX_T = gemv_max
                # the two kernels alone, default tiles and the grid
                ids = [r[0].reshape(-1) for r in routes]
                rws = [r[1].reshape(-1).contiguous() for r in routes]
                gate_up = K._launch_pairs(x, ids[0], topk, None, *layers[0][:2], scheme, False, torch.bfloat16)
                ref_gu = gate_up.float()
                ref_dn = K._launch_pairs(gate_up, ids[0], 1, rws[0], *layers[0][2:], scheme, True, torch.float32)
                for kern, n, k in (("gate_up", 2 * i, h), ("down", h, i)):
                    def run(cfg, kern=kern):
                        if kern == "gate_up":
                            return [lambda w=w, d=d, cfg=cfg: K._launch_pairs(x, d, topk, None, *w[:2], scheme, False, torch.bfloat16, cfg)
                                    for w, d in zip(layers, ids)]
                        return [lambda w=w, d=d, rw=rw, cfg=cfg: K._launch_pairs(gate_up, d, 1, rw, *w[2:], scheme, True, torch.float32, cfg)
                                for w, d, rw in zip(layers, ids, rws)]
                    rec[f"{kern}_default_config"] = K._gemv1_config(n, k)
                    rec[f"{kern}_default_us"] = time_graph(run(None))
                    configs = [] if args.no_grid else [cfg for cfg in grid if not (scheme == "fp8_per_block" and 128 % cfg[0])]
                    best = best_config(configs, run, ref_gu if kern == "gate_up" else ref_dn, 1e-2, kern)
                    if best:
                        rec[f"{kern}_best_us"], rec[f"{kern}_best_config"] = best
                emit(rec, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
