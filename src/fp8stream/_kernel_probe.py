"""The per-device capability probe of fp8stream's FP8 kernels (re-exported by fp8stream.kernels): _probe's tiny
self-tests against the reference, caps() (cached, a constant for dynamo) and prepare(), together with the pointer-load
Triton FP8 GEMM (_launch_gemm, the fp8stream::fp8_gemm op, grouped_gemm). These live in one module because they
depend on each other: _launch_gemm asks caps() whether the TMA kernel may run, and the probe tests grouped_gemm.
Builds on _kernel_caps and _fp8_ops.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import _kernel_caps
from ._fp8_ops import (_DTYPES, _TMA_CONFIG, _blockwise_scaled_mm, _col_major, _deq, _fake, _group_bounds,
                       _launch_gemm_tma, _launch_pairs, _op, _pow2, _quant_torch, _ref_mm, _row_tiles, _w8a16, gemv,
                       quant_triton)
from ._kernel_caps import Caps, triton_kernels
from .quantize import quantize_activation


# ----------------------------------------------------------------------------------------- capabilities

_CAPS: dict[int, Caps] = {}
PROBE_LOG: dict[int, dict[str, str]] = {}  # device index -> what each probe said (for reports / debugging)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


def _probe(index: int) -> Caps:
    if os.environ.get("FP8STREAM_KERNELS", "") == "reference":
        return Caps(reference=True)
    dev = torch.device("cuda", index)
    log = PROBE_LOG.setdefault(index, {})
    cap = torch.cuda.get_device_capability(dev)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dev)

    def attempt(name, fn) -> bool:
        try:
            err = fn()
            ok = err < 0.02
            log[name] = f"ok (rel err {err:.2e})" if ok else f"WRONG (rel err {err:.2e})"
            return ok
        except Exception as e:  # noqa: BLE001 - a rejected configuration is an answer, not an error
            log[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            return False

    def rowwise():
        w = rnd(64, 128)
        qw, sw = quantize_activation(w, "fp8_per_channel")
        x = rnd(3, 128)
        qx, sx = quantize_activation(x, "fp8_per_channel")
        y = torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw.view(1, -1), out_dtype=torch.bfloat16,
                             use_fast_accum=_kernel_caps.FAST_ACCUM)
        return _rel_err(y, _ref_mm(qx, sx, qw, sw.view(-1), "fp8_per_channel"))

    scaled_mm = cap >= (8, 9) and hasattr(torch, "_scaled_mm") and attempt("scaled_mm rowwise", rowwise)

    def grouped():
        e, n, k = 4, 32, 64
        w = rnd(e, n, k)
        qw, sw = quantize_activation(w.view(-1, k), "fp8_per_channel")
        qw, sw = qw.view(e, n, k), sw.view(e, n)
        counts = [3, 0, 5, 1]  # an empty group included
        ends = torch.tensor(counts).cumsum(0).to(torch.int32).to(dev)
        x = rnd(sum(counts), k)
        qx, sx = quantize_activation(x, "fp8_per_channel")
        y = torch._scaled_grouped_mm(qx, qw.transpose(-2, -1), scale_a=sx.view(-1), scale_b=sw, offs=ends,
                                     out_dtype=torch.bfloat16, use_fast_accum=_kernel_caps.FAST_ACCUM)
        ref, start = [], 0
        for i, c in enumerate(counts):
            ref.append(_ref_mm(qx[start:start + c], sx[start:start + c], qw[i], sw[i], "fp8_per_channel"))
            start += c
        return _rel_err(y, torch.cat(ref))

    grouped_ok = cap >= (9, 0) and hasattr(torch, "_scaled_grouped_mm") and attempt("scaled_grouped_mm rowwise", grouped)

    def blockwise(m, n, k):
        def run():
            from .quantize import quantize_blocks

            qw, sw = quantize_blocks(rnd(n, k))
            x = rnd(m, k)
            qx, sx = _quant_torch(x, "group")
            y = _blockwise_scaled_mm(qx, _col_major(sx), qw, sw, torch.bfloat16)
            return _rel_err(y, _ref_mm(qx, sx, qw, sw, "fp8_per_block"))
        return run

    blockwise_ok = (cap >= (9, 0) and hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")
                    and all([attempt(f"F.scaled_mm blockwise M={m} N={n} K={k}", blockwise(m, n, k))
                             for m, n, k in ((1, 256, 384), (5, 128, 512), (128, 256, 1024))]))

    tk = triton_kernels()
    triton_quant = triton_gemm = False
    if tk is None:
        log["triton"] = "not available"
    else:
        def tquant():
            x = rnd(5, 300).to(torch.bfloat16)
            errs = []
            for mode in ("row", "group"):
                q, s = quant_triton(x, mode)
                qr, sr = _quant_torch(x, mode)
                errs.append(_rel_err(_deq(q, s, mode), _deq(qr, sr, mode)))
            return max(errs)

        def tgemm():
            from .quantize import quantize_blocks

            e, n, k = 3, 256, 384
            qs = [quantize_blocks(rnd(n, k)) for _ in range(e)]
            qw, sw = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
            counts = [2, 0, 19]
            x = rnd(sum(counts), k)
            qx, sx = _quant_torch(x, "group")
            ids = torch.repeat_interleave(torch.arange(e), torch.tensor(counts)).to(dev)
            starts, ends = _group_bounds(ids, e)
            y = grouped_gemm(qx, sx, qw, sw, starts, ends, True, torch.bfloat16)
            ref, start = [], 0
            for i, c in enumerate(counts):
                ref.append(_ref_mm(qx[start:start + c], sx[start:start + c], qw[i], sw[i], "fp8_per_block"))
                start += c
            return _rel_err(y, torch.cat(ref))

        def tgemv():
            errs = []
            x, bias = rnd(3, 384).to(torch.bfloat16), rnd(200).to(torch.bfloat16)
            for scheme in ("fp8_per_channel", "fp8_per_block"):
                qw, sw = _weight_for_probe(rnd(200, 384), scheme)
                for rows in (x[:1], x):  # the one-row and the tensor-core kernel
                    errs.append(_rel_err(gemv(rows, qw, sw, bias, scheme), _w8a16(rows, qw, sw, bias, scheme)))
                # MoE decode: 3 tokens x 2 experts each over 3 experts (pair p reads token p // 2, expert ids[p])
                qe = [_weight_for_probe(rnd(128, 384), scheme) for _ in range(3)]
                ids = torch.tensor([2, 0, 1, 2, 0, 1], device=dev)
                y = _launch_pairs(x, ids, 2, None, torch.stack([q for q, _ in qe]), torch.stack([s for _, s in qe]),
                                  scheme, False, torch.float32)
                ref = torch.cat([_w8a16(x[p // 2 : p // 2 + 1], *qe[int(ids[p])], None, scheme) for p in range(6)])
                errs.append(_rel_err(y, ref))
            return max(errs)

        triton_quant = attempt("triton quant", tquant)
        triton_gemm = attempt("triton gemm", tgemm)
        triton_gemv = attempt("triton gemv (W8A16, Linear and MoE experts)", tgemv)

        def ttma():
            e, n, k = 3, 256, 384
            qs = [quantize_activation(rnd(n, k), "fp8_per_channel") for _ in range(e)]
            qw, sw = torch.stack([q for q, _ in qs]), torch.stack([s.view(-1) for _, s in qs])
            counts = [130, 0, 7]  # one group of two row tiles, an empty one, a small one
            x = rnd(sum(counts), k)
            qx, sx = quantize_activation(x, "fp8_per_channel")
            sx = sx.view(-1)
            ids = torch.repeat_interleave(torch.arange(e), torch.tensor(counts)).to(dev)
            starts, ends = _group_bounds(ids, e)
            y = _launch_gemm_tma(qx, sx, qw, sw, None, starts, ends, torch.bfloat16, _TMA_CONFIG)
            ref, start = [], 0
            for i, c in enumerate(counts):
                ref.append(_ref_mm(qx[start:start + c], sx[start:start + c], qw[i], sw[i], "fp8_per_channel"))
                start += c
            return _rel_err(y, torch.cat(ref))

        # FP8STREAM_TRITON_TMA=0: the pointer-load grouped GEMM at every size (A/B runs)
        triton_tma = (cap >= (9, 0) and os.environ.get("FP8STREAM_TRITON_TMA", "1") != "0"
                      and attempt("triton grouped gemm, TMA (Hopper)", ttma))
    return Caps(scaled_mm=scaled_mm, grouped=grouped_ok, blockwise=blockwise_ok, triton_quant=triton_quant, triton_tma=triton_tma,
                triton_gemm=triton_gemm, triton_gemv=triton_gemv if tk is not None else False)


def _probe_cached(index: int) -> Caps:
    caps = _CAPS.get(index)
    if caps is None:
        with torch.no_grad():
            caps = _probe(index)
        _CAPS[index] = caps
    return caps


def _caps_tuple(index: int) -> tuple:
    # Run (once) at trace time under torch.compile and treated as a constant: no graph break, no guard on tensors.
    return tuple(_probe_cached(index))


# torch.compiler.assume_constant_result(_caps_tuple), without its import of torch._dynamo (1.5 s, most of
# `import fp8stream`; a load never compiles). The decorator only sets this attribute (torch 2.1-2.13);
# tests/test_kernels.py checks that the official decorator still sets exactly that.
_CONSTANT_MARK = "_dynamo_marked_constant"
setattr(_caps_tuple, _CONSTANT_MARK, True)


def caps(device: torch.device) -> Caps:
    """What the fast paths may use on this CUDA device (probed once; see PROBE_LOG for the details)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.compiler.is_compiling():
        return Caps(*_caps_tuple(index))
    c = _CAPS.get(index)  # eager: a dict lookup per call
    return c if c is not None else _probe_cached(index)


def prepare(device: str | torch.device = "cuda") -> dict:
    """Probe a device now (outside any compile) and return what was found, for logs and reports."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"device": str(dev), "paths": "reference (CPU)"}
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    c = _probe_cached(index)
    return {"device": f"cuda:{index}", **c._asdict(), "probes": dict(PROBE_LOG.get(index, {}))}


def _weight_for_probe(w: torch.Tensor, scheme: str):
    from .quantize import quantize_blocks

    if scheme == "fp8_per_block":
        return quantize_blocks(w)
    q, s = quantize_activation(w, scheme)
    return q, s.view(-1)


# ----------------------------------------------------------------------------------------- Triton GEMM

_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def _gemm_config(rows: int, groups: int, n: int, sms: int, blockwise: bool = False) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_warps, num_stages). Groups of prefill size (MoE experts, > 64 rows each on average):
    64 x 256 tiles, 4 stages, the best of a 32-config grid on 7 of the 8 Qwen MoE expert GEMMs at 4096 and
    16384 tokens (bench/sweep_grouped.py, H100; 1.2-1.4x faster than 128 x 128 x 3 there; rowwise only: a
    block-scaled tile must lie within one 128-column scale block). Otherwise BM from the rows per group, and BN shrinks
    (128 -> 64 -> 32) while too few tiles would be active to keep every SM streaming weights (decode)."""
    avg = rows / max(1, min(groups, rows))
    if groups > 1 and avg > 64 and not blockwise:
        return 64, 256, 128, 8, 4
    bm = 16 if avg <= 16 else 32 if avg <= 32 else 64 if avg <= 64 else 128
    active_m = -(-rows // bm) + (min(groups, rows) if groups > 1 else 0)
    bn = 128
    while bn > 32 and active_m * -(-n // bn) < sms:
        bn //= 2
    return bm, bn, 128, 4 if bm <= 32 else 8, 3


def _launch_gemm(a, a_scale, b, b_scale, bias, starts, ends, blockwise: bool, out_dtype,
                 config: tuple[int, int, int, int, int] | None = None, out_rows: torch.Tensor | None = None) -> torch.Tensor:
    """See grouped_gemm; out_rows [M] (a permutation of 0..M-1, grouped only): row r of the product is stored as
    output row out_rows[r]."""
    tk = triton_kernels()
    rows, k = a.shape
    grouped = b.dim() == 3
    e = b.shape[0] if grouped else 1
    n = b.shape[-2]
    if (config is None and grouped and not blockwise and rows > 64 * min(e, rows) and b.is_contiguous()
            and a.is_contiguous() and a.is_cuda and caps(a.device).triton_tma):
        return _launch_gemm_tma(a, a_scale, b, b_scale, bias, starts, ends, out_dtype, _TMA_CONFIG, out_rows)
    out = torch.empty(rows, n, device=a.device, dtype=out_dtype)
    if rows == 0:
        return out
    bm, bn, bk, warps, stages = config or _gemm_config(rows, e, n, _sm_count(a.device), blockwise)
    starts, ends, grid_m = _row_tiles(starts, ends, rows, e, bm, grouped, a_scale)
    if blockwise:
        sa_m, sa_k = a_scale.stride(0), a_scale.stride(1)
        sb = b_scale if grouped else b_scale.unsqueeze(0)
    else:
        sa_m, sa_k = a_scale.stride(0), 0
        sb = (b_scale if grouped else b_scale.unsqueeze(0)).unsqueeze(-1)
    bb = b if grouped else b.unsqueeze(0)
    tk.fp8_gemm_kernel[(grid_m, -(-n // bn))](
        a, a_scale, bb, sb, out, bias if bias is not None else out, starts, ends,
        out_rows if out_rows is not None else out, rows, n, k, e,
        a.stride(0), sa_m, sa_k,
        bb.stride(0), bb.stride(1), bb.stride(2),
        sb.stride(0), sb.stride(1), sb.stride(2),
        out.stride(0),
        GROUPED=grouped, BLOCKWISE=blockwise, HAS_BIAS=bias is not None, SCATTER=out_rows is not None,
        BM=bm, BN=bn, BK=bk, E_P2=_pow2(e), num_warps=warps, num_stages=stages)
    return out


@_op("fp8_gemm")
def _fp8_gemm_op(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 bias: torch.Tensor | None, starts: torch.Tensor, ends: torch.Tensor, blockwise: bool,
                 out_dtype: str, out_rows: torch.Tensor | None = None) -> torch.Tensor:
    return _launch_gemm(a, a_scale, b, b_scale, bias, starts, ends, blockwise, _DTYPES[out_dtype], out_rows=out_rows)


@_fake("fp8_gemm")
def _(a, a_scale, b, b_scale, bias, starts, ends, blockwise, out_dtype, out_rows=None):
    return a.new_empty(a.shape[0], b.shape[-2], dtype=_DTYPES[out_dtype])


def grouped_gemm(a, a_scale, b, b_scale, starts, ends, blockwise: bool, out_dtype, bias=None,
                 out_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Triton FP8 GEMM. Dense: b [N, K]; grouped: b [E, N, K], rows of `a` sorted by group, [starts, ends); with
    out_rows (grouped), row r of the product lands in output row out_rows[r]. Scales: rowwise a_scale [M],
    b_scale [(E,) N]; blockwise a_scale [M, K/128] (any strides), b_scale [(E,) N/128, K/128]. Called through a
    custom op under torch.compile (opaque, no graph break)."""
    if torch.compiler.is_compiling():
        dummy = a_scale if starts is None else None
        return _fp8_gemm_op(a, a_scale, b, b_scale, bias, starts if starts is not None else dummy,
                            ends if ends is not None else dummy, blockwise, str(out_dtype).split(".")[-1], out_rows)
    return _launch_gemm(a, a_scale, b, b_scale, bias, starts, ends, blockwise, out_dtype, out_rows=out_rows)
