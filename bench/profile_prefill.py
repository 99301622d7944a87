"""Where prefill time goes on the GPU: kernel time by category, bf16 vs FP8, eager vs compiled (issue 3).

One (model, variant, mode) per process; the model is built as bench_infer.py builds it (random weights,
`--layers` decoder layers), one prefill of B x T tokens is profiled (torch.profiler, CUDA kernels only)
after warm-up, and the kernels are grouped: GEMMs (cuBLAS / CUTLASS / grouped), attention, fp8stream's
Triton kernels, inductor-generated Triton, sort / gather / scatter, other elementwise. Prints one JSON
line per run (per-layer milliseconds) and a markdown table when run for several.

    PYTHONPATH=src python3 bench/profile_prefill.py --models llama-3.1-8b,qwen1.5-moe-a2.7b --layers 4 \
        --variants bf16,fp8_per_channel --modes eager,compiled --out /tmp/prof
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
CATEGORIES = (  # first match wins
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|_mm_|matmul|grouped_mm|cublas", re.I)),
    ("fp8stream triton", re.compile(r"^(quant_|fp8_|_?grouped_gemm|gemv)", re.I)),
    ("inductor triton", re.compile(r"^triton_", re.I)),
    ("sort/gather/scatter", re.compile(r"sort|radix|index|gather|scatter|search|cumsum|histogram|nonzero", re.I)),
    ("copy/cast", re.compile(r"copy|convert|cast|cat|fill", re.I)),
)


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if pat.search(name):
            return cat
    return "other elementwise/reduction"


def worker(model_name: str, variant: str, mode: str, layers: int, b: int, t: int, reps: int,
           cpu_top: int = 0) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(HERE))
    import bench_infer as BI

    from fp8stream import kernels as K

    K.prepare("cuda")
    model, _ = BI.build_model(model_name, variant, layers)
    if mode == "compiled":
        BI._compile_layers(model)
    ids = torch.randint(0, model.config.vocab_size, (b, t), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        end.record()
        torch.cuda.synchronize()
        wall_ms = start.elapsed_time(end) / reps
        # host time to issue one forward (no sync inside): close to wall_ms means the GPU waits for the CPU. The median
        # of 5 (one issue timing swung 2x within a lease, BENCHMARKS.md 2026-12-07 "Qwen1.5-MoE"). It includes the
        # forward's fixed host work (masks, embeddings, rotary tables), which a --layers model divides by few layers.
        issue = []
        for _ in range(5):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            issue.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
        host_ms = sorted(issue)[2]
        if cpu_top:
            with profile(activities=[ProfilerActivity.CPU]) as cprof:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
            cpu = sorted(((ev.key, ev.self_cpu_time_total / 1e3 / layers, ev.count / layers)
                          for ev in cprof.key_averages()), key=lambda r: -r[1])[:cpu_top]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = by_kernel[ev.name]
            k[0] += ev.device_time_total / 1e3 / reps / layers  # ms per layer
            k[1] += 1
    cats: dict[str, float] = defaultdict(float)
    for name, (ms, _) in by_kernel.items():
        cats[category(name)] += ms
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:25]
    return dict(model=model_name, variant=variant, mode=mode, layers=layers, tokens=b * t,
                wall_ms_per_layer=round(wall_ms / layers, 3), host_ms_per_layer=round(host_ms / layers, 3),
                tok_s=round(b * t / wall_ms * 1e3),
                **({"cpu_self_ms_per_layer": [dict(op=k[:120], ms=round(v, 4), calls=c) for k, v, c in cpu]}
                   if cpu_top else {}),
                kernel_ms_per_layer=round(sum(cats.values()), 3),
                categories={k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
                top=[dict(name=n[:160], ms_per_layer=round(v[0], 4), calls_per_layer=v[1] / reps / layers,
                          category=category(n)) for n, v in top])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-3.1-8b,qwen1.5-moe-a2.7b")
    ap.add_argument("--variants", default="bf16,fp8_per_channel")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shape", default="1x4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="directory for results.jsonl / results.md")
    ap.add_argument("--cpu-top", type=int, default=0, help="also profile the host: this many ops by self CPU time")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    b, t = (int(v) for v in args.shape.split("x"))
    if args.worker:
        m, v, mode = args.worker.split(":")
        print("RESULT " + json.dumps(worker(m, v, mode, args.layers, b, t, args.reps, args.cpu_top)), flush=True)
        return 0
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in args.models.split(","):
        for mode in args.modes.split(","):
            for v in args.variants.split(","):
                p = subprocess.run([sys.executable, __file__, "--worker", f"{m}:{v}:{mode}", "--layers", str(args.layers),
                                    "--shape", args.shape, "--reps", str(args.reps), "--cpu-top", str(args.cpu_top)],
                                   capture_output=True, text=True)
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                row = json.loads(line[-1][7:]) if line else dict(model=m, variant=v, mode=mode, error=p.stderr[-800:])
                print(json.dumps(row), flush=True)
                rows.append(row)
                if out:
                    with open(out / "results.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
    cats = sorted({c for r in rows for c in r.get("categories", {})})
    md = [f"prefill {args.shape}, ms per decoder layer (kernel time; wall = CUDA events over the whole forward / layers; "
          "host = time to issue one forward / layers)", "",
          "| model | mode | variant | wall | host | kernels | " + " | ".join(cats) + " |", "|---" * (6 + len(cats)) + "|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['model']} | {r['mode']} | {r['variant']} | error | | | " + " | ".join("" for _ in cats) + " |")
            continue
        md.append(f"| {r['model']} | {r['mode']} | {r['variant']} | {r['wall_ms_per_layer']:.3f} | {r.get('host_ms_per_layer', 0):.3f} | "
                  f"{r['kernel_ms_per_layer']:.3f} | "
                  + " | ".join(f"{r['categories'].get(c, 0):.3f}" for c in cats) + " |")
    text = "\n".join(md)
    print(text)
    if out:
        (out / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
