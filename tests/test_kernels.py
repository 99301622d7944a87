"""Forward paths of kernels.py: CPU against float64 references; on CUDA every fast kernel against the reference path.

CPU: the reference Linear at decode shapes, the grouped MoE logic (sort / group bounds / routing weight
folded into the down GEMM's scales / combine) with a torch grouped GEMM, torch.compile(fullgraph=True)
tracing. With TRITON_INTERPRET=1 and triton installed, the Triton kernels also run on CPU tensors.
CUDA (skipped without a GPU): each Triton kernel, F.scaled_mm blockwise, torch._scaled_grouped_mm, the
whole Linear / experts forward for every scheme and several capability sets, and compiled forwards
(fullgraph=True, also with CUDA graphs) against eager.
"""

import os

import pytest
import torch
from torch import nn

from fp8stream import _kernel_caps
from fp8stream import kernels as K
from fp8stream._fp8_linear import fp8_linear
from fp8stream.experts import FP8Experts
from fp8stream.modules import FP8Linear
from fp8stream.quantize import dequantize, dequantize_activation, quantize_activation
from tiny_models import quantize_weight as _quantize_weight

SCHEMES = ["fp8_per_channel", "fp8_per_tensor", "fp8_per_block"]
CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="CUDA kernels; run on the H100 by hand")


def _triton_interpretable():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _ref_linear64(x, q, s, bias, scheme, decode_rule=True):
    x2 = x.reshape(-1, x.shape[-1]).float()
    if decode_rule and x2.shape[0] <= K.GEMV_MAX_M:  # the decode rule: a few rows are not quantized
        a = x2.double()
    else:
        qx, sx = quantize_activation(x2, scheme)
        a = dequantize_activation(qx, sx, scheme).double()
    y = a @ dequantize(q, s, scheme).double().t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], -1)


class _Src(nn.Module):
    def __init__(self, e, h, i, act):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.randn(e, h, i))
        self.act_fn = act


def _experts(e, h, i, scheme, device="cpu", act=None):
    src = _Src(e, h, i, act or nn.SiLU())
    m = FP8Experts(src, scheme, device="cpu")
    for name in ("gate_up_proj", "down_proj"):
        qs = [_quantize_weight(src._parameters[name][j].detach() * (1 + 3 * torch.rand(1)), scheme) for j in range(e)]
        getattr(m, name).data = torch.stack([q for q, _ in qs])
        getattr(m, f"{name}_scale").data = torch.stack([s for _, s in qs])
    return m.to(device)


def _routing(t, k, e, used, device="cpu", dtype=torch.float32):
    """top-k expert ids among the first `used` experts (the others get no tokens), distinct per token."""
    idx = torch.stack([torch.randperm(used)[:k] for _ in range(t)]) if t else torch.empty(0, k, dtype=torch.long)
    w = torch.rand(t, k).softmax(-1)
    return idx.to(device), w.to(device=device, dtype=dtype)


def _experts_ref64(m, x, idx, wts):
    """float64: per expert, the reference FP8 GEMMs over its tokens (per-tensor activation scale per expert);
    W8A16 when the layer gets at most MOE_GEMV_MAX_T tokens (the decode rule), else W8A8."""
    rule = x.shape[0] <= K.MOE_GEMV_MAX_T
    out = torch.zeros(x.shape, dtype=torch.float64)
    x, idx, wts = x.cpu().float(), idx.cpu(), wts.cpu().double()
    gu, gus = m.gate_up_proj.cpu(), m.gate_up_proj_scale.cpu()
    dn, dns = m.down_proj.cpu(), m.down_proj_scale.cpu()
    for ex in range(m.num_experts):
        tok, slot = (idx == ex).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        g, u = _ref_linear64(x[tok], gu[ex], gus[ex], None, m.scheme, rule).chunk(2, dim=-1)
        a = (m.act_fn(g.float()) * u.float())
        out.index_add_(0, tok, wts[tok, slot].unsqueeze(1) * _ref_linear64(a, dn[ex], dns[ex], None, m.scheme, rule))
    return out


# ------------------------------------------------------------------------------------------------ CPU

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize("nk", [(96, 160), (256, 384)])
def test_linear_decode_shapes_match_float64(scheme, m, nk):
    n, k = nk
    w = torch.randn(n, k) * (1 + 3 * torch.rand(n, 1))
    q, s = _quantize_weight(w, scheme)
    bias = torch.randn(n)
    x = torch.randn(1, m, k)
    y = fp8_linear(x, q, s, bias, scheme)
    assert y.shape == (1, m, n) and y.dtype == x.dtype
    assert _rel(y, _ref_linear64(x, q, s, bias, scheme)) < 1e-5
    xb = x.to(torch.bfloat16)  # bf16 activations: output in bf16, same function up to output rounding
    yb = fp8_linear(xb, q, s, bias.to(torch.bfloat16), scheme)
    assert yb.dtype == torch.bfloat16 and _rel(yb, _ref_linear64(xb, q, s, bias.to(torch.bfloat16), scheme)) < 1e-2


@pytest.mark.parametrize("mode", ["row", "tensor", "group"])
def test_torch_activation_quant_is_quantize_activation(mode):
    x = torch.randn(7, 300) * torch.rand(7, 1) * 10
    x[3] = 0  # an all-zero row: tiny scale, q = 0
    q, s = K._quant_torch(x, mode)
    scheme = {"row": "fp8_per_channel", "tensor": "fp8_per_tensor", "group": "fp8_per_block"}[mode]
    qr, sr = quantize_activation(x, scheme)
    assert torch.equal(q.float(), qr.float()) and torch.equal(s.reshape(sr.shape), sr)
    assert torch.isfinite(s).all() and (s > 0).all()
    amax = x.abs().amax(-1)  # a given amax per row is the per-row scheme
    q2, s2 = K._quant_torch(x, "row", amax=amax)
    q3, s3 = K._quant_torch(x, "row")
    assert torch.equal(q2.float(), q3.float()) and torch.equal(s2, s3)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("t", [1, 2, 5, 8, 40])
def test_experts_reference_matches_float64_with_empty_experts(scheme, t):
    torch.manual_seed(t)
    m = _experts(8, 64, 48, scheme)
    x = torch.randn(t, 64)
    idx, wts = _routing(t, 4, 8, used=5)  # experts 5, 6, 7 get no tokens
    out = m(x, idx, wts)
    assert out.shape == x.shape
    assert _rel(out, _experts_ref64(m, x, idx, wts)) < 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("t", [1, 3, 8, 40])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_grouped_experts_logic_matches_loop(scheme, t, act):
    """The CUDA experts algorithm (sort, searchsorted bounds, fold routing weights, rows back in (token, slot) order +
    sum), run on the CPU with a torch grouped GEMM, equals the per-expert reference loop."""
    torch.manual_seed(100 + t)
    m = _experts(8, 64, 48, scheme, act=nn.SiLU() if act == "silu" else nn.GELU())
    x = torch.randn(t, 64)
    idx, wts = _routing(t, 4, 8, used=6)
    fast = K.experts_fast(x, idx, wts, m.gate_up_proj, m.gate_up_proj_scale, m.down_proj, m.down_proj_scale,
                          m.act_fn, scheme, K.Caps(torch_grouped=True))
    ref = m.reference_forward(x, idx, wts)
    assert fast.shape == x.shape and fast.dtype == x.dtype
    assert _rel(fast, ref) < 1e-5
    assert _rel(fast, _experts_ref64(m, x, idx, wts)) < 1e-5


@pytest.mark.parametrize("scheme", ["fp8_per_channel", "fp8_per_tensor"])
def test_grouped_experts_sort_more_experts_than_uint8_holds(scheme):
    """Expert ids are sorted in the narrowest integer type: 300 experts take int16 keys; ids above 255 (which
    uint8 would wrap) must route to their own experts, and the per-tensor path's amax per group still indexes right."""
    torch.manual_seed(7)
    e = 300
    m = _experts(e, 32, 16, scheme)
    t = K.MOE_GEMV_MAX_T + 12  # above the decode rule: the sorted grouped path
    idx = torch.stack([torch.tensor([250 + i % 50, i % 7]) for i in range(t)])  # ids 250-299 and 0-6
    wts = torch.rand(t, 2).softmax(-1)
    x = torch.randn(t, 32)
    fast = K.experts_fast(x, idx, wts, m.gate_up_proj, m.gate_up_proj_scale, m.down_proj, m.down_proj_scale,
                          m.act_fn, scheme, K.Caps(torch_grouped=True))
    assert _rel(fast, m.reference_forward(x, idx, wts)) < 1e-5


def test_caps_are_a_compile_time_constant_without_importing_dynamo():
    """kernels marks the capability probe the way torch.compiler.assume_constant_result does, without
    importing torch._dynamo (1.5 s of `import fp8stream`): the official decorator must set exactly that."""
    import subprocess
    import sys

    code = "import sys, fp8stream; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"

    def probe(index):
        return (index,)

    torch.compiler.assume_constant_result(probe)
    marks = {k: v for k, v in vars(probe).items()}
    assert marks == {K._CONSTANT_MARK: True}
    assert getattr(K._caps_tuple, K._CONSTANT_MARK) is True


@pytest.mark.parametrize("fast", [True, False])
def test_linear_passes_the_accumulation_choice_to_scaled_mm(fast, monkeypatch):
    """FP8STREAM_FAST_ACCUM (K.FAST_ACCUM) reaches the cuBLAS GEMM of both rowwise schemes; the call is
    recorded, not run (CPU), and the result is the recorded call's."""
    calls = []

    def fake_scaled_mm(a, b, *, scale_a, scale_b, bias=None, out_dtype, use_fast_accum=False):
        calls.append(use_fast_accum)
        return (a.float() * scale_a) @ (b.float() * scale_b)

    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    monkeypatch.setattr(_kernel_caps, "FAST_ACCUM", fast)
    for scheme in ("fp8_per_channel", "fp8_per_tensor"):
        q, s = _quantize_weight(torch.randn(32, 64), scheme)
        x = torch.randn(40, 64, dtype=torch.bfloat16)
        y = K.linear_fast(x, q, s, None, scheme, K.Caps(scaled_mm=True))
        assert y is not None and _rel(y, _ref_linear64(x, q, s, None, scheme)) < 1e-2
    assert calls == [fast, fast]


def test_group_bounds_with_empty_groups():
    ids = torch.tensor([0, 0, 2, 2, 2, 5])
    starts, ends = K._group_bounds(ids, 7)
    assert starts.tolist() == [0, 2, 2, 5, 5, 5, 6] and ends.tolist() == [2, 2, 5, 5, 5, 6, 6]
    assert starts.dtype == ends.dtype == torch.int32


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compile_fullgraph_cpu(scheme):
    """No graph breaks in the FP8 modules (dynamo with the eager backend: no C++ toolchain needed)."""
    torch._dynamo.reset()
    w = torch.randn(64, 256)
    q, s = _quantize_weight(w, scheme)
    lin = FP8Linear(256, 64, True, scheme, torch.float32, device="cpu")
    lin.weight.data, lin.weight_scale.data, lin.bias.data = q, s, torch.randn(64)
    x = torch.randn(2, 3, 256)
    torch.testing.assert_close(torch.compile(lin, fullgraph=True, backend="eager")(x), lin(x))
    m = _experts(6, 64, 48, scheme)
    xe = torch.randn(5, 64)
    idx, wts = _routing(5, 2, 6, used=4)
    got = torch.compile(m, fullgraph=True, backend="eager")(xe, idx, wts)
    assert _rel(got, m(xe, idx, wts)) < 1e-5


class _Traced(Exception):
    pass


def _traced_ops(fn, *args) -> list[str]:
    """The ops dynamo traces fn(*args) into (fullgraph), without running the compiled graph: the backend records the
    graph and aborts, so ops that need a GPU to run can be inspected on CPU."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        raise _Traced

    torch._dynamo.reset()
    with pytest.raises(Exception) as info:  # dynamo wraps the backend's exception
        torch.compile(fn, fullgraph=True, backend=backend)(*args)
    assert isinstance(info.value, _Traced) or isinstance(info.value.__cause__, _Traced) or "_Traced" in str(info.value)
    return seen


def test_compiled_row_quantization_goes_through_the_one_pass_op(monkeypatch):
    """Under torch.compile with the Triton quantization available, the MoE experts' gathered rows and silu(gate) * up,
    and a fused MLP's down-projection input, are quantized by the opaque fp8stream::quant_rows op (one-pass kernel),
    not by inductor's reduction; FP8STREAM_COMPILED_ROW_QUANT=inductor restores the torch ops."""
    m = _experts(6, 64, 48, "fp8_per_channel")
    x = torch.randn(40, 64)
    idx, wts = _routing(40, 2, 6, used=4)
    caps = K.Caps(triton_quant=True, torch_grouped=True)

    def experts(x, idx, wts):
        return K.experts_fast(x, idx, wts, m.gate_up_proj, m.gate_up_proj_scale, m.down_proj, m.down_proj_scale,
                              m.act_fn, "fp8_per_channel", caps)

    q, s = _quantize_weight(torch.randn(32, 48), "fp8_per_channel")
    gate_up = torch.randn(40, 96)

    def down(gate_up):
        return K.linear_fast(gate_up, q, s, None, "fp8_per_channel", caps._replace(scaled_mm=True), act=True)

    assert sum("quant_rows" in op for op in _traced_ops(experts, x, idx, wts)) == 2  # gathered rows, silu(gate) * up
    assert sum("quant_rows" in op for op in _traced_ops(down, gate_up)) == 1
    monkeypatch.setattr(_kernel_caps, "_COMPILED_ROW_QUANT", "inductor")
    assert not any("quant_rows" in op for op in _traced_ops(experts, x, idx, wts) + _traced_ops(down, gate_up))


def _ep_shard(m, start, n):
    """Experts [start, start + n) of `m` as an expert-parallel rank would hold them."""
    part = _experts(n, m.hidden_dim, m.intermediate_dim, m.scheme)
    for name in ("gate_up_proj", "gate_up_proj_scale", "down_proj", "down_proj_scale"):
        getattr(part, name).data = getattr(m, name).data[start : start + n].clone()
    part.expert_start, part.expert_parallel = start, True
    return part


@pytest.mark.parametrize("scheme", ["fp8_per_channel", "fp8_per_block"])
def test_expert_parallel_shards_sum_to_the_whole_compiled(scheme):
    """Global expert ids on a rank that holds 3 of 6 experts: the compiled (static, routed-by-local-id)
    path adds nothing for other ranks' experts, so the two ranks' outputs sum to the whole module's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = _experts(6, 64, 48, scheme)
    x = torch.randn(7, 64)
    idx, wts = _routing(7, 2, 6, used=6)
    whole = m.reference_forward(x, idx, wts)
    parts = [_ep_shard(m, start, 3) for start in (0, 3)]
    ref = sum(p.reference_forward(x, idx, wts) for p in parts)  # the eager reference skips other ranks' pairs
    assert _rel(ref, whole) < 1e-5
    got = sum(torch.compile(p, fullgraph=True, backend="eager")(x, idx, wts) for p in parts)
    assert _rel(got, whole) < 0.02  # the compiled path's own FP8 rounding (vs the reference loop), nothing routed twice


@pytest.mark.skipif(not _triton_interpretable(), reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
def test_tma_gemm_in_interpreter():
    """The TMA grouped GEMM's logic (tiles past a group's rows or an expert's N rows, empty groups) on CPU tensors
    through the interpreter, against the pointer-load kernel (the GPU test repeats this on Hopper)."""
    torch.manual_seed(0)
    e, n, k, counts = 4, 96, 256, [37, 0, 130, 5]
    qs = [_quantize_weight(torch.randn(n, k), "fp8_per_channel") for _ in range(e)]
    qw, sw = torch.stack([q for q, _ in qs]), torch.stack([s.view(-1) for _, s in qs])
    qx, sx = quantize_activation(torch.randn(sum(counts), k), "fp8_per_channel")
    ids = torch.repeat_interleave(torch.arange(e), torch.tensor(counts))
    starts, ends = K._group_bounds(ids, e)
    got = K._launch_gemm_tma(qx, sx.view(-1), qw, sw, None, starts, ends, torch.float32, (32, 64, 64, 4, 2))
    want = K._launch_gemm(qx, sx.view(-1), qw, sw, None, starts, ends, False, torch.float32, (32, 64, 64, 4, 2))
    assert _rel(got, want) < 1e-6
    # out_rows: each kernel stores product row r as output row out_rows[r] (the MoE down GEMM's combine order)
    perm = torch.randperm(sum(counts))
    got_rows = K._launch_gemm_tma(qx, sx.view(-1), qw, sw, None, starts, ends, torch.float32, (32, 64, 64, 4, 2), perm)
    want_rows = K._launch_gemm(qx, sx.view(-1), qw, sw, None, starts, ends, False, torch.float32, (32, 64, 64, 4, 2),
                               out_rows=perm)
    assert torch.equal(got_rows[perm], got) and torch.equal(want_rows[perm], want)


@pytest.mark.skipif(not _triton_interpretable(), reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_triton_gemm_in_interpreter(scheme):
    """The Triton GEMM (grouped with empty groups, and dense blockwise) on CPU tensors through the interpreter."""
    torch.manual_seed(0)
    m = _experts(5, 128, 64, scheme)
    x = torch.randn(K.MOE_GEMV_MAX_T + 5, 128)  # above the decode rule: the grouped W8A8 GEMM
    idx, wts = _routing(x.shape[0], 2, 5, used=3)
    fast = K.experts_fast(x, idx, wts, m.gate_up_proj, m.gate_up_proj_scale, m.down_proj, m.down_proj_scale,
                          m.act_fn, scheme, K.Caps(triton_gemm=True))
    assert _rel(fast, m.reference_forward(x, idx, wts)) < 1e-5
    # prefill-sized groups (~130 rows each): rowwise schemes take the 64 x 256 tile config, wider than N here
    x = torch.randn(200, 128)
    idx, wts = _routing(x.shape[0], 2, 5, used=3)
    if scheme != "fp8_per_block":
        assert K._gemm_config(400, 5, 128, 132)[:2] == (64, 256)
    fast = K.experts_fast(x, idx, wts, m.gate_up_proj, m.gate_up_proj_scale, m.down_proj, m.down_proj_scale,
                          m.act_fn, scheme, K.Caps(triton_gemm=True))
    assert _rel(fast, m.reference_forward(x, idx, wts)) < 1e-5
    q, s = _quantize_weight(torch.randn(256, 384), scheme)
    xl = torch.randn(K.GEMV_MAX_M + 5, 384)  # above the decode rule: the W8A8 GEMM
    bias = torch.randn(256)
    y = K.linear_fast(xl, q, s, bias, scheme, K.Caps(triton_gemm=True))
    if scheme == "fp8_per_block":
        assert _rel(y, _ref_linear64(xl, q, s, bias, scheme)) < 1e-5
    else:
        assert y is None  # rowwise dense needs torch._scaled_mm


@pytest.mark.skipif(not _triton_interpretable(), reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_triton_experts_decode_in_interpreter(scheme, act):
    """MoE decode (W8A16, one gemv row per (token, expert) pair; silu fused into the down kernel, gelu
    computed between the two) equals the per-expert reference loop, for 1 and 3 tokens (the interpreter runs
    every program in Python), with experts that get no token and N, K not multiples of the tiles (nor of
    128 for the block scheme)."""
    torch.manual_seed(3)
    m = _experts(6, 144, 144, scheme, act=nn.SiLU() if act == "silu" else nn.GELU())
    for t in (1, 3):
        x = torch.randn(t, 144)
        idx, wts = _routing(t, 2, 6, used=4)
        fast = K.experts_fast(x, idx, wts, m.gate_up_proj, m.gate_up_proj_scale, m.down_proj, m.down_proj_scale,
                              m.act_fn, scheme, K.Caps(triton_gemv=True))
        assert fast.shape == x.shape and fast.dtype == x.dtype
        assert _rel(fast, _experts_ref64(m, x, idx, wts)) < 1e-5
        assert _rel(fast, m.reference_forward(x, idx, wts)) < 1e-5


@pytest.mark.skipif(not _triton_interpretable(), reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_triton_gemv_in_interpreter(scheme):
    """The decode kernels (W8A16) compute x @ dequantize(w)^T + bias: one row (CUDA-core kernel, every tile
    config the sweep tries), M padded to 16 and 32 (tensor-core kernel), N and K not multiples of the tiles
    (nor of 128), fp16 and fp32 activations (the interpreter cannot multiply bf16); split-K with 2-8 K ranges, the
    last one short."""
    q, s = _quantize_weight(torch.randn(144, 1008), scheme)
    x, bias = torch.randn(1, 1008), torch.randn(144)
    ref = x.double() @ dequantize(q, s, scheme).double().t() + bias.double()
    for cfg in ((4, 256, 4, 2), (8, 1024, 8, 3), (32, 512, 4, 3)):
        assert _rel(K._launch_gemv1(x, q, s, bias, scheme, cfg), ref) < 1e-6, cfg
    for m, n, k in ((1, 208, 384), (3, 256, 304), (16, 144, 1008), (17, 144, 1008)):
        q, s = _quantize_weight(torch.randn(n, k) * (1 + 3 * torch.rand(n, 1)), scheme)
        for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
            x, bias = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
            y = K.gemv(x, q, s, bias, scheme)
            ref = x.double() @ dequantize(q, s, scheme).double().t() + bias.double()
            assert y.shape == (m, n) and y.dtype == dtype and _rel(y, ref) < tol, (m, n, k, dtype)
            if m <= K.GEMV_MAX_M:  # the Linear entry point takes it at decode sizes
                assert _rel(K.linear_fast(x, q, s, bias, scheme, K.Caps(triton_gemv=True)), ref) < tol
            else:
                assert K.linear_fast(x, q, s, bias, scheme, K.Caps(triton_gemv=True)) is None
            if 1 < m <= K.GEMV_MAX_M:  # the 2..16-row kernel with other tiles than its default, split-K too
                for cfg in ((16, 256, 4, 2), (64, 128, 8, 3), (32, 128, 4, 3, 3), (16, 128, 4, 2, 8)):
                    if scheme == "fp8_per_block" and cfg[1] != 128:  # one block scale per K step: BK 128 only
                        with pytest.raises(ValueError, match="BK 128"):
                            K._launch_gemv(x, q, s, bias, scheme, cfg)
                        continue
                    y = K._launch_gemv(x, q, s, bias, scheme, cfg)
                    assert y.dtype == dtype and _rel(y, ref) < tol, (cfg, m, n, k, dtype)


@pytest.mark.skipif(not _triton_interpretable(), reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
@pytest.mark.parametrize("mode", ["row", "tensor", "group"])
def test_triton_quant_in_interpreter(mode):
    """Scales are exact; codes equal except where the interpreter's own software fp8 cast (not the GPU's
    cvt) rounds differently: one e4m3 step apart, or 2^(n-1) for 2^n (a mantissa carry it drops)."""
    torch.manual_seed(1)
    x = (torch.randn(6, 300) * 5).to(torch.bfloat16)
    idx = torch.tensor([5, 0, 0, 3])

    def check(q, s, qr, sr):
        assert torch.equal(s.reshape(sr.shape), sr)
        a, b = q.float(), qr.float()
        bad = a != b
        assert bad.double().mean() < 0.05
        a, b = a[bad], b[bad]
        assert ((b == 2 * a) | ((a - b).abs() <= 2**-3 * b.abs())).all()

    check(*K.quant_triton(x, mode), *K._quant_torch(x, mode))
    check(*K.quant_triton(x, mode, idx=idx), *K._quant_torch(x[idx], mode))
    if mode != "tensor":
        gu = (torch.randn(4, 512) * 3).to(torch.bfloat16)
        h = torch.nn.functional.silu(gu[:, :256]) * gu[:, 256:]
        q, s = K.quant_triton(gu, mode, act=True)
        qr, sr = K._quant_torch(h, mode)
        assert torch.allclose(s.reshape(sr.shape), sr, rtol=1e-2)


def test_generate_compile_uses_the_static_cache_recipe():
    """fp8stream generate --compile: transformers' generate with cache_implementation="static" (it then
    compiles the decode step itself on CUDA)."""
    from types import SimpleNamespace

    from fp8stream.generation import generate_text

    class Tok:
        chat_template, pad_token_id, eos_token_id = None, 0, 0

        def __call__(self, text, return_tensors):
            return SimpleNamespace(input_ids=torch.tensor([[5, 6]]))

        def decode(self, ids, skip_special_tokens):
            return " ".join(map(str, ids.tolist()))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def generate(self, ids, **kw):
            self.kw = kw
            return torch.cat([ids, torch.tensor([[7, 8]])], dim=1)

    m = Model()
    assert generate_text(m, Tok(), "hi", 2, decode="compile") == "7 8"
    assert m.kw["cache_implementation"] == "static" and m.kw["max_new_tokens"] == 2
    generate_text(m, Tok(), "hi", 2)
    assert "cache_implementation" not in m.kw
    generate_text(m, Tok(), "hi", 2, decode="eager")
    assert m.kw["cache_implementation"] == "dynamic" and m.kw["disable_compile"]


# ------------------------------------------------------------------------------------------------ CUDA

@cuda_only
def test_cuda_probe():
    info = K.prepare("cuda")
    print(info)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert info["scaled_mm"] and info["grouped"], info["probes"]
    if K.triton_kernels() is not None:
        assert info["triton_quant"] and info["triton_gemm"], info["probes"]


@cuda_only
@pytest.mark.skipif(not CUDA or K.triton_kernels() is None, reason="no triton")
@pytest.mark.parametrize("k", [1000, 4096, 14336])
def test_cuda_one_pass_row_quant_equals_two_pass(k, monkeypatch):
    """Rows that fit in registers are quantized in one pass (x read once); the bits must be those of the
    two-pass loop, for plain rows, gathered rows, given amax, and the fused act(gate) * up."""
    x = (torch.randn(65, 2 * k, device="cuda") * torch.rand(65, 1, device="cuda") * 10).to(torch.bfloat16)
    idx = torch.randint(0, 65, (40,), device="cuda")
    amax = torch.rand(40, device="cuda") * 20
    cases = [dict(), dict(idx=idx), dict(act=True), dict(idx=idx, act=True, row_weight=torch.rand(40, device="cuda")),
             dict(idx=idx, amax=amax)]
    for kw in cases:
        xs = x if kw.get("act") else x[:, :k]
        one = K.quant_triton(xs, "row", **kw)
        monkeypatch.setattr(_kernel_caps, "QUANT_ONE_PASS_MAX_K", 0)
        two = K.quant_triton(xs, "row", **kw)
        monkeypatch.setattr(_kernel_caps, "QUANT_ONE_PASS_MAX_K", 16384)
        assert torch.equal(one[0].view(torch.uint8), two[0].view(torch.uint8)) and torch.equal(one[1], two[1]), kw


def _within_one_step(q, qr):
    a, b = q.double(), qr.double()
    return bool(((a - b).abs() <= 2**-3 * b.abs() + 2**-9).all()) and float((a != b).double().mean()) < 0.02


@cuda_only
@pytest.mark.skipif(not CUDA or K.triton_kernels() is None, reason="no triton")  # no triton import on CPU
@pytest.mark.parametrize("mode", ["row", "tensor", "group"])
@pytest.mark.parametrize("mk", [(1, 128), (7, 1000), (300, 4096), (33, 14336), (3, 20000)])
def test_cuda_triton_quant_matches_torch(mode, mk):
    m, k = mk
    x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 10).to(torch.bfloat16)
    x[0, :] = 0
    q, s = K.quant_triton(x, mode)
    qr, sr = K._quant_torch(x, mode)
    assert torch.allclose(s.reshape(sr.shape), sr, rtol=1e-6, atol=0)
    assert _within_one_step(q, qr)
    if mode == "group":  # column-major scales for blockwise cuBLAS: same values
        qc, sc = K.quant_triton(x, mode, col_major=True)
        assert sc.stride(0) == 1 and torch.equal(sc, s) and torch.equal(qc.view(torch.uint8), q.view(torch.uint8))
    else:  # gathered rows, fused act(gate) * up, folded row weights
        idx = torch.randint(0, m, (2 * m + 1,), device="cuda")
        qi, si = K.quant_triton(x, mode, idx=idx)
        qri, sri = K._quant_torch(x[idx], mode)
        assert torch.allclose(si, sri, rtol=1e-6) and _within_one_step(qi, qri)
    if mode != "tensor" and k % 2 == 0:
        rw = torch.rand(m, device="cuda")
        qa, sa = K.quant_triton(x, mode, act=True, row_weight=rw if mode == "row" else None)
        h = torch.nn.functional.silu(x[:, : k // 2]) * x[:, k // 2 :]
        qra, sra = K._quant_torch(h, mode)
        if mode == "row":
            sra = sra * rw
        assert torch.allclose(sa.reshape(sra.shape), sra, rtol=1e-2, atol=0)  # exp() vs torch's silu: 1 bf16 ulp
        assert _rel(K._deq(qa, sa if mode == "group" else sa / rw, mode), h.float()) < 0.05


def _cuda_weight(n, k, scheme):
    q, s = _quantize_weight(torch.randn(n, k) * (1 + 3 * torch.rand(n, 1)), scheme)
    return q.cuda(), s.cuda()


def _variants():
    """Capability sets to force each path: what the probe found, torch activation quant (the compiled
    path), the Triton GEMM instead of cuBLAS (blockwise and grouped)."""
    c = K.caps(torch.device("cuda"))
    out = {"probed": c, "torch_quant": c._replace(triton_quant=False)}
    if c.triton_gemm:
        out["triton_gemm"] = c._replace(blockwise=False, grouped=False)
    return out


@cuda_only
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [1, 5, 16, 256, 1024])
@pytest.mark.parametrize("nk", [(256, 512), (384, 640), (512, 1408)])
def test_cuda_linear_fast_matches_reference(scheme, m, nk, monkeypatch):
    n, k = nk
    q, s = _cuda_weight(n, k, scheme)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = K.reference_linear(x, q, s, bias, scheme)
    ref64 = _ref_linear64(x.cpu(), q.cpu(), s.cpu(), bias.cpu(), scheme)
    for name, c in _variants().items():
        y = K.linear_fast(x, q, s, bias, scheme, c)
        if y is None:
            assert scheme == "fp8_per_block" and not c.triton_gemm and not c.blockwise, name
            continue
        assert y.shape == (m, n) and y.dtype == torch.bfloat16, name
        assert _rel(y, ref) < 1e-2, (name, _rel(y, ref))  # bf16 output rounding; boundary codes of activations
        assert _rel(y.cpu(), ref64) < 1e-2, name
    c = K.caps(torch.device("cuda"))
    if m <= K.GEMV_MAX_M:  # decode sizes: the W8A16 kernel, else the reference path (same function)
        assert c.triton_gemv
        assert K.linear_fast(x, q, s, bias, scheme, c._replace(triton_gemv=False)) is None
    elif c.triton_gemm:  # the opt-in Triton GEMM for rowwise schemes (FP8STREAM_TRITON_MAX_M)
        monkeypatch.setattr(_kernel_caps, "_TRITON_MAX_M", 1 << 30)
        y = K.linear_fast(x, q, s, bias, scheme, c)
        assert y.dtype == torch.bfloat16 and _rel(y, ref) < 1e-2, "triton small-M"
        monkeypatch.setattr(_kernel_caps, "_TRITON_MAX_M", 0)
    y = fp8_linear(x.view(1, m, k), q, s, bias, scheme)  # the module's entry point
    assert y.shape == (1, m, n) and _rel(y.view(m, n), ref) < 1e-2


@cuda_only
def test_cuda_linear_fp32_and_fp16_activations():
    q, s = _cuda_weight(256, 512, "fp8_per_channel")
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(9, 512, device="cuda", dtype=dtype)
        bias = torch.randn(256, device="cuda", dtype=dtype)
        for scheme, (qq, ss) in (("fp8_per_channel", (q, s)), ("fp8_per_block", _cuda_weight(256, 512, "fp8_per_block"))):
            y = fp8_linear(x, qq, ss, bias, scheme)
            assert y.dtype == dtype
            assert _rel(y, K.reference_linear(x, qq, ss, bias, scheme)) < 1e-2


@cuda_only
@pytest.mark.parametrize("k", [4096, 14336])
def test_cuda_fast_accumulation_error_is_small(k, monkeypatch):
    """Fast accumulation (the default) adds far less error than the FP8 rounding of the inputs: against the
    float64 product of the same FP8 codes it adds a few 1e-3 at most (fp32 promotion: the bf16 output rounding),
    and against the float64 product of the unquantized inputs the two are equally good."""
    m, n = 512, 1024
    w = torch.randn(n, k) * (1 + 3 * torch.rand(n, 1))
    q, s = (t.cuda() for t in _quantize_weight(w, "fp8_per_channel"))
    x = (torch.randn(m, k, device="cuda") * (1 + 5 * torch.rand(1, k, device="cuda"))).to(torch.bfloat16)
    c = K.caps(torch.device("cuda"))
    qx, sx = K._quant_torch(x, "row")
    exact_codes = (qx.double() * sx.double().view(-1, 1)) @ (q.double() * s.double().view(-1, 1)).t()
    exact = x.double() @ w.cuda().double().t()
    errs = {}
    for fast in (True, False):
        monkeypatch.setattr(_kernel_caps, "FAST_ACCUM", fast)
        y = K.linear_fast(x, q, s, None, "fp8_per_channel", c._replace(triton_quant=False))
        errs[fast] = (_rel(y, exact_codes), _rel(y, exact))
    print(k, errs)
    assert errs[False][0] < 2e-3, errs  # fp32 promotion: the bf16 output rounding (~1.1e-3) and little else
    assert errs[True][0] < 6e-3, errs  # fast accumulation: H100, 2.2e-3 at K = 4096, 3.4e-3 at K = 14336 ...
    assert errs[False][1] > 0.01, errs  # ... while the FP8 rounding of the inputs costs a few %
    assert errs[True][1] <= 1.03 * errs[False][1], errs


def _as_close_as_reference(out, ref, ref64, name):
    """Two bf16 pipelines that round an intermediate (gate_up, act(gate) * up) differently quantize it to
    different fp8 codes where a value sits near a rounding boundary: they then differ by about the FP8
    noise itself (~2-3% here), so the check is that the fast path is as close to the float64 truth as
    the reference path is (a wrong routing, scale or layout is off by > 50%)."""
    e_ref, e_out = _rel(ref.cpu(), ref64), _rel(out.cpu(), ref64)
    assert e_out <= 1.5 * e_ref + 5e-3, (name, e_out, e_ref)
    assert _rel(out, ref) < 0.08, (name, _rel(out, ref))


@cuda_only
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("t", [1, 3, 8, 64, 600])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_cuda_experts_fast_matches_reference(scheme, t, act):
    torch.manual_seed(t)
    e, h, i = 16, 256, 192
    m = _experts(e, h, i, scheme, device="cuda", act=nn.SiLU() if act == "silu" else nn.GELU())
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    idx, wts = _routing(t, 4, e, used=11, device="cuda", dtype=torch.bfloat16)  # 5 experts never routed
    ref = m.reference_forward(x, idx, wts)
    ref64 = _experts_ref64(m, x, idx, wts)
    for name, c in _variants().items():
        out = K.experts_fast(x, idx, wts, m.gate_up_proj, m.gate_up_proj_scale, m.down_proj, m.down_proj_scale,
                             m.act_fn, scheme, c)
        if out is None:
            assert scheme == "fp8_per_block" and not c.triton_gemm, name
            continue
        assert out.shape == x.shape and out.dtype == x.dtype, name
        _as_close_as_reference(out, ref, ref64, name)
    _as_close_as_reference(m(x, idx, wts), ref, ref64, "module")  # the module's entry point
    c = K.caps(torch.device("cuda"))
    if t <= K.MOE_GEMV_MAX_T:  # decode: the W8A16 pair kernels, never the grouped W8A8 GEMMs
        assert c.triton_gemv
        assert K.experts_fast(x, idx, wts, m.gate_up_proj, m.gate_up_proj_scale, m.down_proj, m.down_proj_scale,
                              m.act_fn, scheme, c._replace(triton_gemv=False)) is None


@cuda_only
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_expert_parallel_shards_sum_to_the_whole(scheme):
    torch.manual_seed(1)
    m = _experts(8, 256, 192, scheme, device="cuda")
    x = torch.randn(33, 256, device="cuda", dtype=torch.bfloat16)
    idx, wts = _routing(33, 4, 8, used=8, device="cuda", dtype=torch.bfloat16)
    whole = m.reference_forward(x, idx, wts).float()
    got = sum(_ep_shard(m.cpu(), s, 4).cuda()(x, idx, wts).float() for s in (0, 4))
    assert _rel(got, whole) < 0.05, _rel(got, whole)


@cuda_only
@pytest.mark.parametrize("counts", [[300, 0, 41, 700], [0, 0, 513, 0], [1000, 1, 1, 1]])
def test_cuda_tma_grouped_gemm_matches_the_pointer_kernel(counts):
    """The Hopper TMA grouped GEMM (the default for prefill-size groups when the probe accepts it): tiles that run past
    a group's rows or an expert's N rows into the next ones must not leak into the output; empty groups."""
    c = K.caps(torch.device("cuda"))
    if not c.triton_tma:
        pytest.skip(f"no TMA kernel here: {K.PROBE_LOG.get(torch.cuda.current_device(), {}).get('triton grouped gemm, TMA (Hopper)')}")
    e, n, k = len(counts), 384, 640  # N not a multiple of the 256-wide tile: the last tile reads the next expert
    qs = [_cuda_weight(n, k, "fp8_per_channel") for _ in range(e)]
    qw, sw = torch.stack([q for q, _ in qs]), torch.stack([s.view(-1) for _, s in qs])
    x = torch.randn(sum(counts), k, device="cuda")
    qx, sx = quantize_activation(x, "fp8_per_channel")
    sx = sx.view(-1)
    ids = torch.repeat_interleave(torch.arange(e, device="cuda"), torch.tensor(counts, device="cuda"))
    starts, ends = K._group_bounds(ids, e)
    got = K._launch_gemm_tma(qx, sx, qw, sw, None, starts, ends, torch.bfloat16, K._TMA_CONFIG)
    ref = K._launch_gemm(qx, sx, qw, sw, None, starts, ends, False, torch.bfloat16, (64, 128, 128, 4, 3))
    assert _rel(got, ref) < 1e-2
    assert torch.equal(K._launch_gemm(qx, sx, qw, sw, None, starts, ends, False, torch.bfloat16), got)  # the default
    start = 0
    for i, cnt in enumerate(counts):  # each group against the float64 product of its own expert
        if cnt:
            want = _ref_linear64(x[start:start + cnt].cpu(), qw[i].cpu(), sw[i].cpu(), None, "fp8_per_channel", decode_rule=False)
            assert _rel(got[start:start + cnt].cpu(), want) < 1e-2, i
        start += cnt


@cuda_only
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [1, 5, 256, 1024])
def test_cuda_linear_fast_silu_mul_input(scheme, m):
    """act=True (the down projection of a fused gated MLP): x2 = gate | up, the Linear's input is silu(gate) * up,
    fused into the activation quantization; every capability set against the reference of the unfused input."""
    n, k = 256, 640
    q, s = _cuda_weight(n, k, scheme)
    gate_up = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)
    h = K.silu_mul(gate_up)
    ref = K.reference_linear(h, q, s, None, scheme)
    assert torch.equal(K.reference_linear(gate_up, q, s, None, scheme, act=True), ref)
    for name, c in _variants().items():
        y = K.linear_fast(gate_up, q, s, None, scheme, c, act=True)
        if y is None:
            assert scheme == "fp8_per_block" and not c.triton_gemm and not c.blockwise, name
            continue
        assert y.shape == (m, n), name
        assert _rel(y, ref) < 1e-2, (name, _rel(y, ref))
        assert _rel(y, K.linear_fast(h, q, s, None, scheme, c)) < 1e-2, name


@cuda_only
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_compile_fullgraph(scheme, mode):
    """FP8Linear and FP8Experts compile with fullgraph=True (no graph breaks), also with CUDA graphs,
    and compute what eager computes."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    q, s = _cuda_weight(512, 1024, scheme)
    lin = FP8Linear(1024, 512, True, scheme, torch.bfloat16, device="cpu").cuda()
    lin.weight.data, lin.weight_scale.data = q, s
    lin.bias.data = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    clin = torch.compile(lin, fullgraph=True, mode=mode)
    for mm in (1, 8, 300):
        x = torch.randn(mm, 1024, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):  # CUDA graphs: warm-up, record, replay
            y = clin(x).clone()
        assert _rel(y, lin(x)) < 1e-2, mm
    m = _experts(8, 256, 128, scheme, device="cuda")
    cm = torch.compile(m, fullgraph=True, mode=mode)
    for t in (1, 4, 77):
        x = torch.randn(t, 256, device="cuda", dtype=torch.bfloat16)
        idx, wts = _routing(t, 2, 8, used=6, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            out = cm(x, idx, wts).clone()  # clone: CUDA-graph outputs are overwritten by the next replay
        _as_close_as_reference(out, m.reference_forward(x, idx, wts), _experts_ref64(m, x, idx, wts), t)


@cuda_only
@pytest.mark.parametrize("fuse_gate_up", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_cuda_generate_static_cache_compiled(tmp_path, arch, fuse_gate_up):
    """transformers' generate with a static cache (auto-compiled decode step, CUDA graphs) on an FP8
    model: runs, is reproducible, and a compiled forward gives the eager forward's logits."""
    import fp8stream
    from tiny_models import make_checkpoint

    torch._dynamo.reset()
    path, _ = make_checkpoint(arch, tmp_path)
    model = fp8stream.load(path, device="cuda", progress=False, fuse_gate_up=fuse_gate_up)
    ids = torch.randint(0, 256, (2, 12), device="cuda")
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids, **kw)
        compiled = [model.generate(ids, cache_implementation="static", **kw) for _ in range(3)]
        assert eager.shape == compiled[0].shape == (2, 20)
        assert torch.equal(compiled[1], compiled[2])  # CUDA-graph replays reproduce the recorded run
        # greedy tokens may differ where FP8 noise flips a near-tie, so compare logits of one forward
        lg_eager = model(ids).logits.float()
        lg_comp = torch.compile(model, fullgraph=False)(ids).logits.float()
    assert _rel(lg_comp, lg_eager) < 0.15
