"""What FP8Linear (modules.py) and the MoE expert modules (experts.py) share: the layout of an FP8 weight's
parameters and fp8_linear, the one FP8 matmul they all run (here so that neither of those files imports the other).

Weights are float8_e4m3fn with float32 scales:
  fp8_per_channel / fp8_per_tensor: `weight_scale` [..., N] (per-tensor keeps one value per checkpoint
  shard, broadcast over that shard's rows, so fused q/k/v or gate/up never share a scale);
  fp8_per_block: `weight_scale` [..., ceil(N/128), ceil(K/128)].
On CUDA the forward runs the fast paths of kernels.py (fused dynamic activation quantization, FP8
GEMMs: torch._scaled_mm, blockwise F.scaled_mm / Triton, the Triton grouped GEMM for MoE experts);
everything else (CPU, shapes no kernel takes) runs a reference path that dequantizes the fp8 operands
and multiplies in float32. Both compute the same function.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels
from .quantize import BLOCK


def _scale_shape(scheme: str, lead: tuple[int, ...], n: int, k: int) -> tuple[int, ...]:
    if scheme == "fp8_per_block":
        return (*lead, math.ceil(n / BLOCK), math.ceil(k / BLOCK))
    return (*lead, n)


def _empty_param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, scheme: str,
    decode_rule: bool = True, act: bool = False,
) -> torch.Tensor:
    """y = dynamic_fp8(x) @ weight^T * scales (+ bias), in x's dtype. weight [N, K] fp8. With decode_rule,
    x of at most kernels.GEMV_MAX_M rows is not quantized (W8A16; see kernels.GEMV_MAX_M). With act, x is
    [..., 2K] = gate | up and the input is silu(gate) * up (kernels.silu_mul), fused into the quantization."""
    n, k = weight.shape
    x2 = x.reshape(-1, 2 * k if act else k)
    y = kernels.linear_cuda(x2, weight, weight_scale, bias, scheme, decode_rule, act) if x2.is_cuda else None
    if y is None:
        y = kernels.reference_linear(x2, weight, weight_scale, bias, scheme, decode_rule, act).to(x.dtype)
    return y.reshape(*x.shape[:-1], n)
