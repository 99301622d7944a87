"""Quantization: pure functions, full-precision rows in, float8_e4m3fn + float32 scales out.

scale = amax / 448 (448 is the largest finite e4m3 value), q = fp8(x / scale), x ~= q * scale.
A row or block that is all zeros gets the smallest normal float32 as its scale: q is then 0 and
q * scale is 0, never NaN or Inf.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128  # fp8_per_block: 128x128 weight blocks, 1x128 activation groups
SCHEMES = ("fp8_per_channel", "fp8_per_tensor", "fp8_per_block")
_TINY = torch.finfo(torch.float32).tiny


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """float32 scale for a float32 amax; all-zero groups get a tiny positive scale instead of 0."""
    return (amax.float() / FP8_MAX).clamp_(min=_TINY)


def round_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Plain rounding, fp8(clamp(x / scale)) with `scale` broadcastable to x; x is left as it is."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _to_fp8(x32: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # In place on a float32 staging copy: the only extra device memory is the 1-byte result.
    return x32.div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rows(x: torch.Tensor, row_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row of a 2-D tensor (or the given per-row scales, e.g. one per checkpoint shard).

    Returns (fp8 rows, float32 scales of shape [rows]).
    """
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    quantize_rows_into(x, q, s, row_scale)
    return q, s


def quantize_rows_into(x: torch.Tensor, q_out: torch.Tensor, s_out: torch.Tensor,
                       row_scale: torch.Tensor | None = None) -> None:
    """quantize_rows writing straight into q_out (fp8, x's shape) and s_out (float32 [rows]), e.g. slices of
    the loader's final weight and scales: no fp8 temporary and no copy into the final storage afterwards.

    Temporaries (the loader's staging budget, bench/stage_bytes.py): on CUDA none the size of x with the
    rows' own amax (the reduction upcasts as it reads; the division runs in float32 and casts to fp8 as it
    stores), else one float32 copy of x (CPU kernels would promote x and the quotient to two float32
    temporaries instead). Same bits either way."""
    if row_scale is None and x.device.type == "cuda":
        # amax in float32 of the exact source values (abs and max never round)
        torch.linalg.vector_norm(x, float("inf"), dim=-1, dtype=torch.float32, out=s_out)
        s_out.div_(FP8_MAX).clamp_(min=_TINY)  # = scale_from_amax
        # |x| <= amax, so |x / scale| <= 448 * (1 + 2^-23), which rounds to 448: no clamp needed
        torch.div(x, s_out.unsqueeze(-1), out=q_out)
        return
    x32 = x.to(torch.float32, copy=True)  # never x itself: the caller's tensor is left as it is
    if row_scale is None:
        torch.linalg.vector_norm(x32, float("inf"), dim=-1, out=s_out)
        s_out.div_(FP8_MAX).clamp_(min=_TINY)
        q_out.copy_(x32.div_(s_out.unsqueeze(-1)))
    else:
        s_out.copy_(row_scale)
        q_out.copy_(x32.div_(s_out.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX))


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """amax of a whole tensor (float32 scalar); reductions in the source dtype are exact for max."""
    return x.abs().amax().float()


def block_amax(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """amax of every [block x block] tile of a 2-D tensor; edge tiles cover the remaining rows/columns."""
    rows, cols = x.shape
    rb, cb = math.ceil(rows / block), math.ceil(cols / block)
    pad = torch.nn.functional.pad(x.abs(), (0, cb * block - cols, 0, rb * block - rows))
    return pad.view(rb, block, cb, block).amax(dim=(1, 3)).float()


def quantize_blocks(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 blocks of a 2-D tensor -> (fp8 [rows, cols], float32 scales [ceil(rows/128), ceil(cols/128)]).

    Shapes not divisible by 128: the last block row/column is partial; its scale comes from the
    elements that exist (zero padding never raises an amax), so every weight is quantized exactly
    as it would be inside a full block.
    """
    rows, cols = x.shape
    scale = scale_from_amax(block_amax(x, block))
    full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return _to_fp8(x.float(), full), scale


def expand_block_scale(scale: torch.Tensor, rows: int, cols: int, block: int = BLOCK) -> torch.Tensor:
    """Per-element scale of a [rows, cols] weight from its block scales (leading dims allowed)."""
    return scale.repeat_interleave(block, -2)[..., :rows, :].repeat_interleave(block, -1)[..., :cols]


def dequantize(q: torch.Tensor, scale: torch.Tensor, scheme: str, dtype=torch.float32) -> torch.Tensor:
    """Reference dequantization of a weight ([..., N, K]) stored by `scheme`."""
    if scheme == "fp8_per_block":
        full = expand_block_scale(scale, q.shape[-2], q.shape[-1])
        return (q.float() * full).to(dtype)
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def quantize_activation(x: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of [M, K]: per token, per tensor, or 1x128 groups.

    Returns (fp8 [M, K], float32 scales [M, 1] for token/tensor, [M, ceil(K/128)] for groups).
    """
    m, k = x.shape
    if scheme == "fp8_per_block":
        groups = math.ceil(k / BLOCK)
        pad = torch.nn.functional.pad(x.float(), (0, groups * BLOCK - k)).view(m, groups, BLOCK)
        scale = scale_from_amax(pad.abs().amax(dim=-1))
        q = (pad / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(m, groups * BLOCK)[:, :k]
        return q, scale
    x32 = x.float()
    if scheme == "fp8_per_tensor":
        scale = scale_from_amax(x32.abs().amax()).reshape(1, 1).expand(m, 1).contiguous()
    else:
        scale = scale_from_amax(x32.abs().amax(dim=-1, keepdim=True))
    # Out of place: x is the caller's activation (x.float() of a float32 tensor is x itself).
    return (x32 / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    if scheme == "fp8_per_block":
        return q.float() * scale.repeat_interleave(BLOCK, -1)[:, : q.shape[-1]]
    return q.float() * scale
