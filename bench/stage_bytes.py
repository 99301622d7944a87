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
from fp8stream.stream import _STAGE_BYTES_PER_ELEM  # noqa: E402
from fp8stream.quantize import FP8_DTYPE, quantize_blocks, quantize_rows_into, tensor_amax  # noqa: E402


def extra_per_elem(step, rows=16384, cols=2048):
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    # the final storage the loader fills, allocated before the chunk is staged (not staging)
    final = {"kept": torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16),
             "q": torch.empty(rows, cols, device="cuda", dtype=FP8_DTYPE), "s": torch.empty(rows, device="cuda"),
             "norm": torch.empty((), device="cuda", dtype=torch.bfloat16)}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step(x, final)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / (rows * cols)


def kept(x, f):
    f["kept"].copy_(x)
    return torch.linalg.vector_norm(f["kept"], float("inf"), out=f["norm"])


steps = {
    "rows: quantize_rows_into (per-channel)": lambda x, f: quantize_rows_into(x, f["q"], f["s"]),
    "scaled_rows: quantize_rows_into with given scales (per-tensor)":
        lambda x, f: quantize_rows_into(x, f["q"], f["s"], torch.full((x.shape[0],), 0.01, device="cuda")),
    "blocks: quantize_blocks (per-block)": lambda x, _: quantize_blocks(x),
    "tensor_amax (per-tensor first pass)": lambda x, _: tensor_amax(x),
    "kept: copy + inf-norm": kept,
    "rows' amax alone (vector_norm, float32 out)":
        lambda x, f: torch.linalg.vector_norm(x, float("inf"), dim=-1, dtype=torch.float32, out=f["s"]),
}
res = {name: round(extra_per_elem(fn), 3) for name, fn in steps.items()}
res["assumed (loader)"] = _STAGE_BYTES_PER_ELEM["cuda"]
res["gpu"] = torch.cuda.get_device_name()
print(json.dumps(res, indent=1))
