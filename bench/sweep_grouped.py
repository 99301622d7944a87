"""MoE expert GEMMs at prefill sizes: bf16 torch._grouped_mm vs FP8 torch._scaled_grouped_mm vs the Triton grouped
FP8 GEMM (default tiles and a tile grid), GEMMs alone, in a replayed CUDA graph (issue 3: MoE prefill).

    PYTHONPATH=src python3 bench/sweep_grouped.py --out /tmp/grouped.jsonl [--tokens 512,4096,16384] [--no-grid]

Shapes: Qwen1.5-MoE-A2.7B (60 experts, top-4, H 2048, I 1408) and Qwen3-30B-A3B (128, top-8, 2048, 768); rows are
T x top-k (token, expert) pairs sorted by expert under random routing; gate_up is [pairs, H] x [E, 2I, H]^T, down
[pairs, I] x [E, H, I]^T. Rowwise scales (fp8_per_channel). One JSON line per (shape, tokens, GEMM) with
microseconds and TFLOP/s of each; every Triton config is checked against torch._scaled_grouped_mm first.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_gemv import best_config, emit, time_graph  # noqa: E402

from fp8stream import kernels as K  # noqa: E402
from fp8stream.quantize import quantize_activation  # noqa: E402

SHAPES = {"qwen1.5-moe": (60, 4, 2048, 1408), "qwen3-30b": (128, 8, 2048, 768)}  # E, top-k, H, I


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="512,4096,16384")
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--tma", action="store_true", help="also time the experimental TMA kernel (kernels._launch_gemm_tma)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    grid = list(itertools.product([16, 32, 64, 128], [64, 128, 256], [128], [4, 8], [3, 4]))  # BM, BN, BK, warps, stages
    tma_grid = list(itertools.product([64, 128], [128, 256], [128], [4, 8], [3, 4]))
    for name in args.shapes.split(","):
        e, topk, h, i = SHAPES[name]
        for t in [int(v) for v in args.tokens.split(",")]:
            ids = torch.stack([torch.randperm(e, device=dev)[:topk] for _ in range(t)]).reshape(-1)
            sorted_ids, _ = torch.sort(ids)
            starts, ends = K._group_bounds(sorted_ids, e)
            pairs = ids.numel()
            for gemm, n, k in (("gate_up", 2 * i, h), ("down", h, i)):
                w16 = torch.randn(e, n, k, device=dev, dtype=torch.bfloat16) * 0.02
                amax = w16.float().abs().amax(-1)
                ws = (amax / 448).clamp(min=1e-12)
                w8 = (w16.float() / ws.unsqueeze(-1)).to(torch.float8_e4m3fn)
                a16 = torch.randn(pairs, k, device=dev, dtype=torch.bfloat16)
                q, s = quantize_activation(a16, "fp8_per_channel")
                s = s.reshape(-1)
                flop = 2.0 * pairs * n * k
                rec = dict(shape=name, tokens=t, pairs=pairs, gemm=gemm, n=n, k=k, experts=e)

                def bf16():
                    return torch._grouped_mm(a16, w16.transpose(-2, -1), offs=ends)

                def scaled():
                    return torch._scaled_grouped_mm(q, w8.transpose(-2, -1), scale_a=s, scale_b=ws, offs=ends,
                                                    out_dtype=torch.bfloat16)

                def triton(cfg=None):
                    return K._launch_gemm(q, s, w8, ws, None, starts, ends, False, torch.bfloat16, cfg)

                ref = scaled().float()
                for label, fn in (("bf16_grouped_mm", bf16), ("scaled_grouped_mm", scaled), ("triton_default", triton)):
                    try:
                        us = time_graph([fn])
                        rec[f"{label}_us"], rec[f"{label}_tflops"] = round(us, 1), round(flop / us / 1e6, 1)
                    except Exception as exc:  # noqa: BLE001
                        rec[f"{label}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                err = float((triton().float() - ref).norm() / ref.norm())
                rec["triton_default_rel_err"] = err
                rec["triton_default_config"] = K._gemm_config(pairs, e, n, K._sm_count(dev))
                if pairs <= 4 * e:  # decode-ish sizes: whole weights stream, bf16 bytes are the peer
                    rec["note"] = "few rows per expert"
                best = best_config([] if args.no_grid else grid, lambda cfg: [lambda cfg=cfg: triton(cfg)], ref, 1e-2, gemm, reps=3)
                if best:
                    rec["triton_best_us"], rec["triton_best_config"] = round(best[0], 1), best[1]
                    rec["triton_best_tflops"] = round(flop / best[0] / 1e6, 1)
                if args.tma:
                    tma = best_config(tma_grid, lambda cfg: [lambda cfg=cfg: K._launch_gemm_tma(q, s, w8, ws, None, starts, ends,
                                                                                            torch.bfloat16, cfg)],
                                      ref, 1e-2, gemm + " tma", reps=3)
                    if tma:
                        rec["tma_best_us"], rec["tma_best_config"] = round(tma[0], 1), tma[1]
                        rec["tma_best_tflops"] = round(flop / tma[0] / 1e6, 1)
                emit(rec, args.out)

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
