"""Time to a ready model as a user measures it: the wall time of the command they type, each a fresh process,
every import, CUDA context, compile and warm-up inside the clock; modes interleaved, several rounds.

    PYTHONPATH=src python bench/user_time.py CKPT_DIR --rounds 5 --modes import,cli,api,hf_bf16,safetensors \
        --device cuda --out results.json

Modes (each one fresh `python` process; the wall clock is taken around the process by this script):
  import       python -c "import torch, transformers"                       (the baseline: not ours)
  hf_modeling  import torch, transformers, the checkpoint's transformers model class built on the meta device,
               and (CUDA) the context: what every transformers-based loader pays before its first byte
  cli          python -m fp8stream load CKPT --device D --json               (the report's seconds are kept too)
  api          python -c: import torch + CUDA init, then fp8stream.load() twice; the two calls timed inside
               (the issue's "fresh process, torch imported" figure, and the second call)
  hf_bf16      transformers AutoModelForCausalLM.from_pretrained(CKPT, dtype=bf16, device_map=D)
  safetensors  safetensors.torch.load_file(shard, device=D) for every shard, no model
Prints one JSON line per run and, at the end, per mode: median, min, max of the wall seconds and the
median extra over the import baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

API = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
if sys.argv[2].startswith("cuda"):
    torch.cuda.init(); torch.empty(1, device=sys.argv[2])
t1 = time.perf_counter()
import fp8stream
out = {"torch_and_context_s": t1 - t0}
for i in range(2):
    t = time.perf_counter()
    m = fp8stream.load(sys.argv[1], device=sys.argv[2], progress=False)
    if sys.argv[2].startswith("cuda"):
        torch.cuda.synchronize()
    out[f"load{i + 1}_s"] = time.perf_counter() - t
    rep = m.fp8stream_report
    out[f"load{i + 1}_report"] = {k: getattr(rep, k, None) for k in ("load_seconds", "setup_seconds", "streaming_seconds", "peak_bytes", "final_bytes")}
    del m
    if sys.argv[2].startswith("cuda"):
        torch.cuda.empty_cache()
print(json.dumps(out))
"""

MODELING = r"""
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
cfg = AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    AutoModelForCausalLM.from_config(cfg)
if sys.argv[2].startswith("cuda"):
    torch.empty(1, device=sys.argv[2])
"""

HF = r"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map=sys.argv[2])
if sys.argv[2].startswith("cuda"):
    torch.cuda.synchronize()
"""

ST = r"""
import sys, pathlib, torch
from safetensors.torch import load_file
held = [load_file(str(f), device=sys.argv[2]) for f in sorted(pathlib.Path(sys.argv[1]).glob("*.safetensors"))]
if sys.argv[2].startswith("cuda"):
    torch.cuda.synchronize()
"""


def command(mode: str, ckpt: str, device: str) -> list[str]:
    py = sys.executable
    return {
        "import": [py, "-c", "import torch, transformers"],
        "cli": [py, "-m", "fp8stream", "load", ckpt, "--device", device, "--json"],
        "api": [py, "-c", API, ckpt, device],
        "hf_modeling": [py, "-c", MODELING, ckpt, device],
        "hf_bf16": [py, "-c", HF, ckpt, device],
        "safetensors": [py, "-c", ST, ckpt, device],
    }[mode]


def run(mode: str, ckpt: str, device: str, timeout: float) -> dict:
    t = time.perf_counter()
    p = subprocess.run(command(mode, ckpt, device), capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    wall = time.perf_counter() - t
    row = {"mode": mode, "wall_s": round(wall, 3), "rc": p.returncode}
    if p.returncode != 0:
        row["stderr"] = p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else []
    elif mode in ("cli", "api"):
        try:
            doc = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            doc = {}
        if mode == "cli":
            row["report"] = {k: doc.get(k) for k in ("load_seconds", "setup_seconds", "streaming_seconds", "peak_bytes", "final_bytes")}
        else:
            row.update(doc)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--modes", default="import,cli,api,hf_bf16,safetensors")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    modes = args.modes.split(",")
    rows = []
    for r in range(args.rounds):
        for mode in modes:  # interleaved: drift hits every mode alike
            row = {"round": r, **run(mode, args.ckpt, args.device, args.timeout)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    base = [x["wall_s"] for x in rows if x["mode"] == "import" and x["rc"] == 0]
    for mode in modes:
        w = [x["wall_s"] for x in rows if x["mode"] == mode and x["rc"] == 0]
        if not w:
            summary[mode] = {"failed": len([x for x in rows if x["mode"] == mode])}
            continue
        s = {"median_s": round(statistics.median(w), 3), "min_s": min(w), "max_s": max(w), "n": len(w)}
        if base and mode != "import":
            s["median_extra_over_import_s"] = round(statistics.median(w) - statistics.median(base), 3)
        if mode == "api":
            for k in ("load1_s", "load2_s"):
                v = [x[k] for x in rows if x["mode"] == "api" and k in x]
                s[f"{k}_median"] = round(statistics.median(v), 3) if v else None
        summary[mode] = s
    print(json.dumps({"summary": summary}, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
