import math

import pytest
import torch

from fp8stream.quantize import (
    BLOCK, FP8_DTYPE, FP8_MAX, dequantize, dequantize_activation, quantize_activation, quantize_blocks, quantize_rows,
)

# e4m3 keeps 3 mantissa bits: round-to-nearest error <= 2^-4 relative for normals; below the
# smallest normal (2^-6) the absolute step is 2^-9, so the absolute error is <= 2^-10 * scale.
REL, ABS_STEPS = 2.0**-4, 2.0**-10


def _within_fp8(x, deq, scale_full):
    err = (deq.double() - x.double()).abs()
    bound = REL * x.double().abs() + ABS_STEPS * scale_full.double() + 1e-30
    return bool((err <= bound * (1 + 1e-6)).all())


def test_rows_roundtrip_and_scale():
    x = torch.randn(37, 96) * torch.logspace(-3, 3, 37).unsqueeze(1)
    q, s = quantize_rows(x.clone())
    assert q.dtype == FP8_DTYPE and s.shape == (37,)
    assert torch.allclose(s, x.abs().amax(1) / FP8_MAX)
    assert q.float().abs().amax(1).eq(FP8_MAX).all()  # the largest element of each row maps to 448
    assert _within_fp8(x, dequantize(q, s, "fp8_per_channel"), s.unsqueeze(1).expand_as(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rows_into_slices_equals_plain_formula(dtype):
    """The loader's path (no clamp when the scale is the row's own amax) gives, bit for bit,
    fp8(clamp(x / (amax / 448))) and writes only its slice of the final storage; also for rows whose
    amax sits at the ends of the dtype's range, where x / scale rounds to just above 448."""
    from fp8stream.quantize import quantize_rows_into, round_fp8, scale_from_amax

    g = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    x = (torch.randn(64, 200, generator=g) * torch.logspace(-30 if dtype == torch.float32 else -6, 4, 64).unsqueeze(1))
    x = x.clamp(-big, big).to(dtype)
    x[0, 7], x[1, 3], x[2] = big, -big, 0
    x[3, :] = torch.finfo(dtype).tiny
    q_all = torch.full((70, 200), 1.0, dtype=FP8_DTYPE)
    s_all = torch.full((70,), -1.0)
    quantize_rows_into(x, q_all[3:67], s_all[3:67])
    want_s = scale_from_amax(x.float().abs().amax(-1))
    assert torch.equal(s_all[3:67], want_s)
    assert torch.equal(q_all[3:67].view(torch.uint8), round_fp8(x, want_s.unsqueeze(-1)).view(torch.uint8))
    assert q_all[[0, 1, 2, 67, 68, 69]].float().eq(1).all() and s_all[[0, 1, 2, 67, 68, 69]].eq(-1).all()
    given = torch.full((64,), float(want_s.min()))  # a shared scale smaller than most rows need: clamped
    q, s = quantize_rows(x, given)
    assert torch.equal(s, given) and torch.equal(q.view(torch.uint8), round_fp8(x, given.unsqueeze(-1)).view(torch.uint8))


def test_rows_into_leaves_float32_input_unchanged():
    """The CPU path divides a float32 copy in place: never the caller's float32 tensor itself."""
    from fp8stream.quantize import quantize_rows_into

    x = torch.randn(8, 64) * 3
    before = x.clone()
    for given in (None, torch.full((8,), 0.05)):
        quantize_rows_into(x, torch.empty(8, 64, dtype=FP8_DTYPE), torch.empty(8), given)
        assert torch.equal(x, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path; run on the H100 by hand")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rows_into_cuda_casts_as_it_stores(dtype):
    """CUDA quantizes with the division casting to fp8 as it stores: the same bits as dividing into a float32
    tensor and converting it, including rows at the ends of the dtype's range and all-zero rows, and no
    device temporary the size of the chunk (the loader's staging budget counts none)."""
    from fp8stream.quantize import quantize_rows_into, round_fp8

    g = torch.Generator().manual_seed(1)
    big = torch.finfo(dtype).max
    x = (torch.randn(4096, 2048, generator=g) * torch.logspace(-6, 4, 4096).unsqueeze(1)).clamp(-big, big).to(dtype)
    x[0, 7], x[1, 3], x[2] = big, -big, 0
    x = x.cuda()
    q, s = torch.empty(4096, 2048, dtype=FP8_DTYPE, device="cuda"), torch.empty(4096, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    quantize_rows_into(x, q, s)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 2**20  # vs 32 MiB for a float32 quotient
    # CUDA divides by the scalar 448 as a multiplication by its reciprocal: scales may differ from the
    # CPU's by an ulp; the fp8 values are exact for the scales used
    want_s = (x.float().abs().amax(-1) / 448).clamp(min=torch.finfo(torch.float32).tiny)
    assert torch.allclose(s, want_s, rtol=2.5e-7, atol=0)
    assert torch.equal(q.view(torch.uint8), round_fp8(x, s.unsqueeze(-1)).view(torch.uint8))


def test_zero_rows_and_blocks_get_safe_scales():
    x = torch.randn(300, 260)
    x[5] = 0
    x[128:256, 128:256] = 0
    q, s = quantize_rows(x.clone())
    assert torch.isfinite(s).all() and (s > 0).all()
    assert dequantize(q, s, "fp8_per_channel")[5].eq(0).all()
    qb, sb = quantize_blocks(x.clone())
    assert torch.isfinite(sb).all() and (sb > 0).all()
    d = dequantize(qb, sb, "fp8_per_block")
    assert torch.isfinite(d).all() and d[128:256, 128:256].eq(0).all()


def test_nan_and_inf_show_in_scales():
    x = torch.randn(4, 32)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    _, s = quantize_rows(x.clone())
    assert not torch.isfinite(s[1]) and not torch.isfinite(s[2]) and torch.isfinite(s[[0, 3]]).all()


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (100, 130), (1, 5)])
def test_blocks_partial_edges(shape):
    x = torch.randn(*shape) * 3
    q, s = quantize_blocks(x.clone())
    assert s.shape == (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            tile = x[bi * BLOCK : (bi + 1) * BLOCK, bj * BLOCK : (bj + 1) * BLOCK]
            assert torch.isclose(s[bi, bj], tile.abs().amax() / FP8_MAX)
    from fp8stream.quantize import expand_block_scale

    assert _within_fp8(x, dequantize(q, s, "fp8_per_block"), expand_block_scale(s, *shape))


@pytest.mark.parametrize("scheme", ["fp8_per_channel", "fp8_per_tensor", "fp8_per_block"])
def test_activation_quantization(scheme):
    x = torch.randn(9, 200, dtype=torch.bfloat16) * torch.logspace(-2, 2, 9, dtype=torch.bfloat16).unsqueeze(1)
    q, s = quantize_activation(x, scheme)
    assert q.shape == x.shape and q.dtype == FP8_DTYPE
    expected = {"fp8_per_channel": (9, 1), "fp8_per_tensor": (9, 1), "fp8_per_block": (9, 2)}[scheme]
    assert s.shape == expected
    d = dequantize_activation(q, s, scheme)
    full = s.repeat_interleave(BLOCK, -1)[:, :200] if scheme == "fp8_per_block" else s.expand_as(d)
    assert _within_fp8(x.float(), d, full)
    if scheme == "fp8_per_tensor":
        assert s.unique().numel() == 1
