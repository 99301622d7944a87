"""cuBLAS FP8 GEMM time by scaling and accumulation vs bf16 (why kernels.FAST_ACCUM is on): torch.mm in bf16,
torch._scaled_mm rowwise (what FP8Linear runs) and tensorwise, each with fp32 promotion (use_fast_accum=False,
cuBLAS's default) and with fast accumulation; µs per call in a replayed CUDA graph, on the Llama-3.1-8B and
Qwen1.5-MoE-A2.7B projection shapes (gate|up fused: N = 28672 / 11264; q|k|v fused: 6144).

    PYTHONPATH=src python3 bench/gemm_accum.py /tmp/gemm_accum.json
"""
import json
import sys

import torch

torch.manual_seed(0)
dev = "cuda"
f8 = torch.float8_e4m3fn


def graph_us(fn, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    g.replay(); torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    return sorted(times)[len(times) // 2]


shapes = [(4096, 4096, 4096), (4096, 6144, 4096), (4096, 1024, 4096), (4096, 28672, 4096), (4096, 14336, 4096), (4096, 4096, 14336),
          (16384, 4096, 4096), (256, 4096, 4096), (4096, 2048, 2048), (4096, 11264, 2048), (4096, 2048, 5632)]
out = []
for m, n, k in shapes:
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    xq = x.to(f8); wq = (w * 100).to(f8)
    sa = torch.rand(m, 1, device=dev) + 0.5; sb = torch.rand(1, n, device=dev) + 0.5
    one = torch.ones((), device=dev)
    r = {"m": m, "n": n, "k": k}
    r["bf16"] = graph_us(lambda: torch.mm(x, w.t()))
    r["rowwise"] = graph_us(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
    r["tensorwise"] = graph_us(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    r["tensorwise_fast_accum"] = graph_us(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True))
    try:
        r["rowwise_fast_accum"] = graph_us(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True))
    except Exception as e:
        r["rowwise_fast_accum"] = str(e)[:80]
    fl = 2 * m * n * k
    r["tflops_rowwise"] = round(fl / r["rowwise"] / 1e6, 1)
    r["tflops_tensorwise"] = round(fl / r["tensorwise"] / 1e6, 1)
    print(json.dumps(r), flush=True)
    out.append(r)
json.dump(out, open(sys.argv[1], "w"), indent=1)
