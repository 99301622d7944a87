"""The MoE expert paths of fp8stream's FP8 kernels (re-exported by fp8stream.kernels): experts_fast (sort by expert,
grouped W8A8 GEMMs, routing weight folded into the down GEMM's row scales), _experts_decode (W8A16 pair gemvs for a
few tokens), the torch fallbacks for CPU under compile and tests (_pairs_torch, _grouped_torch) and their helpers.
The device-probing dispatcher experts_cuda stays in fp8stream.kernels. Builds on _kernel_caps, _fp8_ops and
_kernel_probe.
"""

from __future__ import annotations

import torch

from . import _kernel_caps
from ._fp8_ops import _DTYPES, _group_bounds, _quant_rows_op, _quant_torch, _rows_op, expert_pairs_gemv, quant_triton
from ._kernel_caps import Caps
from ._kernel_probe import grouped_gemm
from .quantize import dequantize, dequantize_activation


# ----------------------------------------------------------------------------------------- MoE experts

def experts_fast(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 w1: torch.Tensor, s1: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                 act_fn, scheme: str, c: Caps) -> torch.Tensor | None:
    """Grouped FP8 MoE experts on CUDA: x [T, H] -> [T, H], or None when no fast path applies.

    Route: sort the T*k (token, expert) pairs by expert; group bounds by searchsorted (no host sync);
    gate_up = one grouped GEMM over the gathered, quantized rows; act(gate) * up fused with the
    quantization of the down GEMM's input; the routing weight is folded into that input's row scales
    (rowwise schemes); down = one grouped GEMM that stores its rows in (token, slot) order; the k slots
    of each token are summed.
    """
    e, two_i, h = w1.shape
    inter = two_i // 2
    if c.reference or h % 16 or inter % 16:
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    t, topk = top_k_index.shape
    if t <= _kernel_caps.MOE_GEMV_MAX_T:  # the decode rule, by the layer's token count
        return _experts_decode(x, top_k_index, top_k_weights, w1, s1, w2, s2, act_fn, scheme, c)
    block = scheme == "fp8_per_block"
    if not (c.triton_gemm or c.torch_grouped or (c.grouped and not block)):
        return None
    # Expert ids in the narrowest integer type that holds them: the radix sort of 16384 int64 keys made 8 passes
    # (0.05 ms of a Qwen1.5-MoE layer's 1.44 ms on the H100); of uint8 keys, one.
    ids = top_k_index.reshape(-1).to(torch.uint8 if e <= 256 else torch.int16 if e <= 2**15 else torch.int32)
    sorted_ids, perm = torch.sort(ids)
    token_of = torch.div(perm, topk, rounding_mode="floor")
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
        group_of_row = sorted_ids.long()  # an index, not a uint8 mask
        amax_rows = _segment_amax(torch.linalg.vector_norm(x, float("inf"), dim=-1).float()[token_of], group_of_row, e)
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
        y = _grouped(qh, sh, w2, s2, starts, ends, True, c, out_dtype, out_rows=perm)
        y = y * top_k_weights.reshape(-1, 1).to(y.dtype)  # y is in (token, slot) order already
    else:
        rw32 = top_k_weights.reshape(-1)[perm].float()
        if scheme == "fp8_per_tensor":
            hmid = _act_mul(gate_up, act_fn, inter)
            amax_rows = _segment_amax(torch.linalg.vector_norm(hmid, float("inf"), dim=-1).float(), group_of_row, e)
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
        y = _grouped(qh, sh, w2, s2, starts, ends, False, c, out_dtype, out_rows=perm)

    # --- y is back in (token, slot) order (the down GEMM stored row r as row perm[r]): sum the k slots in float32
    return y.view(t, topk, h).sum(dim=1, dtype=torch.float32).to(x.dtype)


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


def _grouped(q, s, w, ws, starts, ends, blockwise: bool, c: Caps, out_dtype, out_rows: torch.Tensor | None = None):
    """The grouped FP8 GEMM of rows sorted by group; with out_rows, product row r is output row out_rows[r] (the
    Triton kernels store it there; the other paths copy)."""
    if c.torch_grouped:
        y = _grouped_torch(q, s, w, ws, ends, blockwise).to(out_dtype)
    # torch._scaled_grouped_mm only without Triton: on the H100 it was slower than the Triton grouped GEMM on
    # 13 of 14 Qwen MoE expert GEMMs from 16 to 16384 tokens, up to 2.4x (bench/sweep_grouped.py)
    elif not blockwise and c.grouped and not c.triton_gemm:
        y = torch._scaled_grouped_mm(q, w.transpose(-2, -1), scale_a=s.reshape(-1), scale_b=ws, offs=ends,
                                     out_dtype=out_dtype, use_fast_accum=_kernel_caps.FAST_ACCUM)
    else:
        return grouped_gemm(q, s, w, ws, starts, ends, blockwise, out_dtype, out_rows=out_rows)
    return y if out_rows is None else torch.empty_like(y).index_copy_(0, out_rows, y)


def _grouped_torch(q, s, w, ws, ends, blockwise: bool) -> torch.Tensor:
    """Grouped GEMM over rows sorted by group ([.., ends[g]) is group g) as _pairs_torch's static masked loop:
    no data-dependent shapes, so it traces without graph breaks; for the CPU under compile and tests."""
    scheme = "fp8_per_block" if blockwise else "fp8_per_channel"
    a = dequantize_activation(q, s if blockwise else s.reshape(-1, 1), scheme)
    group_of_row = torch.searchsorted(ends, torch.arange(q.shape[0], device=q.device, dtype=ends.dtype), right=True)
    return _pairs_torch(a, group_of_row, w, ws, scheme)


def _segment_amax(amax_rows: torch.Tensor, group_of_row: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Every row gets the amax of its group (group_of_row: int64, rows sorted by group)."""
    g = torch.zeros(num_groups, device=amax_rows.device, dtype=amax_rows.dtype)
    g = g.scatter_reduce(0, group_of_row, amax_rows, reduce="amax", include_self=True)
    return g[group_of_row]


def _act_mul(gate_up: torch.Tensor, act_fn, inter: int) -> torch.Tensor:
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    return act_fn(gate) * up


def is_silu(act_fn) -> bool:
    if isinstance(act_fn, torch.nn.SiLU):
        return True
    name = type(act_fn).__name__.lower()
    return name in ("siluactivation", "silu") and not getattr(act_fn, "inplace", False)
