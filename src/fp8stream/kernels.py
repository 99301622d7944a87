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
                           scales, the down GEMM storing its rows in (token, slot) order, then a sum   per-expert loop
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

The code lives in four modules under this one (no import cycles, each builds on the ones before it):
_kernel_caps (Caps, the FP8STREAM_* settings, triton_kernels), _fp8_ops (torch pieces, Triton launchers, the
torch.ops.fp8stream custom ops), _kernel_probe (the probe, caps, prepare and the Triton GEMM that consults them) and
_moe_kernels (the MoE expert paths). This module holds the Linear paths and the *_cuda dispatchers and re-exports every
name of the former single-file module (__all__), so kernels.X keeps working; the settings are read at call time from
_kernel_caps, which is where a test or benchmark changes one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _kernel_caps
from ._kernel_caps import (Caps, FAST_ACCUM, GEMV_MAX_M, MOE_GEMV_MAX_T, QUANT_ONE_PASS_MAX_K, _COMPILED_ROW_QUANT,
                           _TINY, _TK, _TRITON_MAX_M, triton_kernels)
from ._fp8_ops import (_DTYPES, _LIB, _TMA_CONFIG, _blockwise_scaled_mm, _col_major, _deq, _fake, _fp8_gemv_op,
                       _fp8_moe_gemv_op, _gemv1_config, _gemv_any, _gemv_config, _group_bounds, _launch_gemm_tma,
                       _launch_gemv, _launch_gemv1, _launch_pairs, _op, _pairs_config, _pow2, _quant_rows_op,
                       _quant_torch, _ref_mm, _row_tiles, _rows_op, _w8a16, expert_pairs_gemv, gemv, quant_triton)
from ._kernel_probe import (PROBE_LOG, _CAPS, _CONSTANT_MARK, _SMS, _caps_tuple, _fp8_gemm_op, _gemm_config,
                            _launch_gemm, _probe, _probe_cached, _rel_err, _sm_count, _weight_for_probe, caps,
                            grouped_gemm, prepare)
from ._moe_kernels import (_act_mul, _experts_decode, _grouped, _grouped_torch, _pairs_torch, _segment_amax,
                           experts_fast, is_silu)
from .quantize import BLOCK, dequantize, dequantize_activation, quantize_activation

# Every name of the former single-file kernels.py, in its order (the private ones too: other modules, tests and
# bench scripts use them as kernels.X). The settings among them (GEMV_MAX_M, FAST_ACCUM, ...) are copies for
# reading (the code reads them from _kernel_caps at call time), as is _TK (triton_kernels() caches the module there).
__all__ = ["_TINY", "Caps", "_CAPS", "_TRITON_MAX_M", "GEMV_MAX_M", "MOE_GEMV_MAX_T", "QUANT_ONE_PASS_MAX_K",
           "FAST_ACCUM", "PROBE_LOG", "_TK", "triton_kernels", "_rel_err", "_probe", "_probe_cached", "_caps_tuple",
           "_CONSTANT_MARK", "caps", "prepare", "_ref_mm", "_deq", "_col_major", "_quant_torch", "_blockwise_scaled_mm",
           "_group_bounds", "_pow2", "quant_triton", "_SMS", "_sm_count", "_gemm_config", "_launch_gemm", "_row_tiles",
           "_TMA_CONFIG", "_launch_gemm_tma", "_DTYPES", "_LIB", "_op", "_fake", "_fp8_gemm_op", "_weight_for_probe",
           "_gemv_config", "_launch_gemv", "_gemv1_config", "_launch_gemv1", "_pairs_config", "_launch_pairs",
           "_fp8_moe_gemv_op", "expert_pairs_gemv", "_gemv_any", "_fp8_gemv_op", "gemv", "grouped_gemm", "silu_mul",
           "reference_linear", "_w8a16", "_quant_rows_op", "_COMPILED_ROW_QUANT", "_rows_op", "_act_quant",
           "linear_cuda", "linear_fast", "experts_cuda", "experts_fast", "_experts_decode", "_pairs_torch", "_grouped",
           "_grouped_torch", "_segment_amax", "_act_mul", "is_silu"]


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
    if decode_rule and x2.shape[0] <= _kernel_caps.GEMV_MAX_M:
        return _w8a16(x2, weight, weight_scale, bias, scheme)
    qx, sx = quantize_activation(x2, scheme)
    y = dequantize_activation(qx, sx, scheme) @ dequantize(weight, weight_scale, scheme).t()
    if bias is not None:
        y = y + bias.float()
    return y


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
    if act and (scheme == "fp8_per_tensor" or (decode_rule and x2.shape[0] <= _kernel_caps.GEMV_MAX_M)):
        x2, act = silu_mul(x2), False  # per-tensor: the amax of all rows comes first; decode: W8A16 takes it as is
    if decode_rule and x2.shape[0] <= _kernel_caps.GEMV_MAX_M:  # the decode rule: W8A16 (without Triton: the reference path)
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
    if c.triton_gemm and x2.shape[0] <= _kernel_caps._TRITON_MAX_M:  # opt-in (FP8STREAM_TRITON_MAX_M): Triton GEMM at small M
        qx, sx = _act_quant(x2, "row" if scheme == "fp8_per_channel" else "tensor", c, act=act)
        out_dtype = x2.dtype if x2.dtype in _DTYPES.values() else torch.bfloat16
        return grouped_gemm(qx, sx, weight, weight_scale, None, None, False, out_dtype, bias=bias).to(x2.dtype)
    if not c.scaled_mm:
        return None
    qx, sx = _act_quant(x2, "row" if scheme == "fp8_per_channel" else "tensor", c, act=act)
    # Rowwise-scaled FP8 GEMM only produces bf16; other model dtypes are cast afterwards.
    fused_bias = bias if bias is not None and bias.dtype == torch.bfloat16 else None
    y = torch._scaled_mm(qx, weight.t(), scale_a=sx.view(-1, 1), scale_b=weight_scale.view(1, n), bias=fused_bias,
                         out_dtype=torch.bfloat16, use_fast_accum=_kernel_caps.FAST_ACCUM)
    if bias is not None and fused_bias is None:
        y = y + bias
    return y if x2.dtype == torch.bfloat16 else y.to(x2.dtype)


# ----------------------------------------------------------------------------------------- MoE experts

def experts_cuda(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 w1: torch.Tensor, s1: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                 act_fn, scheme: str) -> torch.Tensor | None:
    return experts_fast(x, top_k_index, top_k_weights, w1, s1, w2, s2, act_fn, scheme, caps(x.device))
