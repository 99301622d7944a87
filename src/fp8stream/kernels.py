"""FP8 forward paths: dynamic activation quantization + FP8 GEMMs, dense (Linear) and grouped (MoE experts).

Every path computes the function the reference defines (quantize.py: scale = max(amax / 448, tiny),
q = fp8(clamp(x / scale)); y = (q_x * s_x) @ (q_w * s_w)^T; a Linear input of <= GEMV_MAX_M rows, and
the experts of an MoE layer that gets <= MOE_GEMV_MAX_T tokens, are not quantized: y = x @ (q_w * s_w)^T),
only faster:

  what                     eager on CUDA                         under torch.compile on CUDA        CPU / fallback
  activation quantization  one Triton kernel (per token, per     plain torch ops (inductor fuses    plain torch ops
                           tensor = amax + kernel, 1x128 groups;  them with their neighbours); per
                           MoE: gather + act(gate)*up fused in;   token silu(gate)*up and gathered
                           fused gate|up MLPs: silu(gate)*up)     MoE rows: the Triton kernel as a
                                                                  custom op (one pass)
  fp8_per_channel/tensor   torch._scaled_mm rowwise, bias and bf16 output in the GEMM, fast accumulation  dequantize + matmul
  fp8_per_block Linear     F.scaled_mm BlockWise1x128 x BlockWise128x128 when this torch/GPU accepts
                           it (self-test once per device), else the Triton blockwise GEMM             dequantize + matmul
  MoE per-channel/tensor   sort by expert, the Triton grouped GEMM for gate_up and down (TMA loads on Hopper
                           for groups of prefill size; without Triton:
                           torch._scaled_grouped_mm), routing weight folded into the down GEMM's row
                           scales, combine by index_copy + sum                                         per-expert loop
  MoE per-block            the same with block scales in the Triton grouped GEMM
  Linear, <= GEMV_MAX_M    (decode) no activation quantization: the Triton GEMM widens the FP8 weight    dequantize + matmul
  rows (16)                in registers (W8A16), one kernel (one row: CUDA cores; more: tensor cores);
                           a custom op under compile
  MoE, <= MOE_GEMV_MAX_T   (decode) W8A16 too: one CUDA-core gemv row per (token, expert) pair, the      per-expert loop
  tokens (8)               expert's weight by id, two kernels (act(gate) * up and routing weight fused
                           into the second), a custom op under compile

Capabilities are probed once per device (tiny self-tests against the reference, cached); the probe is
marked as a constant for dynamo, so compiling a model before any eager call still picks the fast
paths and never graph-breaks. FP8STREAM_KERNELS=reference forces the reference path (debugging,
benchmarks of the baseline); FP8STREAM_NO_TRITON=1 disables the Triton kernels.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .quantize import BLOCK, FP8_DTYPE, FP8_MAX, dequantize, dequantize_activation, quantize_activation, scale_from_amax

_TINY = torch.finfo(torch.float32).tiny


# ----------------------------------------------------------------------------------------- capabilities

class Caps(NamedTuple):
    scaled_mm: bool = False  # torch._scaled_mm rowwise (sm_89+)
    grouped: bool = False  # torch._scaled_grouped_mm rowwise (sm_90)
    blockwise: bool = False  # F.scaled_mm 1x128 x 128x128, any M
    triton_quant: bool = False
    triton_gemm: bool = False
    reference: bool = False  # FP8STREAM_KERNELS=reference
    torch_grouped: bool = False  # grouped GEMM as a static loop over experts in torch (CPU under compile, tests)
    triton_gemv: bool = False  # Triton W8A16 GEMM for inputs of <= GEMV_MAX_M rows (decode)
    triton_tma: bool = False  # the grouped GEMM's TMA kernel (Hopper, Triton with tensor descriptors), rowwise


_CAPS: dict[int, Caps] = {}
# Rowwise Linear with at most this many rows uses the Triton GEMM instead of torch._scaled_mm (default 0:
# never). For trying the Triton kernel at decode sizes; bench_infer's Linear table times both.
_TRITON_MAX_M = int(os.environ.get("FP8STREAM_TRITON_MAX_M", "0") or 0)
# Decode rule (every device, the reference path too): a Linear input of at most this many rows is not
# quantized; the FP8 weight is dequantized inside the GEMM (W8A16, one Triton kernel on CUDA). At decode
# sizes the time is the weight bytes and the launches, not the math: quantizing a few rows bought nothing
# and cost a kernel (bench/sweep_gemv.py), and the unquantized rows are more accurate.
# FP8STREAM_GEMV_MAX_M=0: W8A8 at every size.
GEMV_MAX_M = int(os.environ.get("FP8STREAM_GEMV_MAX_M", "16") or 0)
# The same rule for MoE experts, by the layer's token count: each (token, expert) pair is one gemv row that
# reads its expert's weight, so at 16 tokens (64-128 pairs) the grouped W8A8 GEMM, which reads each routed
# expert once, is faster again; at 1-8 tokens the pair kernels are 1.1-2.7x faster (bench/sweep_experts.py).
MOE_GEMV_MAX_T = min(GEMV_MAX_M, int(os.environ.get("FP8STREAM_MOE_GEMV_MAX_T", "8") or 0))
# Activation rows of at most this many columns (rounded up to a power of two) are quantized in one pass, the whole
# row held in registers (16 warps for 8192-16384): x is read once instead of twice (the second time mostly from L2;
# H100: -15 % kernel time on 14336-wide rows, none on 4096-wide ones). 0: always the two-pass loop.
QUANT_ONE_PASS_MAX_K = int(os.environ.get("FP8STREAM_QUANT_ONE_PASS_MAX_K", "16384") or 0)
# cuBLAS FP8 GEMMs (torch._scaled_mm, torch._scaled_grouped_mm) accumulate in the tensor cores' own accumulator
# instead of promoting partial sums to fp32 every few k-steps: 10-19 % faster at 4096 rows on the H100 (Llama-8B
# and Qwen1.5-MoE shapes, bench/results/h100-2026-11-27/gemm_ab.json), as FP8 inference GEMMs commonly do (CUTLASS's
# FP8FastAccum kernel schedules); Triton's fp8 tl.dot already accumulates this way on sm_90 (its default
# max_num_imprecise_acc), so every fast path now does the same. The extra error is far below the FP8 rounding of the inputs
# (test_cuda_fast_accumulation_error_is_small). FP8STREAM_FAST_ACCUM=0: promote to fp32 (cuBLAS's default).
FAST_ACCUM = os.environ.get("FP8STREAM_FAST_ACCUM", "1") != "0"
PROBE_LOG: dict[int, dict[str, str]] = {}  # device index -> what each probe said (for reports / debugging)
_TK = None


def triton_kernels():
    """The Triton kernel module, or None (no Triton, FP8STREAM_NO_TRITON set, or it failed to import)."""
    global _TK
    if _TK is None:
        if os.environ.get("FP8STREAM_NO_TRITON", "") not in ("", "0"):
            _TK = False
        else:
            try:
                from . import _triton_kernels

                _TK = _triton_kernels
            except Exception:  # noqa: BLE001 - no triton, or a broken install: the torch paths remain
                _TK = False
    return _TK or None


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
                             use_fast_accum=FAST_ACCUM)
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
                                     out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)
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


# ----------------------------------------------------------------------------------------- torch pieces

def _ref_mm(qx, sx, qw, sw, scheme) -> torch.Tensor:
    """float64 reference product of dequantized operands (used by the probes)."""
    a = dequantize_activation(qx.float(), sx.unsqueeze(-1) if sx.dim() == 1 else sx, scheme).double()
    return a @ dequantize(qw, sw, scheme).double().t()


def _deq(q, s, mode):
    if mode == "group":
        return dequantize_activation(q, s, "fp8_per_block")
    return q.float() * s.reshape(-1, 1)


def _col_major(s: torch.Tensor) -> torch.Tensor:
    return s.t().contiguous().t()


def _quant_torch(x: torch.Tensor, mode: str, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference / compiled activation quantization of [M, K]: 'row' (per token; `amax` [M] given or
    computed), 'tensor' (one scale for all rows) or 'group' (1x128). Scales: [M] for row/tensor,
    [M, ceil(K/128)] for group. Same arithmetic as the Triton kernels and quantize_activation."""
    if mode == "group":
        return quantize_activation(x, "fp8_per_block")
    x32 = x.float()
    if amax is None:
        amax = x32.abs().amax() if mode == "tensor" else x32.abs().amax(dim=-1)
    # repeat, not expand: a [1] tensor expanded from a scalar keeps stride 0, which _scaled_mm rejects
    scale = scale_from_amax(amax).reshape(1).repeat(x.shape[0]) if amax.dim() == 0 else scale_from_amax(amax)
    return (x32 / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _blockwise_scaled_mm(qx, sx_col, qw, sw, out_dtype):
    """F.scaled_mm 1x128 x 128x128. sx_col [M, K/128] column-major; sw [N/128, K/128] -> the [L4, N/128]
    column-major layout cuBLAS wants (L4 = K/128 rounded up to 4; a view of sw when K/128 % 4 == 0)."""
    g = sw.shape[-1]
    l4 = -(-g // 4) * 4
    sw_t = (F.pad(sw, (0, l4 - g)) if l4 != g else sw).t()
    return F.scaled_mm(qx, qw.t(), sx_col, F.ScalingType.BlockWise1x128, sw_t, F.ScalingType.BlockWise128x128,
                       swizzle_a=F.SwizzleType.NO_SWIZZLE, swizzle_b=F.SwizzleType.NO_SWIZZLE, output_dtype=out_dtype)


def _group_bounds(sorted_ids: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[start, end) of every group in rows sorted by group id, int32, on the device, no host sync."""
    r = torch.arange(num_groups, device=sorted_ids.device, dtype=sorted_ids.dtype)
    starts = torch.searchsorted(sorted_ids, r, right=False, out_int32=True)
    ends = torch.searchsorted(sorted_ids, r, right=True, out_int32=True)
    return starts, ends


# ----------------------------------------------------------------------------------------- Triton launchers

def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def quant_triton(x: torch.Tensor, mode: str, *, idx: torch.Tensor | None = None, act: bool = False,
                 amax: torch.Tensor | None = None, row_weight: torch.Tensor | None = None,
                 col_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One-kernel activation quantization of x [rows, K] (or of x[idx]; with act, of silu(x[:, :K]) * x[:, K:]).

    mode 'row': scales [M] (amax [M] may be given: its stride may be 0 for one shared amax);
    'tensor': amax of all rows first (one reduction), then the row kernel; 'group': 1x128 groups,
    scales [M, ceil(K/128)] (column-major storage with col_major). row_weight multiplies the stored
    row scales (not the quantization), for folding MoE routing weights into the next GEMM.
    """
    tk = triton_kernels()
    if x.stride(-1) != 1:
        x = x.contiguous()
    k = x.shape[1] // 2 if act else x.shape[1]
    m = idx.shape[0] if idx is not None else x.shape[0]
    q = torch.empty(m, k, device=x.device, dtype=FP8_DTYPE)
    if mode == "group":
        g = -(-k // BLOCK)
        s = torch.empty(g, m, device=x.device).t() if col_major else torch.empty(m, g, device=x.device)
        if m:
            block_g = min(8, _pow2(g))
            tk.quant_groups_kernel[(m, -(-g // block_g))](
                x, idx if idx is not None else x, q, s, k, g, x.stride(0), q.stride(0), s.stride(0), s.stride(1), k,
                HAS_IDX=idx is not None, ACT=act, GROUP=BLOCK, BLOCK_G=block_g, num_warps=4)
        return q, s
    if mode == "tensor" and amax is None:
        if act:
            raise ValueError("per-tensor with act: compute the activation first")
        amax = torch.linalg.vector_norm(x if idx is None else x[idx], float("inf")).float().reshape(1)
        amax_stride = 0
    elif amax is not None:
        amax_stride = amax.stride(0) if amax.dim() else 0
    else:
        amax_stride = 0
    s = torch.empty(m, device=x.device)
    if m:
        # rows up to QUANT_ONE_PASS_MAX_K stay in registers: one read of x (the two-pass loop reads each row twice)
        one_pass = _pow2(k) <= QUANT_ONE_PASS_MAX_K
        block_k = _pow2(k) if one_pass else min(4096, _pow2(k))
        tk.quant_rows_kernel[(m,)](
            x, idx if idx is not None else x, amax if amax is not None else x,
            row_weight if row_weight is not None else x, q, s, k, x.stride(0), q.stride(0), amax_stride, k,
            HAS_IDX=idx is not None, GIVEN_AMAX=amax is not None, ACT=act, HAS_RW=row_weight is not None,
            BLOCK_K=block_k, ONE_PASS=one_pass, num_warps=16 if block_k >= 8192 else 8 if block_k >= 2048 else 4)
    return q, s


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
                 config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    tk = triton_kernels()
    rows, k = a.shape
    grouped = b.dim() == 3
    e = b.shape[0] if grouped else 1
    n = b.shape[-2]
    if (config is None and grouped and not blockwise and rows > 64 * min(e, rows) and b.is_contiguous()
            and a.is_contiguous() and a.is_cuda and caps(a.device).triton_tma):
        return _launch_gemm_tma(a, a_scale, b, b_scale, bias, starts, ends, out_dtype, _TMA_CONFIG)
    out = torch.empty(rows, n, device=a.device, dtype=out_dtype)
    if rows == 0:
        return out
    bm, bn, bk, warps, stages = config or _gemm_config(rows, e, n, _sm_count(a.device), blockwise)
    starts, ends, tile_end, grid_m = _row_tiles(starts, ends, rows, e, bm, grouped, a_scale)
    if blockwise:
        sa_m, sa_k = a_scale.stride(0), a_scale.stride(1)
        sb = b_scale if grouped else b_scale.unsqueeze(0)
    else:
        sa_m, sa_k = a_scale.stride(0), 0
        sb = (b_scale if grouped else b_scale.unsqueeze(0)).unsqueeze(-1)
    bb = b if grouped else b.unsqueeze(0)
    tk.fp8_gemm_kernel[(grid_m, -(-n // bn))](
        a, a_scale, bb, sb, out, bias if bias is not None else out, starts, ends, tile_end,
        rows, n, k, e,
        a.stride(0), sa_m, sa_k,
        bb.stride(0), bb.stride(1), bb.stride(2),
        sb.stride(0), sb.stride(1), sb.stride(2),
        out.stride(0),
        GROUPED=grouped, BLOCKWISE=blockwise, HAS_BIAS=bias is not None,
        BM=bm, BN=bn, BK=bk, E_P2=_pow2(e), num_warps=warps, num_stages=stages)
    return out


def _row_tiles(starts, ends, rows: int, e: int, bm: int, grouped: bool, unused: torch.Tensor):
    """(starts, ends, tile_end, grid rows) for the GEMM kernels' row tiles: grouped, tile_end is the inclusive cumsum of
    each group's ceil(rows / bm) (on the device, no sync) and the grid an upper bound (+1 tile per group); dense, the
    group tensors are unused placeholders."""
    if not grouped:
        return unused, unused, unused, -(-rows // bm)
    tiles = torch.div(ends - starts + (bm - 1), bm, rounding_mode="floor")
    return starts, ends, torch.cumsum(tiles, 0, dtype=torch.int32), -(-rows // bm) + e


# Grouped rowwise GEMMs of prefill size (groups average > 64 rows) on Hopper: the TMA kernel with 128 x 256 x 128
# tiles, 8 warps, 4 stages, the best of 16 configs on the four Qwen1.5-MoE expert GEMMs at 4096 and 16384 tokens,
# 13-27 % faster than the pointer-load kernel's tuned default (H100, bench/sweep_grouped.py --tma).
_TMA_CONFIG = (128, 256, 128, 8, 4)


def _launch_gemm_tma(a, a_scale, b, b_scale, bias, starts, ends, out_dtype,
                     config: tuple[int, int, int, int, int]) -> torch.Tensor:
    """Rowwise fp8_gemm_tma_kernel (Hopper TMA loads); same contract as _launch_gemm without block scales; a and b
    contiguous (a descriptor needs 16-byte row strides: K % 16 == 0)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    tk = triton_kernels()
    rows, k = a.shape
    grouped = b.dim() == 3
    e = b.shape[0] if grouped else 1
    n = b.shape[-2]
    out = torch.empty(rows, n, device=a.device, dtype=out_dtype)
    if rows == 0:
        return out
    bm, bn, bk, warps, stages = config
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(b.reshape(e * n, k), [bn, bk])
    starts, ends, tile_end, grid_m = _row_tiles(starts, ends, rows, e, bm, grouped, a_scale)
    sb = b_scale if grouped else b_scale.unsqueeze(0)
    tk.fp8_gemm_tma_kernel[(grid_m, -(-n // bn))](
        a_desc, a_scale, b_desc, sb, out, bias if bias is not None else out, starts, ends, tile_end,
        rows, n, k, e, a_scale.stride(0), sb.stride(0), sb.stride(1), out.stride(0),
        GROUPED=grouped, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, E_P2=_pow2(e),
        num_warps=warps, num_stages=stages)
    return out


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# fp8stream's operators for torch.compile (opaque to inductor, no graph break), defined with torch.library.Library
# rather than torch.library.custom_op: a custom_op call passes through Python autograd and aliasing-check layers that
# cost ~25-40 µs of host time per call on the H100 machines, and a compiled MoE prefill there is host-bound (five such
# calls per Qwen1.5-MoE layer; bench/profile_prefill.py's host column). Forward only (inference): no autograd formula.
_LIB = torch.library.Library("fp8stream", "DEF")


def _op(name: str):
    def define(fn):
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))
        for key in ("CPU", "CUDA"):
            _LIB.impl(name, fn, key)
        return getattr(torch.ops.fp8stream, name).default
    return define


def _fake(name: str):
    return torch.library.register_fake(f"fp8stream::{name}", lib=_LIB)


@_op("fp8_gemm")
def _fp8_gemm_op(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 bias: torch.Tensor | None, starts: torch.Tensor, ends: torch.Tensor, blockwise: bool,
                 out_dtype: str) -> torch.Tensor:
    return _launch_gemm(a, a_scale, b, b_scale, bias, starts, ends, blockwise, _DTYPES[out_dtype])


@_fake("fp8_gemm")
def _(a, a_scale, b, b_scale, bias, starts, ends, blockwise, out_dtype):
    return a.new_empty(a.shape[0], b.shape[-2], dtype=_DTYPES[out_dtype])


def _weight_for_probe(w: torch.Tensor, scheme: str):
    from .quantize import quantize_blocks

    if scheme == "fp8_per_block":
        return quantize_blocks(w)
    q, s = quantize_activation(w, scheme)
    return q, s.view(-1)


def _gemv_config(n: int, blockwise: bool) -> tuple[int, int, int, int]:
    """BN, BK, num_warps, num_stages: the fastest in bench/sweep_gemv.py at M = 1 and 16 on the Llama-8B and
    Qwen1.5-MoE shapes (H200, L2-cold weights); BK is 128 for block scales (one scale per K step)."""
    if blockwise:
        return 32, 128, 4, 3
    return 32, 256 if n >= 8192 else 512, 4, 3


def _launch_gemv(x, w, w_scale, bias, scheme: str, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    tk = triton_kernels()
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    blockwise = scheme == "fp8_per_block"
    bn, bk, warps, stages = config or _gemv_config(n, blockwise)
    ws = w_scale if blockwise else w_scale.view(-1, 1)
    tk.fp8_gemv_kernel[(-(-n // bn),)](
        x, w, ws, bias if bias is not None else out, out, m, n, k,
        x.stride(0), w.stride(0), ws.stride(0), ws.stride(1), out.stride(0),
        BLOCKWISE=blockwise, HAS_BIAS=bias is not None, BM=max(16, _pow2(m)), BN=bn, BK=bk,
        num_warps=warps, num_stages=stages)
    return out


def _gemv1_config(n: int, k: int) -> tuple[int, int, int, int]:
    """BN, BK, num_warps, num_stages: near the fastest of 48 configs per shape in bench/sweep_gemv.py (H100,
    M = 1, L2-cold weights): 1.2-2x faster than the tensor-core kernel on the Llama-8B / Qwen1.5-MoE shapes."""
    return (8 if n >= 4096 and k <= 4096 else 4), (1024 if k >= 4096 else 512), 4, 3


def _launch_gemv1(x, w, w_scale, bias, scheme: str, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Batch-1 decode: x [1, K] (a contiguous row)."""
    tk = triton_kernels()
    n, k = w.shape
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)
    blockwise = scheme == "fp8_per_block"
    bn, bk, warps, stages = config or _gemv1_config(n, k)
    ws = w_scale if blockwise else w_scale.view(-1, 1)
    tk.fp8_gemv1_kernel[(-(-n // bn), 1)](
        x, x, x, w, ws, bias if bias is not None else out, out, n, k, 1, 0,
        0, 0, w.stride(0), 0, ws.stride(0), ws.stride(1), 0,
        EXPERTS=False, ACT=False, HAS_RW=False, BLOCKWISE=blockwise, HAS_BIAS=bias is not None, BN=bn, BK=bk,
        num_warps=warps, num_stages=stages)
    return out


def _pairs_config(k: int, pairs: int) -> tuple[int, int, int, int]:
    """BN, BK, num_warps, num_stages of the MoE decode kernel: near the fastest of 36 configs in
    bench/sweep_experts.py (H100, Qwen1.5-MoE and Qwen3-30B expert shapes, 1-16 tokens)."""
    if k <= 1024:
        return 16, 256, 4, 2
    if k < 2048:
        return 8, 512, 4, 3
    return (16 if pairs >= 16 else 4), 512, 4, 3


def _launch_pairs(x, expert_ids, rows_per_x: int, routing_weight, w, w_scale, scheme: str, act: bool,
                  out_dtype: torch.dtype, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """MoE decode (W8A16): out[p] = a(x[p // rows_per_x]) @ dequantize(w[expert_ids[p]])^T (* routing_weight[p]),
    with a = act(gate) * up of the row's two halves when act, else the row. w [E, N, K] fp8."""
    tk = triton_kernels()
    _, n, k = w.shape
    pairs = expert_ids.shape[0]
    out = torch.empty(pairs, n, device=x.device, dtype=out_dtype)
    if pairs == 0:
        return out
    blockwise = scheme == "fp8_per_block"
    bn, bk, warps, stages = config or _pairs_config(k, pairs)
    ws = w_scale if blockwise else w_scale.unsqueeze(-1)
    tk.fp8_gemv1_kernel[(-(-n // bn), pairs)](
        x, expert_ids, routing_weight if routing_weight is not None else out, w, ws, out, out, n, k, rows_per_x,
        k if act else 0, x.stride(0), w.stride(0), w.stride(1), ws.stride(0), ws.stride(1), ws.stride(2), out.stride(0),
        EXPERTS=True, ACT=act, HAS_RW=routing_weight is not None, BLOCKWISE=blockwise, HAS_BIAS=False, BN=bn, BK=bk,
        num_warps=warps, num_stages=stages)
    return out


@_op("fp8_moe_gemv")
def _fp8_moe_gemv_op(x: torch.Tensor, expert_ids: torch.Tensor, rows_per_x: int, routing_weight: torch.Tensor | None,
                     w: torch.Tensor, w_scale: torch.Tensor, scheme: str, act: bool, out_dtype: str) -> torch.Tensor:
    return _launch_pairs(x, expert_ids, rows_per_x, routing_weight, w, w_scale, scheme, act, _DTYPES[out_dtype])


@_fake("fp8_moe_gemv")
def _(x, expert_ids, rows_per_x, routing_weight, w, w_scale, scheme, act, out_dtype):
    return x.new_empty(expert_ids.shape[0], w.shape[1], dtype=_DTYPES[out_dtype])


def expert_pairs_gemv(x, expert_ids, rows_per_x: int, routing_weight, w, w_scale, scheme: str, act: bool,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """See _launch_pairs; a custom op under torch.compile."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if torch.compiler.is_compiling():
        return _fp8_moe_gemv_op(x, expert_ids, rows_per_x, routing_weight, w, w_scale, scheme, act,
                                str(out_dtype).split(".")[-1])
    return _launch_pairs(x, expert_ids, rows_per_x, routing_weight, w, w_scale, scheme, act, out_dtype)


def _gemv_any(x, w, w_scale, bias, scheme: str) -> torch.Tensor:
    if x.shape[0] == 1:
        return _launch_gemv1(x, w, w_scale, bias, scheme)
    return _launch_gemv(x, w, w_scale, bias, scheme)


@_op("fp8_gemv")
def _fp8_gemv_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 scheme: str) -> torch.Tensor:
    return _gemv_any(x, w, w_scale, bias, scheme)


@_fake("fp8_gemv")
def _(x, w, w_scale, bias, scheme):
    return x.new_empty(x.shape[0], w.shape[0])


def gemv(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, scheme: str) -> torch.Tensor:
    """FP8-weight Linear for a few rows in one kernel (W8A16): x [M, K] @ dequantize(w, w_scale)^T (+ bias), in
    x's dtype. w [N, K] fp8; scales rowwise [N], or blockwise [N/128, K/128]. One row: the CUDA-core
    kernel (small tiles, every SM busy); 2..16 rows: the tensor-core kernel."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if torch.compiler.is_compiling():
        return _fp8_gemv_op(x, w, w_scale, bias, scheme)
    return _gemv_any(x, w, w_scale, bias, scheme)


def grouped_gemm(a, a_scale, b, b_scale, starts, ends, blockwise: bool, out_dtype, bias=None) -> torch.Tensor:
    """Triton FP8 GEMM. Dense: b [N, K]; grouped: b [E, N, K], rows of `a` sorted by group, [starts, ends).
    Scales: rowwise a_scale [M], b_scale [(E,) N]; blockwise a_scale [M, K/128] (any strides),
    b_scale [(E,) N/128, K/128]. Called through a custom op under torch.compile (opaque, no graph break)."""
    if torch.compiler.is_compiling():
        dummy = a_scale if starts is None else None
        return _fp8_gemm_op(a, a_scale, b, b_scale, bias, starts if starts is not None else dummy,
                            ends if ends is not None else dummy, blockwise, str(out_dtype).split(".")[-1])
    return _launch_gemm(a, a_scale, b, b_scale, bias, starts, ends, blockwise, out_dtype)


# ----------------------------------------------------------------------------------------- Linear

def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of [..., 2I] = gate | up, rounded as the model code rounds it (each op in the input dtype)."""
    i = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :i]) * gate_up[..., i:]


def reference_linear(x2, weight, weight_scale, bias, scheme, decode_rule: bool = True, act: bool = False) -> torch.Tensor:
    """Dequantize both operands and multiply in float32 (CPU, and CUDA shapes no kernel takes); with
    decode_rule, inputs of at most GEMV_MAX_M rows are not quantized (see GEMV_MAX_M; MoE experts,
    whose fast path is a grouped W8A8 GEMM at every size, pass False). With act, x2 is [M, 2K] = gate | up
    and the input is silu_mul(x2)."""
    if act:
        x2 = silu_mul(x2)
    if decode_rule and x2.shape[0] <= GEMV_MAX_M:
        return _w8a16(x2, weight, weight_scale, bias, scheme)
    qx, sx = quantize_activation(x2, scheme)
    y = dequantize_activation(qx, sx, scheme) @ dequantize(weight, weight_scale, scheme).t()
    if bias is not None:
        y = y + bias.float()
    return y


def _w8a16(x2, weight, weight_scale, bias, scheme) -> torch.Tensor:
    y = x2.float() @ dequantize(weight, weight_scale, scheme).t()
    return y + bias.float() if bias is not None else y


@_op("quant_rows")
def _quant_rows_op(x: torch.Tensor, idx: torch.Tensor | None, act: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_triton(x, "row", idx=idx, act=act)


@_fake("quant_rows")
def _(x, idx, act):
    m, k = (idx.shape[0] if idx is not None else x.shape[0]), (x.shape[1] // 2 if act else x.shape[1])
    return x.new_empty(m, k, dtype=FP8_DTYPE), x.new_empty(m, dtype=torch.float32)


# Under torch.compile, the per-token quantization of silu(gate) * up (fused gate/up MLPs, MoE experts) and of the
# routed rows gathered by token (MoE experts) runs fp8stream's one-pass Triton kernel as an opaque op instead of the
# reduction inductor generates, which reads each row twice (H200, 4096 tokens: 0.16 -> 0.09 ms per Llama-8B MLP,
# bench/profile_prefill.py). FP8STREAM_COMPILED_ROW_QUANT=inductor: leave them to inductor.
_COMPILED_ROW_QUANT = os.environ.get("FP8STREAM_COMPILED_ROW_QUANT", "triton")


def _rows_op(c: Caps) -> bool:
    return c.triton_quant and _COMPILED_ROW_QUANT == "triton" and torch.compiler.is_compiling()


def _act_quant(x2: torch.Tensor, mode: str, c: Caps, col_major: bool = False, act: bool = False):
    """Activation quantization of x2 (with act: of silu_mul(x2), fused into the kernel where one exists)."""
    if c.triton_quant and not torch.compiler.is_compiling():
        return quant_triton(x2, mode, col_major=col_major, act=act)
    if act and mode == "row" and _rows_op(c):
        return _quant_rows_op(x2, None, True)
    q, s = _quant_torch(silu_mul(x2) if act else x2, mode)
    return q, (_col_major(s) if col_major else s)


def linear_cuda(x2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                scheme: str, decode_rule: bool = True, act: bool = False) -> torch.Tensor | None:
    """Fast FP8 Linear on CUDA: [M, K] -> [M, N] in x's dtype, or None when no fast path applies. With act,
    x2 is [M, 2K] = gate | up and the Linear's input is silu_mul(x2) (fused into the quantization)."""
    return linear_fast(x2, weight, weight_scale, bias, scheme, caps(x2.device), decode_rule, act)


def linear_fast(x2, weight, weight_scale, bias, scheme: str, c: Caps, decode_rule: bool = True,
                act: bool = False) -> torch.Tensor | None:
    n, k = weight.shape
    if c.reference or n % 16 or k % 16:
        return None
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if act and (scheme == "fp8_per_tensor" or (decode_rule and x2.shape[0] <= GEMV_MAX_M)):
        x2, act = silu_mul(x2), False  # per-tensor: the amax of all rows comes first; decode: W8A16 takes it as is
    if decode_rule and x2.shape[0] <= GEMV_MAX_M:  # the decode rule: W8A16 (without Triton: the reference path)
        if not c.triton_gemv:
            return None
        if bias is not None and bias.dtype != x2.dtype:
            return gemv(x2, weight, weight_scale, None, scheme) + bias
        return gemv(x2, weight, weight_scale, bias, scheme)
    if scheme == "fp8_per_block":
        if c.blockwise and n % BLOCK == 0 and k % BLOCK == 0:
            qx, sx = _act_quant(x2, "group", c, col_major=True, act=act)
            y = _blockwise_scaled_mm(qx, sx, weight, weight_scale, torch.bfloat16)
            if bias is not None:
                y = y + bias
            return y.to(x2.dtype)
        if c.triton_gemm:
            qx, sx = _act_quant(x2, "group", c, act=act)
            out_dtype = x2.dtype if x2.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
            return grouped_gemm(qx, sx, weight, weight_scale, None, None, True, out_dtype, bias=bias).to(x2.dtype)
        return None
    if c.triton_gemm and x2.shape[0] <= _TRITON_MAX_M:  # opt-in (FP8STREAM_TRITON_MAX_M): Triton GEMM at small M
        qx, sx = _act_quant(x2, "row" if scheme == "fp8_per_channel" else "tensor", c, act=act)
        out_dtype = x2.dtype if x2.dtype in _DTYPES.values() else torch.bfloat16
        return grouped_gemm(qx, sx, weight, weight_scale, None, None, False, out_dtype, bias=bias).to(x2.dtype)
    if not c.scaled_mm:
        return None
    qx, sx = _act_quant(x2, "row" if scheme == "fp8_per_channel" else "tensor", c, act=act)
    # Rowwise-scaled FP8 GEMM only produces bf16; other model dtypes are cast afterwards.
    fused_bias = bias if bias is not None and bias.dtype == torch.bfloat16 else None
    y = torch._scaled_mm(qx, weight.t(), scale_a=sx.view(-1, 1), scale_b=weight_scale.view(1, n), bias=fused_bias,
                         out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)
    if bias is not None and fused_bias is None:
        y = y + bias
    return y if x2.dtype == torch.bfloat16 else y.to(x2.dtype)


# ----------------------------------------------------------------------------------------- MoE experts

def experts_cuda(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 w1: torch.Tensor, s1: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                 act_fn, scheme: str) -> torch.Tensor | None:
    return experts_fast(x, top_k_index, top_k_weights, w1, s1, w2, s2, act_fn, scheme, caps(x.device))


def experts_fast(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 w1: torch.Tensor, s1: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                 act_fn, scheme: str, c: Caps) -> torch.Tensor | None:
    """Grouped FP8 MoE experts on CUDA: x [T, H] -> [T, H], or None when no fast path applies.

    Route: sort the T*k (token, expert) pairs by expert; group bounds by searchsorted (no host sync);
    gate_up = one grouped GEMM over the gathered, quantized rows; act(gate) * up fused with the
    quantization of the down GEMM's input; the routing weight is folded into that input's row scales
    (rowwise schemes); down = one grouped GEMM; rows go back to (token, slot) order and are summed.
    """
    e, two_i, h = w1.shape
    inter = two_i // 2
    if c.reference or h % 16 or inter % 16:
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    t, topk = top_k_index.shape
    if t <= MOE_GEMV_MAX_T:  # the decode rule, by the layer's token count
        return _experts_decode(x, top_k_index, top_k_weights, w1, s1, w2, s2, act_fn, scheme, c)
    block = scheme == "fp8_per_block"
    if not (c.triton_gemm or c.torch_grouped or (c.grouped and not block)):
        return None
    ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(ids)
    token_of = torch.div(perm, topk, rounding_mode="floor")
    rw = top_k_weights.reshape(-1)[perm]
    starts, ends = _group_bounds(sorted_ids, e)
    eager_triton = c.triton_quant and not torch.compiler.is_compiling()
    silu = is_silu(act_fn)

    # --- gather + quantize the routed rows
    if block:
        if eager_triton:
            qx, sx = quant_triton(x, "group", idx=token_of)
        else:
            qx, sx = _quant_torch(x[token_of], "group")
    elif scheme == "fp8_per_tensor":  # one scale per GEMM input of each expert (as the per-expert reference)
        amax_rows = _segment_amax(torch.linalg.vector_norm(x, float("inf"), dim=-1).float()[token_of], sorted_ids, e)
        if eager_triton:
            qx, sx = quant_triton(x, "row", idx=token_of, amax=amax_rows)
        else:
            qx, sx = _quant_torch(x[token_of], "row", amax=amax_rows)
    elif eager_triton:
        qx, sx = quant_triton(x, "row", idx=token_of)
    elif _rows_op(c):
        qx, sx = _quant_rows_op(x, token_of, False)
    else:
        qx, sx = _quant_torch(x[token_of], "row")

    # _scaled_grouped_mm writes bf16 only; the Triton / torch GEMMs write the model dtype
    use_scaled = c.grouped and not block and not c.torch_grouped and not c.triton_gemm
    out_dtype = torch.bfloat16 if use_scaled or x.dtype not in _DTYPES.values() else x.dtype
    gate_up = _grouped(qx, sx, w1, s1, starts, ends, block, c, out_dtype)

    # --- act(gate) * up, quantized for the down GEMM (routing weight folded into rowwise scales)
    if block:
        if eager_triton and silu:
            qh, sh = quant_triton(gate_up, "group", act=True)
        else:
            hmid = _act_mul(gate_up, act_fn, inter)
            qh, sh = quant_triton(hmid, "group") if eager_triton else _quant_torch(hmid, "group")
        y = _grouped(qh, sh, w2, s2, starts, ends, True, c, out_dtype)
        y = y * rw.unsqueeze(-1).to(y.dtype)
    else:
        rw32 = rw.float()
        if scheme == "fp8_per_tensor":
            hmid = _act_mul(gate_up, act_fn, inter)
            amax_rows = _segment_amax(torch.linalg.vector_norm(hmid, float("inf"), dim=-1).float(), sorted_ids, e)
            if eager_triton:
                qh, sh = quant_triton(hmid, "row", amax=amax_rows, row_weight=rw32)
            else:
                qh, sh = _quant_torch(hmid, "row", amax=amax_rows)
                sh = sh * rw32
        elif eager_triton and silu:
            qh, sh = quant_triton(gate_up, "row", act=True, row_weight=rw32)
        elif silu and _rows_op(c):
            qh, sh = _quant_rows_op(gate_up, None, True)
            sh = sh * rw32
        else:
            hmid = _act_mul(gate_up, act_fn, inter)
            if eager_triton:
                qh, sh = quant_triton(hmid, "row", row_weight=rw32)
            else:
                qh, sh = _quant_torch(hmid, "row")
                sh = sh * rw32
        y = _grouped(qh, sh, w2, s2, starts, ends, False, c, out_dtype)

    # --- back to (token, slot) order, sum the k slots in float32
    unsorted = torch.empty_like(y).index_copy_(0, perm, y)
    return unsorted.view(t, topk, h).sum(dim=1, dtype=torch.float32).to(x.dtype)


def _experts_decode(x, top_k_index, top_k_weights, w1, s1, w2, s2, act_fn, scheme: str, c: Caps) -> torch.Tensor | None:
    """W8A16 experts for a few tokens: no sort and no activation quantization; each (token, expert) pair is one
    row of a gemv over its expert's weight (Triton on CUDA: two kernels, act(gate) * up and the routing
    weight fused into the second), then the k pairs of each token are summed in float32."""
    t, topk = top_k_index.shape
    inter, h = w1.shape[1] // 2, w1.shape[2]
    ids = top_k_index.reshape(-1)
    rw = top_k_weights.reshape(-1).contiguous()
    out_dtype = x.dtype if x.dtype in _DTYPES.values() else torch.bfloat16
    if c.triton_gemv:
        gate_up = expert_pairs_gemv(x, ids, topk, None, w1, s1, scheme, False, out_dtype)
        if is_silu(act_fn):
            y = expert_pairs_gemv(gate_up, ids, 1, rw, w2, s2, scheme, True, torch.float32)
        else:
            y = expert_pairs_gemv(_act_mul(gate_up, act_fn, inter), ids, 1, rw, w2, s2, scheme, False, torch.float32)
    elif c.torch_grouped:
        token_of = torch.arange(t * topk, device=x.device) // topk
        gate_up = _pairs_torch(x.float()[token_of], ids, w1, s1, scheme).to(out_dtype)
        y = _pairs_torch(_act_mul(gate_up, act_fn, inter).float(), ids, w2, s2, scheme) * rw.float().unsqueeze(-1)
    else:
        return None
    return y.view(t, topk, h).sum(dim=1, dtype=torch.float32).to(x.dtype)


def _pairs_torch(a: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, scheme: str) -> torch.Tensor:
    """Row p of a [P, K] float32 times dequantize(w[ids[p]])^T: a static masked loop over the experts (CPU under
    compile, tests)."""
    out = a.new_zeros(a.shape[0], w.shape[-2])
    for g in range(w.shape[0]):
        out = out + torch.where((ids == g).unsqueeze(-1), a @ dequantize(w[g], ws[g], scheme).t(), 0.0)
    return out


def _grouped(q, s, w, ws, starts, ends, blockwise: bool, c: Caps, out_dtype):
    if c.torch_grouped:
        return _grouped_torch(q, s, w, ws, ends, blockwise).to(out_dtype)
    # torch._scaled_grouped_mm only without Triton: on the H100 it was slower than the Triton grouped GEMM on
    # 13 of 14 Qwen MoE expert GEMMs from 16 to 16384 tokens, up to 2.4x (bench/sweep_grouped.py)
    if not blockwise and c.grouped and not c.triton_gemm:
        return torch._scaled_grouped_mm(q, w.transpose(-2, -1), scale_a=s.reshape(-1), scale_b=ws, offs=ends,
                                        out_dtype=out_dtype, use_fast_accum=FAST_ACCUM)
    return grouped_gemm(q, s, w, ws, starts, ends, blockwise, out_dtype)


def _grouped_torch(q, s, w, ws, ends, blockwise: bool) -> torch.Tensor:
    """Grouped GEMM over rows sorted by group ([.., ends[g]) is group g) as _pairs_torch's static masked loop:
    no data-dependent shapes, so it traces without graph breaks; for the CPU under compile and tests."""
    scheme = "fp8_per_block" if blockwise else "fp8_per_channel"
    a = dequantize_activation(q, s if blockwise else s.reshape(-1, 1), scheme)
    group_of_row = torch.searchsorted(ends, torch.arange(q.shape[0], device=q.device, dtype=ends.dtype), right=True)
    return _pairs_torch(a, group_of_row, w, ws, scheme)


def _segment_amax(amax_rows: torch.Tensor, sorted_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Every row gets the amax of its group (rows sorted by group)."""
    g = torch.zeros(num_groups, device=amax_rows.device, dtype=amax_rows.dtype)
    g = g.scatter_reduce(0, sorted_ids, amax_rows, reduce="amax", include_self=True)
    return g[sorted_ids]


def _act_mul(gate_up: torch.Tensor, act_fn, inter: int) -> torch.Tensor:
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    return act_fn(gate) * up


def is_silu(act_fn) -> bool:
    if isinstance(act_fn, torch.nn.SiLU):
        return True
    name = type(act_fn).__name__.lower()
    return name in ("siluactivation", "silu") and not getattr(act_fn, "inplace", False)
