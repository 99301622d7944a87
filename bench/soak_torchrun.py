"""Soak: the torchrun CLI load that once aborted at exit ("terminate called without an active exception", 2 of 30
runs before issue 18's fix), N times in a row on the CPU (gloo); counts the exit codes.

    PYTHONPATH=src python bench/soak_torchrun.py [--runs 50] [--ckpt DIR]    # default: a tiny Qwen3-MoE it writes
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--ckpt", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt
        if ckpt is None:
            from tiny_models import make_checkpoint

            ckpt = make_checkpoint("qwen3_moe", Path(tmp) / "moe")[0]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "fp8stream", "load", str(ckpt), "--device", "cpu", "--tp", "2", "--ep", "--json"]
        codes, aborts, t0 = collections.Counter(), 0, time.perf_counter()
        for i in range(args.runs):
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
            codes[p.returncode] += 1
            aborts += "terminate called" in p.stderr
            if p.returncode != 0:
                print(f"run {i}: exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}", flush=True)
        print(f"{args.runs} runs in {time.perf_counter() - t0:.0f} s: exit codes {dict(codes)}, 'terminate called' in {aborts}")
        return 0 if set(codes) == {0} and not aborts else 1


if __name__ == "__main__":
    sys.exit(main())
