import pytest
import torch
from torch import nn

from fp8stream import kernels
from fp8stream.modules import FP8Experts, FP8Linear, fp8_linear, replace_with_fp8
from fp8stream.quantize import dequantize, dequantize_activation, quantize_activation
from tiny_models import quantize_weight as _quantize_weight

SCHEMES = ["fp8_per_channel", "fp8_per_tensor", "fp8_per_block"]


def _reference(x, q, s, bias, scheme, decode_rule=True):
    """float64: dequantized dynamic-fp8 activations times dequantized weights; with decode_rule, at most
    GEMV_MAX_M rows (decode) are not quantized."""
    x2 = x.reshape(-1, x.shape[-1])
    if decode_rule and x2.shape[0] <= kernels.GEMV_MAX_M:
        a = x2.double()
    else:
        qx, sx = quantize_activation(x2, scheme)
        a = dequantize_activation(qx, sx, scheme).double()
    y = a @ dequantize(q, s, scheme).double().t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [1, 3, 8, 64])
def test_fp8_linear_matches_float64(scheme, m):
    w = torch.randn(96, 160)
    q, s = _quantize_weight(w, scheme)
    bias = torch.randn(96)
    x = torch.randn(2, m, 160)
    x_before = x.clone()
    y = fp8_linear(x, q, s, bias, scheme)
    assert torch.equal(x, x_before)  # the caller's activations are never modified
    ref = _reference(x, q, s, bias, scheme)
    assert y.shape == (2, m, 96)
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5
    # and it approximates the full-precision product within FP8's error
    full = x.double() @ w.double().t() + bias.double()
    assert ((y.double() - full).norm() / full.norm()) < 0.08


class _Experts(nn.Module):
    def __init__(self, e, h, i):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.randn(e, h, i))
        self.act_fn = nn.SiLU()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("t", [5, 40])
def test_fp8_experts_route_like_a_loop(scheme, t):
    e, h, i, k = 6, 64, 48, 2
    rule = t <= kernels.MOE_GEMV_MAX_T  # the decode rule by the layer's token count: W8A16, else W8A8
    src = _Experts(e, h, i)
    fp8 = FP8Experts(src, scheme, device="cpu")
    deq = {}
    for name in ("gate_up_proj", "down_proj"):
        qs = [_quantize_weight(src._parameters[name][j].detach(), scheme) for j in range(e)]
        getattr(fp8, name).data = torch.stack([q for q, _ in qs])
        getattr(fp8, f"{name}_scale").data = torch.stack([s for _, s in qs])
        deq[name] = qs
    x = torch.randn(t, h)
    idx = torch.randint(0, e - 2, (t, k))  # experts e-2 and e-1 get no tokens
    idx[:, 1] = (idx[:, 0] + 1) % (e - 2)
    wts = torch.rand(t, k)
    out = fp8(x, idx, wts)
    ref = torch.zeros(t, h, dtype=torch.float64)
    for ex in range(e):  # one GEMM per expert over its tokens (a per-tensor activation scale spans that group)
        tok, slot = (idx == ex).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        g, u = _reference(x[tok], *deq["gate_up_proj"][ex], None, scheme, rule).chunk(2, dim=-1)
        a = (torch.nn.functional.silu(g) * u).float()
        ref.index_add_(0, tok, wts[tok, slot].double().unsqueeze(1) * _reference(a, *deq["down_proj"][ex], None, scheme, rule))
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-5


def test_replace_respects_ignore_and_gemm_shapes():
    model = nn.Sequential()
    model.add_module("a", nn.Linear(32, 64, device="meta"))
    model.add_module("lm_head", nn.Linear(64, 32, device="meta"))
    model.add_module("gate", nn.Linear(64, 1, device="meta"))  # out_features 1: not a multiple of 16
    model.add_module("b", nn.Linear(64, 48, bias=False, device="meta"))
    q, kept = replace_with_fp8(model, "fp8_per_channel", [r"lm_head$"], torch.bfloat16)
    assert q == ["a", "b"] and set(kept) == {"lm_head", "gate"}
    assert isinstance(model.a, FP8Linear) and isinstance(model.lm_head, nn.Linear) and model.b.bias is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path; run on the H100 by hand")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [1, 16, 256])
def test_cuda_fp8_linear_matches_reference(scheme, m):
    w = torch.randn(256, 512, device="cuda")
    q, s = _quantize_weight(w, scheme)
    bias = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    y = fp8_linear(x, q, s, bias, scheme)
    ref = _reference(x.cpu(), q.cpu(), s.cpu(), bias.cpu(), scheme)
    assert y.dtype == torch.bfloat16
    assert ((y.cpu().double() - ref).norm() / ref.norm()) < 1e-2  # bf16 output rounding
