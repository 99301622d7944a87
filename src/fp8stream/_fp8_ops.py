"""The torch pieces, Triton launchers and torch.compile custom ops of fp8stream's FP8 kernels (re-exported by
fp8stream.kernels): reference quantization and products (_quant_torch, _ref_mm, _w8a16, ...), the one-kernel activation
quantization (quant_triton), the TMA grouped GEMM, W8A16 gemv and MoE pair-gemv launchers, and the operator library
torch.ops.fp8stream with its fp8_gemv, fp8_moe_gemv and quant_rows ops (fp8_gemm is registered by _kernel_probe, next
to its launcher). Builds on _kernel_caps only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _kernel_caps
from ._kernel_caps import Caps, triton_kernels
from .quantize import BLOCK, FP8_DTYPE, FP8_MAX, dequantize, dequantize_activation, quantize_activation, scale_from_amax


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


def _w8a16(x2, weight, weight_scale, bias, scheme) -> torch.Tensor:
    y = x2.float() @ dequantize(weight, weight_scale, scheme).t()
    return y + bias.float() if bias is not None else y


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
        one_pass = _pow2(k) <= _kernel_caps.QUANT_ONE_PASS_MAX_K
        block_k = _pow2(k) if one_pass else min(4096, _pow2(k))
        tk.quant_rows_kernel[(m,)](
            x, idx if idx is not None else x, amax if amax is not None else x,
            row_weight if row_weight is not None else x, q, s, k, x.stride(0), q.stride(0), amax_stride, k,
            HAS_IDX=idx is not None, GIVEN_AMAX=amax is not None, ACT=act, HAS_RW=row_weight is not None,
            BLOCK_K=block_k, ONE_PASS=one_pass, num_warps=16 if block_k >= 8192 else 8 if block_k >= 2048 else 4)
    return q, s


def _row_tiles(starts, ends, rows: int, e: int, bm: int, grouped: bool, unused: torch.Tensor):
    """(starts, ends, grid rows) for the GEMM kernels' row tiles: grouped, the grid is an upper bound of the tiles
    (+1 per group; the kernel numbers them from the group bounds); dense, the group tensors are unused placeholders."""
    if not grouped:
        return unused, unused, -(-rows // bm)
    return starts, ends, -(-rows // bm) + e


# Grouped rowwise GEMMs of prefill size (groups average > 64 rows) on Hopper: the TMA kernel with 128 x 256 x 128
# tiles, 8 warps, 4 stages, the best of 16 configs on the four Qwen1.5-MoE expert GEMMs at 4096 and 16384 tokens,
# 13-27 % faster than the pointer-load kernel's tuned default (H100, bench/sweep_grouped.py --tma).
_TMA_CONFIG = (128, 256, 128, 8, 4)


def _launch_gemm_tma(a, a_scale, b, b_scale, bias, starts, ends, out_dtype,
                     config: tuple[int, int, int, int, int], out_rows: torch.Tensor | None = None) -> torch.Tensor:
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
    starts, ends, grid_m = _row_tiles(starts, ends, rows, e, bm, grouped, a_scale)
    sb = b_scale if grouped else b_scale.unsqueeze(0)
    tk.fp8_gemm_tma_kernel[(grid_m, -(-n // bn))](
        a_desc, a_scale, b_desc, sb, out, bias if bias is not None else out, starts, ends,
        out_rows if out_rows is not None else out, rows, n, k, e, a_scale.stride(0), sb.stride(0), sb.stride(1),
        out.stride(0), GROUPED=grouped, HAS_BIAS=bias is not None, SCATTER=out_rows is not None, BM=bm, BN=bn, BK=bk,
        E_P2=_pow2(e),
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


_GEMV_PROGRAMS = 256  # split-K target: about two programs per SM on an H100 (132 SMs)
_GEMV_MIN_STEPS = 4  # K steps (of BK) per split at least, so a split still streams a few stages deep


def _gemv_config(n: int, k: int, blockwise: bool) -> tuple[int, int, int, int, int]:
    """BN, BK, num_warps, num_stages, K splits of the 2-16-row kernel. BK 128 with 5 stages was the fastest of 36
    tile configs on 3 of the 4 Llama-8B Linear shapes at M = 8 and within 7 % on the fourth (H100, L2-cold weights;
    bench/sweep_gemv.py, BENCHMARKS.md); BK is 128 for block scales too (one scale per K step). Splits: enough
    (up to _kernel_caps.GEMV_SPLIT_K) for about _GEMV_PROGRAMS programs over N / BN column tiles; this rule lands
    within 0-5 % of each Llama-8B shape's best split count at M = 8 and cut a layer's Linears from 135 to 120 us
    (H100, BENCHMARKS.md "split-K")."""
    bn, bk = 32, 128
    tiles, steps = -(-n // bn), -(-k // bk)
    split = max(1, min(_kernel_caps.GEMV_SPLIT_K, -(-_GEMV_PROGRAMS // tiles), steps // _GEMV_MIN_STEPS))
    return bn, bk, 4, (3 if blockwise else 5), split


def _launch_gemv(x, w, w_scale, bias, scheme: str, config: tuple[int, ...] | None = None) -> torch.Tensor:
    tk = triton_kernels()
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    blockwise = scheme == "fp8_per_block"
    bn, bk, warps, stages, split = (*config, 1)[:5] if config else _gemv_config(n, k, blockwise)
    if blockwise and (bk != BLOCK or BLOCK % bn):
        raise ValueError(f"fp8_per_block gemv needs BK 128 and BN dividing 128 (one block scale per K step), got {config}")
    steps = -(-k // bk)
    k_per_split = -(-steps // max(1, min(split, steps))) * bk
    split = -(-k // k_per_split)  # no empty split
    ws = w_scale if blockwise else w_scale.view(-1, 1)
    has_bias = bias is not None
    target = out if split == 1 else torch.empty(split, m, n, device=x.device, dtype=torch.float32)
    tk.fp8_gemv_kernel[(-(-n // bn), split)](
        x, w, ws, bias if has_bias else out, target, m, n, k, k_per_split,
        x.stride(0), w.stride(0), ws.stride(0), ws.stride(1), out.stride(0),
        BLOCKWISE=blockwise, HAS_BIAS=has_bias, SPLIT=split > 1, BM=max(16, _pow2(m)), BN=bn, BK=bk,
        num_warps=warps, num_stages=stages)
    if split > 1:
        tk.gemv_reduce_kernel[(-(-n // 1024), m)](
            target, ws, bias if has_bias else out, out, m, n, split, ws.stride(0), out.stride(0),
            SCALE_ROWS=not blockwise, HAS_BIAS=has_bias, BLOCK=1024, num_warps=4)
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


@_op("quant_rows")
def _quant_rows_op(x: torch.Tensor, idx: torch.Tensor | None, act: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_triton(x, "row", idx=idx, act=act)


@_fake("quant_rows")
def _(x, idx, act):
    m, k = (idx.shape[0] if idx is not None else x.shape[0]), (x.shape[1] // 2 if act else x.shape[1])
    return x.new_empty(m, k, dtype=FP8_DTYPE), x.new_empty(m, dtype=torch.float32)


def _rows_op(c: Caps) -> bool:
    return c.triton_quant and _kernel_caps._COMPILED_ROW_QUANT == "triton" and torch.compiler.is_compiling()
