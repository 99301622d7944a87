"""What this torch build's FP8 kernels accept on this GPU, and how fast they are (the floors for issue 3).

    python bench/probe_kernels.py [--out probe.json]

Prints one JSON line per probe: torch._scaled_mm rowwise vs bf16 matmul at M = 1..16384 on
Llama-3.1-8B shapes; which blockwise (1x128 x 128x128) scale layouts _scaled_mm accepts and whether
they compute the reference; torch._scaled_grouped_mm vs torch._grouped_mm (bf16) on Qwen1.5-MoE
expert shapes. Times: CUDA events, median of 20 after 5 warm-ups.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics

import torch

F8 = torch.float8_e4m3fn
results = []


def emit(**kw):
    results.append(kw)
    print(json.dumps(kw), flush=True)


def bench(fn, iters=20, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)  # microseconds


def q_rows(x):
    s = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
    return (x.float() / s).clamp(-448, 448).to(F8), s


def rowwise():
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw, sw = q_rows(w)
        for m in (1, 16, 256, 4096, 16384):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            qx, sx = q_rows(x)
            t_bf16 = bench(lambda: x @ w.t())
            t_mm = bench(lambda: torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw.view(1, n), out_dtype=torch.bfloat16))
            t_q = bench(lambda: q_rows(x))
            emit(probe="rowwise", m=m, n=n, k=k, bf16_us=t_bf16, scaled_mm_us=t_mm, eager_act_quant_us=t_q,
                 speedup_mm=t_bf16 / t_mm)


def blockwise():
    m, n, k = 256, 512, 1024
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    sx = x.float().view(m, k // 128, 128).abs().amax(-1) / 448  # [M, K/128]
    qx = (x.float().view(m, k // 128, 128) / sx[..., None]).to(F8).view(m, k)
    sw = w.float().view(n // 128, 128, k // 128, 128).abs().amax((1, 3)) / 448  # [N/128, K/128]
    qw = (w.float().view(n // 128, 128, k // 128, 128) / sw[:, None, :, None]).to(F8).view(n, k)
    ref = (qx.float().view(m, k // 128, 128) * sx[..., None]).view(m, k) @ (
        qw.float().view(n // 128, 128, k // 128, 128) * sw[:, None, :, None]).view(n, k).t()
    variants = {
        "a[M,K/128] rowmajor, b[N/128,K/128]": (sx.contiguous(), sw.contiguous()),
        "a[M,K/128] colmajor, b[N/128,K/128]": (sx.t().contiguous().t(), sw.contiguous()),
        "a[M,K/128] colmajor, b[K/128,N/128]": (sx.t().contiguous().t(), sw.t().contiguous()),
        "a[M,K/128] colmajor, b[N/128,K/128] colmajor": (sx.t().contiguous().t(), sw.t().contiguous().t()),
        "a[M,K/128] rowmajor, b[K/128,N/128]": (sx.contiguous(), sw.t().contiguous()),
    }
    for name, (sa, sb) in variants.items():
        try:
            y = torch._scaled_mm(qx, qw.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            emit(probe="blockwise_scaled_mm", variant=name, ok=True, rel_err=err)
        except Exception as e:
            emit(probe="blockwise_scaled_mm", variant=name, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    f = getattr(torch.nn.functional, "scaled_mm", None)
    emit(probe="F.scaled_mm", exists=f is not None, signature=str(inspect.signature(f)) if f else None,
         scaling_types=[x for x in dir(getattr(torch.nn.functional, "ScalingType", object)) if not x.startswith("_")])
    if f is not None:
        try:
            from torch.nn.functional import ScalingType, SwizzleType

            y = f(qx, qw.t(), sx.t().contiguous().t(), ScalingType.BlockWise1x128, sw, ScalingType.BlockWise128x128,
                  swizzle_a=SwizzleType.NO_SWIZZLE, swizzle_b=SwizzleType.NO_SWIZZLE, output_dtype=torch.bfloat16)
            emit(probe="F.scaled_mm blockwise", ok=True, rel_err=((y.float() - ref).norm() / ref.norm()).item())
        except Exception as e:
            emit(probe="F.scaled_mm blockwise", ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
    # timing of whichever variant worked, at the Llama shapes
    for name, (sa, sb) in variants.items():
        ok = [r for r in results if r.get("variant") == name and r.get("ok") and r["rel_err"] < 0.02]
        if not ok:
            continue
        for m in (1, 16, 256, 4096):
            n, k = 4096, 4096
            xx = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ww = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            qa, qb = xx.to(F8), ww.to(F8)
            a_s = torch.ones(m, k // 128, device="cuda")
            b_s = torch.ones(n // 128, k // 128, device="cuda")
            if "a[M,K/128] colmajor" in name:
                a_s = a_s.t().contiguous().t()
            if "b[K/128,N/128]" in name:
                b_s = b_s.t().contiguous()
            if "b[N/128,K/128] colmajor" in name:
                b_s = b_s.t().contiguous().t()
            try:
                t = bench(lambda: torch._scaled_mm(qa, qb.t(), scale_a=a_s, scale_b=b_s, out_dtype=torch.bfloat16))
                emit(probe="blockwise_time", variant=name, m=m, n=n, k=k, us=t, bf16_us=bench(lambda: xx @ ww.t()))
            except Exception as e:
                emit(probe="blockwise_time", variant=name, m=m, ok=False, error=str(e)[:200])
        break


def grouped():
    e, h, inter, topk = 60, 2048, 1408, 4
    f = getattr(torch, "_scaled_grouped_mm", None)
    emit(probe="_scaled_grouped_mm", exists=f is not None, doc=(f.__doc__ or "")[:300] if f else None,
         grouped_mm=hasattr(torch, "_grouped_mm"))
    w = torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16) * 0.02  # [E, N, K]
    qw, sw = q_rows(w.view(-1, h))
    qw, sw = qw.view(e, 2 * inter, h), sw.view(e, 2 * inter)
    for tokens in (1, 8, 64, 512, 4096):
        rows = tokens * topk
        idx = torch.randint(0, e, (rows,), device="cuda").sort().values
        counts = torch.bincount(idx, minlength=e)
        offs = counts.cumsum(0).to(torch.int32)
        x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
        qx, sx = q_rows(x)
        rec = dict(probe="grouped", tokens=tokens, rows=rows, e=e, n=2 * inter, k=h)
        try:
            rec["bf16_grouped_us"] = bench(lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs, out_dtype=torch.bfloat16))
        except Exception as ex:
            rec["bf16_grouped_err"] = str(ex)[:300]
        try:
            y = torch._scaled_grouped_mm(qx, qw.transpose(-2, -1), scale_a=sx.view(-1), scale_b=sw, offs=offs,
                                         out_dtype=torch.bfloat16)
            ref = torch.cat([(qx[a:b].float() * sx[a:b]) @ (qw[i].float() * sw[i, :, None]).t()
                             for i, (a, b) in enumerate(zip([0] + offs[:-1].tolist(), offs.tolist()))])
            rec["fp8_rel_err"] = ((y.float() - ref).norm() / ref.norm().clamp(min=1e-9)).item()
            rec["fp8_grouped_us"] = bench(lambda: torch._scaled_grouped_mm(qx, qw.transpose(-2, -1), scale_a=sx.view(-1),
                                                                          scale_b=sw, offs=offs, out_dtype=torch.bfloat16))
        except Exception as ex:
            rec["fp8_grouped_err"] = f"{type(ex).__name__}: {str(ex)[:300]}"
        # the dense alternative for decode: gather the routed experts' weights and bmm
        rec["bf16_loop_us"] = bench(lambda: [x[:1] @ w[i].t() for i in range(min(rows, e))])
        emit(**rec)


def compiled_act_quant():
    def q(x):
        s = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
        return (x.float() / s).clamp(-448, 448).to(F8), s

    qc = torch.compile(q, dynamic=True)
    for m in (1, 16, 256, 4096, 16384):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        emit(probe="act_quant", m=m, eager_us=bench(lambda: q(x)), compiled_us=bench(lambda: qc(x)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    emit(probe="env", torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(),
         capability=torch.cuda.get_device_capability())
    for fn in (rowwise, blockwise, grouped, compiled_act_quant):
        try:
            fn()
        except Exception as e:
            emit(probe=fn.__name__, crashed=f"{type(e).__name__}: {str(e)[:400]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
