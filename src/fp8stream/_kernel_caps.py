"""Base of fp8stream's FP8 kernels (re-exported by fp8stream.kernels): the Caps tuple of fast paths a device may use,
the FP8STREAM_* settings read once at import (GEMV_MAX_M, MOE_GEMV_MAX_T, QUANT_ONE_PASS_MAX_K, FAST_ACCUM,
_TRITON_MAX_M, _COMPILED_ROW_QUANT) and triton_kernels(), the lazy import of the Triton kernel module. The settings
are defined here and nowhere else: the other kernel modules read them from this module at call time (fp8stream.kernels
holds copies for readers), so a test or benchmark that changes one at run time sets it here. Imports no other kernel
module.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

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


# Rowwise Linear with at most this many rows uses the Triton GEMM instead of torch._scaled_mm (default 0:
# never). For trying the Triton kernel at decode sizes; bench_infer's Linear table times both.
_TRITON_MAX_M = int(os.environ.get("FP8STREAM_TRITON_MAX_M", "0") or 0)
# Decode rule (every device, the reference path too): a Linear input of at most this many rows is not
# quantized; the FP8 weight is dequantized inside the GEMM (W8A16, one Triton kernel on CUDA). At decode
# sizes the time is the weight bytes and the launches, not the math: quantizing a few rows bought nothing
# and cost a kernel (bench/sweep_gemv.py), and the unquantized rows are more accurate.
# FP8STREAM_GEMV_MAX_M=0: W8A8 at every size.
GEMV_MAX_M = int(os.environ.get("FP8STREAM_GEMV_MAX_M", "16") or 0)
# The 2-16-row kernel splits K into at most this many ranges (one program each, float32 partials summed by a second
# kernel) where N / 32 column tiles alone leave SMs idle (N = 1024-4096 at K = 4096-14336). 1: never (an A/B knob).
GEMV_SPLIT_K = max(1, int(os.environ.get("FP8STREAM_GEMV_SPLIT_K", "8") or 1))
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
# Under torch.compile, the per-token quantization of silu(gate) * up (fused gate/up MLPs, MoE experts) and of the
# routed rows gathered by token (MoE experts) runs fp8stream's one-pass Triton kernel as an opaque op instead of the
# reduction inductor generates, which reads each row twice (H200, 4096 tokens: 0.16 -> 0.09 ms per Llama-8B MLP,
# bench/profile_prefill.py). FP8STREAM_COMPILED_ROW_QUANT=inductor: leave them to inductor.
_COMPILED_ROW_QUANT = os.environ.get("FP8STREAM_COMPILED_ROW_QUANT", "triton")
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
