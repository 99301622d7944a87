"""What the first use of each loader step costs in a fresh process, against its second use.

    PYTHONPATH=src python3 bench/first_use_cost.py            # one line of JSON (seconds)
    CUDA_MODULE_LOADING=EAGER PYTHONPATH=src python3 bench/first_use_cost.py

Times, after `import torch, transformers` and CUDA context creation (outside every load clock of
bench_load.py): importing transformers' modeling_utils and the Qwen1.5-MoE modeling code, building
transformers' checkpoint-renaming table, the first and second row quantization (loader path) on the GPU,
the first and second full-precision copy + finiteness check, and the first and second pinned host->device
copy on a side stream. A first use much slower than the second, and not with EAGER module loading, is
CUDA's lazy loading of that kernel's module: what loader._KernelWarmup moves off the stream's path.
"""

from __future__ import annotations

import json
import time

import torch
import transformers  # noqa: F401

T: dict[str, float] = {}


def timed(name, fn):
    t = time.perf_counter()
    out = fn()
    T[name] = round(time.perf_counter() - t, 4)
    return out


def quant():
    from fp8stream.quantize import quantize_rows_into

    x = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(2048, 2048, device="cuda", dtype=torch.float8_e4m3fn)
    s = torch.empty(2048, device="cuda")
    quantize_rows_into(x, q, s)
    torch.isfinite(s).all()
    torch.cuda.synchronize()


def kept():
    x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    d = torch.empty_like(x)
    d.copy_(x)
    torch.stack([torch.isfinite(d).all()]).all()
    torch.cuda.synchronize()


def h2d():
    buf = torch.empty(49 << 20, dtype=torch.uint8).zero_()
    torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    side, event = torch.cuda.Stream(), torch.cuda.Event()
    with torch.cuda.stream(side):
        y = buf.to("cuda", non_blocking=True)
        event.record(side)
    torch.cuda.current_stream().wait_event(event)
    y.record_stream(torch.cuda.current_stream())
    event.synchronize()
    torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


def main() -> None:
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    timed("import_modeling_utils", lambda: __import__("transformers.modeling_utils"))
    timed("import_qwen2_moe", lambda: __import__("transformers.models.qwen2_moe.modeling_qwen2_moe"))
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    timed("conversion_mapping", lambda: get_checkpoint_conversion_mapping("qwen2_moe"))
    for name, fn in (("quant", quant), ("kept", kept), ("h2d", h2d)):
        timed(f"{name}_first", fn)
        timed(f"{name}_second", fn)
    print(json.dumps(T))


if __name__ == "__main__":
    main()
