import pytest
import torch
from torch import nn

from fp8stream import kernels
from fp8stream._fp8_linear import fp8_linear
from fp8stream.experts import FP8Experts
from fp8stream.modules import FP8Linear, replace_with_fp8
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


# ---- gated MLPs: gate_proj and up_proj as one GEMM ----

class _Canonical(nn.Module):
    def __init__(self, h=64, i=96, act=None):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj, self.act_fn = nn.Linear(i, h, bias=False), act or nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _CanonicalAssigned(_Canonical):
    def forward(self, hidden_state):
        """A docstring does not matter."""
        down_proj = self.down_proj(self.act_fn(self.gate_proj(hidden_state)) * self.up_proj(hidden_state))
        return down_proj


class _Clamped(_Canonical):  # gpt-oss style: not the canonical function
    def forward(self, x):
        return self.down_proj((self.act_fn(self.gate_proj(x)) * self.up_proj(x)).clamp(-7, 7))


class _Swapped(_Canonical):  # gate and up exchanged: a different function of the same weights
    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


class _Inherited(_Canonical):  # no forward of its own: the canonical parent's is read
    pass


def _fp8_mlp(cls, scheme, h=64, i=128, act=None, device="cpu", dtype=torch.float32):
    """cls with FP8 gate / up / down in one gate|up storage, as the loader leaves a gated MLP; and whether it fused."""
    from fp8stream.modules import fuse_gate_up, fused_storage, row_parts

    torch.manual_seed(0)
    src = cls(h, i, act)
    m = cls(h, i, act)
    replace_with_fp8(m, scheme, [], dtype)
    parts = (m.gate_proj, m.up_proj)
    w, s = fused_storage(parts, device)
    for name, (wh, sh) in zip(("gate_proj", "up_proj"), zip(row_parts(w, parts), row_parts(s, parts))):
        q, qs = _quantize_weight(getattr(src, name).weight.detach(), scheme)
        wh.copy_(q)
        sh.copy_(qs.reshape(sh.shape))
        getattr(m, name).weight, getattr(m, name).weight_scale = nn.Parameter(wh, requires_grad=False), nn.Parameter(sh, requires_grad=False)
    q, qs = _quantize_weight(src.down_proj.weight.detach(), scheme)
    m.down_proj.weight, m.down_proj.weight_scale = (nn.Parameter(t.to(device), requires_grad=False) for t in (q, qs))
    return m, fuse_gate_up(m, w, s)


def test_gated_mlps_are_recognized_from_the_forward_source():
    from fp8stream.modules import gated_mlps

    def found(cls):
        m = cls(64, 128)
        replace_with_fp8(m, "fp8_per_channel", [], torch.float32)
        return gated_mlps(m) == [m]

    assert found(_Canonical) and found(_CanonicalAssigned) and found(_Inherited)
    assert not found(_Clamped) and not found(_Swapped)
    kept = _Canonical(64, 128)
    replace_with_fp8(kept, "fp8_per_channel", ["up_proj"], torch.float32)  # up kept in full precision: nothing to fuse
    assert gated_mlps(kept) == []
    odd = _Canonical(64, 144)  # per-block needs whole 128-row scale blocks in each half
    replace_with_fp8(odd, "fp8_per_block", [], torch.float32)
    assert gated_mlps(odd) == []


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [1, 5, 40])
def test_fused_gated_mlp_matches_float64(scheme, m):
    """One GEMM for gate|up and silu(gate) * up fused into the down projection's quantization compute the model's own
    function: float64 reference of the unfused formula, and the module's unfused forward (equal up to the float32
    summation order of a [2I]- vs two [I]-wide products, which some BLAS builds change)."""
    mlp, fused = _fp8_mlp(_Canonical, scheme)
    assert fused and mlp.forward.__func__ is not type(mlp).forward
    x = torch.randn(m, 64)
    g = _reference(x, mlp.gate_proj.weight, mlp.gate_proj.weight_scale, None, scheme).float()
    u = _reference(x, mlp.up_proj.weight, mlp.up_proj.weight_scale, None, scheme).float()
    ref = _reference(torch.nn.functional.silu(g) * u, mlp.down_proj.weight, mlp.down_proj.weight_scale, None, scheme)
    y = mlp(x)
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5
    assert _rel64(y, type(mlp).forward(mlp, x)) < 1e-5


def _rel64(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fused_gated_mlp_runs_its_own_forward_when_weights_move_or_hooks_are_set():
    mlp, _ = _fp8_mlp(_Canonical, "fp8_per_channel")
    x = torch.randn(7, 64)
    before = mlp(x)
    mlp.up_proj.weight.data = mlp.up_proj.weight.data.flip(0).contiguous()  # new storage: the fused copy is stale
    after = mlp(x)
    assert torch.equal(after, type(mlp).forward(mlp, x)) and _rel64(after, before) > 0.1
    mlp2, _ = _fp8_mlp(_Canonical, "fp8_per_channel")
    seen = []
    mlp2.gate_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    mlp2(x)
    assert seen == [(7, 128)]


def test_fused_gated_mlp_other_activation_and_compile():
    """A non-SiLU activation still runs gate|up as one GEMM (the activation in torch); no graph break either way."""
    for act in (nn.SiLU(), nn.GELU(approximate="tanh")):
        torch._dynamo.reset()
        mlp, fused = _fp8_mlp(_Canonical, "fp8_per_channel", act=act)
        assert fused
        x = torch.randn(3, 40, 64)
        ref = type(mlp).forward(mlp, x)
        assert _rel64(mlp(x), ref) < 1e-5
        torch.testing.assert_close(torch.compile(mlp, fullgraph=True, backend="eager")(x), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_fused_gated_mlp_matches_unfused_eager_and_compiled(scheme, mode):
    """On the GPU: one gate|up GEMM and silu(gate) * up fused into the down projection's quantization (a Triton
    kernel; under torch.compile an opaque custom op) against the module's own unfused forward, decode and prefill
    sizes, eager and compiled with fullgraph (and CUDA graphs)."""
    torch._dynamo.reset()
    mlp, fused = _fp8_mlp(_Canonical, scheme, h=512, i=1408, device="cuda", dtype=torch.bfloat16)
    assert fused
    compiled = torch.compile(mlp, fullgraph=True, mode=mode)
    src = _Canonical(512, 1408).to("cuda", torch.bfloat16)  # the full-precision weights _fp8_mlp quantized
    torch.manual_seed(0)
    src.load_state_dict(_Canonical(512, 1408).state_dict())
    for m in (1, 8, 300):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        unfused = type(mlp).forward(mlp, x)
        with torch.no_grad():
            full = src(x)
        for _ in range(3):  # CUDA graphs: warm-up, record, replay
            y = compiled(x).clone()
        for got in (mlp(x), y):
            # as accurate as the unfused forward: a 1-ulp difference of a bf16 gate/up output (GEMM summation order)
            # can move a per-tensor / per-block amax and re-round a whole tensor / block, so not bit-equal
            assert _rel64(got, full) <= 1.1 * _rel64(unfused, full) + 1e-3, m
            assert _rel64(got, unfused) < (1e-2 if scheme == "fp8_per_channel" else 0.06), m


def test_fused_weights_are_marked_static_as_dynamo_marks_them():
    mlp, _ = _fp8_mlp(_Canonical, "fp8_per_channel")
    from fp8stream.modules import STATIC_ADDRESS_MARK

    t = torch.empty(3)
    torch._dynamo.mark_static_address(t)
    assert getattr(t, STATIC_ADDRESS_MARK) == "unguarded"
    assert all(getattr(x, STATIC_ADDRESS_MARK) == "unguarded" for x in mlp.fp8_gate_up)


def test_fused_gated_mlp_keeps_two_projections_at_decode_sizes(monkeypatch):
    """Decode sizes (<= GEMV_MAX_M rows) run gate and up as their own W8A16 GEMMs; above, one [2I, K] GEMM."""
    import fp8stream.modules as M

    mlp, _ = _fp8_mlp(_Canonical, "fp8_per_channel")
    widths = []
    real = M.fp8_linear
    monkeypatch.setattr(M, "fp8_linear", lambda x, w, *a, **kw: widths.append(w.shape[0]) or real(x, w, *a, **kw))
    mlp(torch.randn(kernels.GEMV_MAX_M, 64))
    assert widths == [128, 128, 64]  # gate, up, down
    widths.clear()
    mlp(torch.randn(kernels.GEMV_MAX_M + 1, 64))
    assert widths == [256, 64]  # gate|up, down


def _qkv(scheme, sizes=(256, 128, 128), k=256, bias=True):
    """Three FP8Linears in one fused storage, as the loader leaves an attention's q / k / v, grouped (SharedInput)."""
    from fp8stream.modules import fuse_shared_input, fused_storage, row_parts

    torch.manual_seed(0)
    parts = tuple(FP8Linear(k, n, bias, scheme, torch.float32, device="cpu") for n in sizes)
    w, s = fused_storage(parts, "cpu")
    for p, wp, sp in zip(parts, row_parts(w, parts), row_parts(s, parts)):
        q, qs = _quantize_weight(torch.randn(p.out_features, k), scheme)
        wp.copy_(q)
        sp.copy_(qs.reshape(sp.shape))
        p.weight, p.weight_scale = nn.Parameter(wp, requires_grad=False), nn.Parameter(sp, requires_grad=False)
        if bias:
            p.bias = nn.Parameter(torch.randn(p.out_features), requires_grad=False)
    assert fuse_shared_input(parts, w, s)
    return parts


@pytest.mark.parametrize("scheme", SCHEMES)
def test_shared_input_runs_one_gemm_and_computes_what_each_part_computes(scheme, monkeypatch):
    """q, k, v on one input: one GEMM (any call order), each output what the part computes alone; another input for
    k (cross-attention) or a part whose weight was replaced: that part alone, still right; outputs computed for
    nothing turn the group off."""
    from fp8stream import modules

    parts = _qkv(scheme)
    group = parts[0].fp8_shared[0]
    widths = []
    real = modules.fp8_linear
    monkeypatch.setattr(modules, "fp8_linear", lambda x, w, *a, **kw: widths.append(w.shape[0]) or real(x, w, *a, **kw))

    def alone(p, x):
        return real(x, p.weight, p.weight_scale, p.bias, p.scheme)

    for m in (1, 8, 40):  # decode (W8A16) and prefill (W8A8) sizes
        x = torch.randn(2, m, 256)
        for order in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
            widths.clear()
            outs = {i: parts[i](x) for i in order}
            assert widths == [512], (m, order)  # one GEMM over the fused [q | k | v] rows
            for i, p in enumerate(parts):
                assert outs[i].shape == (2, m, p.out_features)
                assert _rel(outs[i], alone(p, x)) < 1e-6, (m, order, i)
    x, other = torch.randn(3, 256), torch.randn(3, 256)
    # an input changed in place between the calls: k and v compute again, from the new values
    q = parts[0](x)
    x.mul_(2)
    assert _rel(parts[1](x), alone(parts[1], x)) < 1e-6
    assert _rel(q, alone(parts[0], x / 2)) < 1e-6
    assert not group.enabled  # k's kept output (for the old x) went unused: the group now runs its parts alone
    widths.clear()
    for p in parts:
        assert _rel(p(other), alone(p, other)) < 1e-6
    assert widths == [256, 128, 128]

    parts = _qkv(scheme)
    group = parts[0].fp8_shared[0]
    parts[1].weight = nn.Parameter(torch.zeros_like(parts[1].weight), requires_grad=False)  # replaced by the user
    widths.clear()
    outs = [p(x) for p in parts]
    assert torch.count_nonzero(outs[1] - parts[1].bias) == 0  # its own (zero) weight, not the fused storage's
    assert _rel(outs[2], alone(parts[2], x)) < 1e-6 and group.enabled
    monkeypatch.setattr(modules, "FUSE_QKV", False)
    widths.clear()
    [p(x) for p in parts]
    assert widths == [256, 128, 128]


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
