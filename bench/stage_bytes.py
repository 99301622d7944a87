"""Device bytes per element that each staged loader step really allocates (CUDA max_memory_allocated).

    python bench/stage_bytes.py

The loader's staging budget assumes `_STAGE_BYTES_PER_ELEM` bytes per element besides the source rows;
this measures each step on a [rows, 2048] bf16 chunk, as the loader runs it, to check the assumption.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fp8stream.loader import _STAGE_BYTES_PER_ELEM  # noqa: E402
from fp8stream.quantize import quantize_blocks, quantize_rows, tensor_amax  # noqa: E402


def extra_per_elem(step, rows=16384, cols=2048):
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    keep = torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16)  # a kept tensor's final storage
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step(x, keep)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / (rows * cols)


def kept(x, dst):
    dst.copy_(x)
    return torch.isfinite(dst).all()


steps = {
    "quantize_rows (per-channel)": lambda x, _: quantize_rows(x),
    "quantize_rows with given scales (per-tensor)": lambda x, _: quantize_rows(x, torch.full((x.shape[0],), 0.01, device="cuda")),
    "quantize_blocks (per-block)": lambda x, _: quantize_blocks(x),
    "tensor_amax (per-tensor first pass)": lambda x, _: tensor_amax(x),
    "kept: copy + isfinite": kept,
}
res = {name: round(extra_per_elem(fn), 3) for name, fn in steps.items()}
res["assumed (loader)"] = _STAGE_BYTES_PER_ELEM
res["gpu"] = torch.cuda.get_device_name()
print(json.dumps(res, indent=1))
