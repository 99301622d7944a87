"""Tile sweep for the decode FP8 Linear kernel (kernels.gemv: W8A16, the FP8 weight widened in registers).

    PYTHONPATH=src python3 bench/sweep_gemv.py --out /tmp/gemv.jsonl [--quick]

For each Llama-3.1-8B / Qwen1.5-MoE Linear shape and M in (1, 8, 16, 32), times in a replayed CUDA graph
(GPU time; each call reads a different copy of the weights, > 150 MiB in all, so L2 does not hold them
as it would not in a real decode step): bf16 F.linear, the bare cuBLAS FP8 GEMM on pre-quantized inputs
(torch._scaled_mm rowwise; the floor of the two-kernel path), the two-kernel path FP8Linear takes above
the decode limit (Triton quant + _scaled_mm), and kernels.gemv with the default tiles and with every
tile config in the grid. Prints a summary table; one JSON line per measurement in --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infer import _quantize_weight  # noqa: E402

from fp8stream import kernels as K  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (2816, 2048), (2048, 1408), (5632, 2048)]
COPIES_BYTES = 160 << 20  # > the H100's 50 MiB L2


def time_graph(fns, reps: int = 3) -> float:
    """Microseconds per call, fns (one per weight copy) replayed from one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(5):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / (5 * reps * len(fns))


def emit(rec: dict, out) -> None:
    """One result: printed, and appended to the JSON-lines file `out` (the three sweeps' shared output)."""
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def best_config(configs, fns_of, ref: torch.Tensor, tol: float, label: str = "", reps: int = 2, all_timings=None):
    """(µs, config) of the fastest config whose first call matches ref (relative error <= tol), timed with
    time_graph over fns_of(config); configs that do not compile or compute wrongly are printed and skipped.
    None when no config works. all_timings, a list, gets [config, µs] of every config that worked."""
    best = None
    timings = []
    for cfg in configs:
        try:
            fns = fns_of(cfg)
            err = float((fns[0]().float() - ref).norm() / ref.norm())
            if err > tol:
                raise RuntimeError(f"wrong result: rel err {err:.3g}")
            us = time_graph(fns, reps=reps)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
            print(f"  {label} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        timings.append([list(cfg), us])
        if best is None or us < best[0]:
            best = (us, cfg)
    if all_timings is not None:
        all_timings.extend(timings)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer configs and shapes")
    ap.add_argument("--schemes", default="fp8_per_channel,fp8_per_block")
    ap.add_argument("--kernels", default="gemv,gemv1",
                    help="gemv: the tensor-core kernel (fp8_gemv_kernel, M <= 16); gemv1: the one-row kernel (M = 1 only)")
    ap.add_argument("--ms", default="1,8,16")
    ap.add_argument("--no-grid", action="store_true", help="default tiles only (no search)")
    ap.add_argument("--splits", default="1,2,4,8", help="split-K counts the tensor-core kernel's grid tries")
    args = ap.parse_args(argv)
    out = Path(args.out)
    dev = torch.device("cuda")
    caps = K.caps(dev)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} caps {caps}", flush=True)
    hbm = 4.8e6 if "H200" in torch.cuda.get_device_name() else 3.35e6  # bytes per microsecond
    launch = {"gemv": K._launch_gemv, "gemv1": K._launch_gemv1}
    grid1 = list(itertools.product([4, 8, 16, 32], [256, 512, 1024], [4, 8], [2, 3]))  # gemv1: BN, BK, warps, stages
    kernels = args.kernels.split(",")
    ms = [int(v) for v in args.ms.split(",")]
    splits = [int(v) for v in args.splits.split(",")]
    grid = list(itertools.product([16, 32, 64], [128, 256, 512], [4, 8], [3, 5], splits))  # BN, BK, warps, stages, splits
    shapes = SHAPES[:4] if args.quick else SHAPES
    if args.quick:
        grid = list(itertools.product([16, 32, 64], [128], [4], [3, 5], splits))
    rows = []
    t_start = time.perf_counter()
    for scheme in args.schemes.split(","):
        for n, k in shapes:
            copies = max(2, -(-COPIES_BYTES // (n * k)))
            ws = [_quantize_weight(torch.randn(n, k, device=dev) * 0.02, scheme) for _ in range(copies)]
            wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                rec = {"scheme": scheme, "n": n, "k": k, "m": m, "copies": copies}
                rec["bf16_us"] = time_graph([lambda w=w: F.linear(x, w) for w in wb])
                if scheme != "fp8_per_block":
                    qx, sx = K._quant_torch(x, "row")
                    rec["bare_scaled_mm_us"] = time_graph([lambda q=q, s=s: torch._scaled_mm(
                        qx, q.t(), scale_a=sx.view(-1, 1), scale_b=s.view(1, -1), out_dtype=torch.bfloat16) for q, s in ws])
                    two = caps._replace(triton_gemv=False)  # the W8A8 path FP8Linear takes above GEMV_MAX_M rows
                    rec["two_kernel_us"] = time_graph([lambda q=q, s=s: K.linear_fast(x, q, s, None, scheme, two, decode_rule=False)
                                                       for q, s in ws])
                rec["gemv_default_config"] = K._gemv_config(n, k, scheme == "fp8_per_block")
                rec["gemv1_default_config"] = K._gemv1_config(n, k)
                rec["entry_us"] = time_graph([lambda q=q, s=s: K.gemv(x, q, s, None, scheme) for q, s in ws])  # what FP8Linear runs
                ref = K.reference_linear(x, *ws[0], None, scheme).float()
                for kern in kernels:
                    if kern == "gemv1" and m != 1:
                        continue
                    fn = launch[kern]
                    rec[f"{kern}_default_us"] = time_graph([lambda q=q, s=s: fn(x, q, s, None, scheme) for q, s in ws])
                    configs = [] if args.no_grid else (grid1 if kern == "gemv1" else grid)
                    configs = [cfg for cfg in configs if not (scheme == "fp8_per_block" and cfg[1] != 128)]
                    best = best_config(configs, lambda cfg: [lambda q=q, s=s: fn(x, q, s, None, scheme, cfg) for q, s in ws],
                                       ref, 0.06, kern, all_timings=rec.setdefault(f"{kern}_all", []))
                    if best:
                        rec[f"{kern}_best_us"], rec[f"{kern}_best_config"] = best
                rec["floor_us"] = n * k / hbm  # FP8 weight bytes at the card's HBM bandwidth
                emit(rec, out)
                rows.append(rec)
    print(f"\nsweep took {time.perf_counter() - t_start:.0f} s\n")
    head = " | ".join(f"{kk} default | {kk} best (BN,BK,warps,stages)" for kk in kernels)
    print(f"| scheme | N x K | M | bf16 | bare _scaled_mm | quant + _scaled_mm | kernels.gemv (FP8Linear) | {head} | HBM floor |")
    print("|---|---|---|---|---|---|---|" + "---|---|" * len(kernels) + "---|")
    for r in rows:
        f = lambda v: f"{v:.1f}" if isinstance(v, float) else "-"  # noqa: E731
        cells = " | ".join(f"{f(r.get(f'{kk}_default_us'))} | {f(r.get(f'{kk}_best_us'))} {tuple(r.get(f'{kk}_best_config') or ())}" for kk in kernels)
        print(f"| {r['scheme']} | {r['n']}x{r['k']} | {r['m']} | {f(r['bf16_us'])} | {f(r.get('bare_scaled_mm_us'))} | "
              f"{f(r.get('two_kernel_us'))} | {f(r.get('entry_us'))} | {cells} | {r['floor_us']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
