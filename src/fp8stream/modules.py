"""FP8Linear (in place of nn.Linear and transformers' Conv1D), the gated-MLP fusion (gate_proj and up_proj as one GEMM),
the shared-input fusion (an attention's q_proj, k_proj and v_proj as one GEMM), and the function that swaps FP8
modules into a meta-device model (FP8Linear, or one of experts.py's modules for transformers' fused MoE experts), with
the coverage report of what it swapped.

The weight and scale layouts and the FP8 matmul (fast CUDA paths of kernels.py, float32 reference elsewhere) are
_fp8_linear.py's.
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import re
import textwrap
import types
import weakref
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from . import kernels
from ._fp8_linear import _empty_param, _scale_shape, fp8_linear
from .errors import UnsupportedModelError
from .experts import FP8DenseExperts, FP8Experts, FP8GptOssExperts
from .quantize import BLOCK, FP8_DTYPE


class FP8Linear(nn.Module):
    """Drop-in for nn.Linear holding an fp8 weight and its scales (created on the meta device, filled by the loader)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str, dtype: torch.dtype, device="meta",
                 transposed_source: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        # in place of a transformers Conv1D (GPT-2 family): the checkpoint stores this weight as [in, out]
        self.transposed_source = transposed_source
        self.weight = _empty_param((out_features, in_features), FP8_DTYPE, device)
        self.weight_scale = _empty_param(_scale_shape(scheme, (), out_features, in_features), torch.float32, device)
        self.bias = _empty_param((out_features,), dtype, device) if bias else None

    # (SharedInput, this module's index in it) once the loader put it in a shared-input group (fuse_shared_input)
    fp8_shared: tuple[SharedInput, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_shared is not None:
            y = self.fp8_shared[0].output(self, self.fp8_shared[1], x)
            if y is not None:
                return y
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.scheme)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, scheme={self.scheme}"


# ---- gated MLPs: gate_proj and up_proj as one GEMM ----

_CANONICAL_GATED = "self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))"
_GATED_FORWARD: dict[type, bool] = {}


def _is_canonical_gated_forward(cls: type) -> bool:
    """True when cls.forward(self, x) is exactly `return self.down_proj(self.act_fn(self.gate_proj(x)) *
    self.up_proj(x))` (or assigns that to a name and returns it), read from its source: 134 transformers MLP
    classes (Llama, Qwen2/3, Mistral, the Qwen MoE shared experts...). Anything else keeps its own forward."""
    if cls not in _GATED_FORWARD:
        _GATED_FORWARD[cls] = _read_gated_forward(cls)
    return _GATED_FORWARD[cls]


def _read_gated_forward(cls: type) -> bool:
    fn = getattr(cls, "forward", None)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    f = tree.body[0] if tree.body else None
    if not isinstance(f, ast.FunctionDef) or f.decorator_list:
        return False
    a = f.args
    if len(a.args) != 2 or a.posonlyargs or a.vararg or a.kwonlyargs or a.kwarg or a.defaults:
        return False
    want = ast.dump(ast.parse(_CANONICAL_GATED.format(x=a.args[1].arg), mode="eval").body)
    body = [st for st in f.body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]  # docstring
    if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
        return ast.dump(body[0].value) == want
    if (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
            and isinstance(body[0].targets[0], ast.Name) and isinstance(body[1], ast.Return)
            and isinstance(body[1].value, ast.Name) and body[1].value.id == body[0].targets[0].id):
        return ast.dump(body[0].value) == want
    return False


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """MLP modules whose gate_proj and up_proj can run as one FP8 GEMM: the canonical gated forward (above), gate and
    up both FP8Linear of one shape and scheme without bias (fp8_per_block: whole 128-row scale blocks)."""
    out = []
    for module in model.modules():
        gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
        if not (isinstance(gate, FP8Linear) and isinstance(up, FP8Linear) and isinstance(getattr(module, "down_proj", None), nn.Module)):
            continue
        if (gate.bias is not None or up.bias is not None or gate.scheme != up.scheme
                or (gate.in_features, gate.out_features) != (up.in_features, up.out_features)
                or (gate.scheme == "fp8_per_block" and gate.out_features % BLOCK)):
            continue
        if _is_canonical_gated_forward(type(module)):
            out.append(module)
    return out


def fused_storage(parts: tuple[FP8Linear, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty storage for sibling FP8Linears of one in_features and scheme as one [sum of N, K] weight and its scales:
    the loader fills each part's rows (row_parts), then fuse_gate_up / fuse_shared_input run them as one GEMM."""
    n, k = sum(p.out_features for p in parts), parts[0].in_features
    return (torch.empty(n, k, dtype=FP8_DTYPE, device=device),
            torch.empty(_scale_shape(parts[0].scheme, (), n, k), dtype=torch.float32, device=device))


def row_parts(t: torch.Tensor, parts: tuple[FP8Linear, ...]) -> list[torch.Tensor]:
    """Each part's rows of a fused_storage weight or scale, as views, in order (block scales: 128-row blocks)."""
    unit = sum(p.out_features for p in parts) // t.shape[0]
    return list(t.split([p.out_features // unit for p in parts]))


def fuse_gate_up(mlp: nn.Module, weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """If mlp's loaded gate and up parameters are the two halves of (weight, weight_scale) (fused_storage), make its
    forward run them as one GEMM and fuse silu(gate) * up into the down projection's activation quantization.
    Same function (the same quantization of the same inputs); fewer, larger kernels. False if they are not."""
    if not _halves_of(mlp, weight, weight_scale):
        return False
    _mark_static(weight, weight_scale)
    mlp.fp8_gate_up = GateUp(weight, weight_scale)
    mlp.forward = types.MethodType(_gated_forward, mlp)
    return True


STATIC_ADDRESS_MARK = "_dynamo_static_input_type"  # tests/test_modules.py checks that mark_static_address sets it


def _mark_static(*tensors: torch.Tensor | None) -> None:
    # A fused storage is not a parameter or buffer: marked static for CUDA graphs (no per-replay copy of a graph
    # input), as torch._dynamo.mark_static_address(t) marks it, without importing dynamo in a load (unguarded: one
    # compiled layer serves every layer's weights).
    for t in tensors:
        if t is not None:
            setattr(t, STATIC_ADDRESS_MARK, "unguarded")


class GateUp(NamedTuple):
    weight: torch.Tensor  # [2N, K] fp8: gate_proj's rows, then up_proj's
    weight_scale: torch.Tensor


def _halves_of(mlp: nn.Module, weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    return _parts_of((mlp.gate_proj, mlp.up_proj), weight, weight_scale)


def _parts_of(parts: tuple[FP8Linear, ...], weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """True when the parts' weights and scales are, in order, the row_parts of (weight, weight_scale). Pointer
    arithmetic only, no views made: every eager gated-MLP call checks it."""
    for whole, attr in ((weight, "weight"), (weight_scale, "weight_scale")):
        ptr, rows = whole.data_ptr(), 0
        for m in parts:
            t = getattr(m, attr)
            if t.data_ptr() != ptr:
                return False
            ptr, rows = ptr + t.nbytes, rows + t.shape[0]
        if rows != whole.shape[0]:
            return False
    return True


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _gated_forward(self, x: torch.Tensor) -> torch.Tensor:
    f, gate, up, down = self.fp8_gate_up, self.gate_proj, self.up_proj, self.down_proj
    # Weights replaced since the load (e.g. `.data = ...`), or hooks to run: the model's own forward. Every eager call
    # checks the pointers; dynamo cannot compare them, so a compiled forward trusts the load.
    moved = not torch.compiler.is_compiling() and not _halves_of(self, f.weight, f.weight_scale)
    # Decode sizes (W8A16 gemv) keep the two projections: with the fused gemv, compiled decode b1 measured 127 vs 156
    # tok/s unfused (H100, Llama-8B; one run each); with this fallback both take 4.68 ms of kernels per token.
    decode = x.numel() <= kernels.GEMV_MAX_M * x.shape[-1]
    if moved or decode or _hooked(gate) or _hooked(up):
        return type(self).forward(self, x)
    gate_up = fp8_linear(x, f.weight, f.weight_scale, None, gate.scheme)
    if isinstance(down, FP8Linear) and not _hooked(down) and kernels.is_silu(self.act_fn):
        return fp8_linear(gate_up, down.weight, down.weight_scale, down.bias, down.scheme, act=True)
    g, u = gate_up.chunk(2, dim=-1)
    return down(self.act_fn(g) * u)


# ---- shared input: an attention's q_proj, k_proj and v_proj as one GEMM ----

# FP8STREAM_FUSE_QKV=0: every projection runs alone again (on the same storage; an A/B knob for benchmarks).
FUSE_QKV = os.environ.get("FP8STREAM_FUSE_QKV", "1") != "0"
_QKV = ("q_proj", "k_proj", "v_proj")


def qkv_groups(model: nn.Module) -> list[tuple[FP8Linear, ...]]:
    """(q_proj, k_proj, v_proj) of every module that has all three as FP8Linear of one in_features and scheme, all with
    or all without bias (fp8_per_block: whole 128-row scale blocks): they can share one storage (fused_storage)."""
    out = []
    for module in model.modules():
        parts = tuple(getattr(module, name, None) for name in _QKV)
        if not all(isinstance(p, FP8Linear) and not p.transposed_source for p in parts):
            continue
        q = parts[0]
        if any(p.in_features != q.in_features or p.scheme != q.scheme or (p.bias is None) != (q.bias is None) for p in parts):
            continue
        if q.scheme == "fp8_per_block" and any(p.out_features % BLOCK for p in parts):
            continue
        out.append(parts)
    return out


def fuse_shared_input(parts: tuple[FP8Linear, ...], weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """If the parts' loaded weights are the row_parts of (weight, weight_scale), make them one SharedInput group (their
    biases, if any, copied into one tensor the parts then view). False if they are not."""
    if not _parts_of(parts, weight, weight_scale):
        return False
    bias = None
    if parts[0].bias is not None:
        bias = torch.cat([p.bias.detach() for p in parts])
        for p, b in zip(parts, bias.split([p.out_features for p in parts])):
            p.bias.data = b
    group = SharedInput(parts, weight, weight_scale, bias)
    _mark_static(weight, weight_scale, bias)
    for i, p in enumerate(parts):
        p.fp8_shared = (group, i)
    return True


class SharedInput:
    """Sibling projections of one input (an attention's q, k, v) as one GEMM: the first of them called with an input
    computes every part's output over the fused weight and keeps the others' (column views) for their own calls with
    that same tensor, unchanged (version counter); anything else makes a part compute alone, from its own parameters,
    so the function is the same (same weights, same per-column products) whatever the caller does. A group whose kept
    outputs go unused (e.g. cross-attention: k and v from another input) runs its parts alone from then on."""

    def __init__(self, parts: tuple[FP8Linear, ...], weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None):
        self.weight, self.weight_scale, self.bias, self.scheme = weight, weight_scale, bias, parts[0].scheme
        self.sizes = [p.out_features for p in parts]
        self._views = [(w.data_ptr(), s.data_ptr()) for w, s in zip(row_parts(weight, parts), row_parts(weight_scale, parts))]
        self._bias_ptrs = [b.data_ptr() for b in bias.split(self.sizes)] if bias is not None else None
        self.enabled = True
        self._pending: tuple[weakref.ref, int | None, list[torch.Tensor | None]] | None = None

    def _intact(self, part: FP8Linear, i: int) -> bool:
        # weights replaced since the load (`.data = ...`, `.to()`, a deepcopy): that part is not in the fused storage
        return ((part.weight.data_ptr(), part.weight_scale.data_ptr()) == self._views[i]
                and (part.bias is None) == (self._bias_ptrs is None)
                and (part.bias is None or part.bias.data_ptr() == self._bias_ptrs[i]))

    def output(self, part: FP8Linear, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Part i's output for x, or None: the part computes alone (disabled, compiling: dynamo keeps no Python
        state between calls, or its weights moved)."""
        if not (FUSE_QKV and self.enabled) or torch.compiler.is_compiling() or not self._intact(part, i):
            return None
        version = None if x.is_inference() else x._version
        p = self._pending
        if p is not None and p[0]() is x and p[1] == version and p[2][i] is not None:
            y, p[2][i] = p[2][i], None
            if not any(t is not None for t in p[2]):
                self._pending = None
            return y
        if p is not None and any(t is not None for t in p[2]):
            self.enabled, self._pending = False, None  # outputs computed for nothing: this caller does not share
            return None
        outs: list[torch.Tensor | None] = list(fp8_linear(x, self.weight, self.weight_scale, self.bias, self.scheme).split(self.sizes, dim=-1))
        y, outs[i] = outs[i], None
        self._pending = (weakref.ref(x), version, outs)
        return y


_SETUP_METHODS = {"__init__", "_init_weights", "reset_parameters", "init_weights", "extra_repr", "__repr__"}


@functools.cache
def _direct_weight_reads(cls: type) -> frozenset[str]:
    """Children whose `.weight` the code of `cls` (and its bases up to nn.Module) reads itself, outside set-up
    methods: e.g. Mamba's mixer computes `self.dt_proj.weight @ x`. Such a Linear must stay a Linear (an FP8
    weight there would be used as if it were bf16)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith("torch."):
            continue
        for attr, fn in vars(klass).items():
            if attr in _SETUP_METHODS or not callable(fn):
                continue
            try:
                src = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            names.update(re.findall(r"\bself\.(\w+)\.weight\b", src))
    return frozenset(names)


def _read_directly(model: nn.Module, name: str) -> bool:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return child in _direct_weight_reads(type(parent))


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2, OpenAI GPT, ImageGPT...): a Linear whose weight is stored [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D) and tuple(module.weight.shape) == (module.nx, module.nf)


def _is_fused_experts(module: nn.Module) -> bool:
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3 and down.dim() == 3


def _is_gpt_oss_experts(module: nn.Module) -> bool:
    gu, down = module.gate_up_proj, module.down_proj
    e, h, two_i = gu.shape
    bias_gu, bias_down = getattr(module, "gate_up_proj_bias", None), getattr(module, "down_proj_bias", None)
    return (tuple(down.shape) == (e, two_i // 2, h) and callable(getattr(type(module), "_apply_gate", None))
            and hasattr(module, "alpha") and hasattr(module, "limit") and isinstance(bias_gu, nn.Parameter)
            and isinstance(bias_down, nn.Parameter) and tuple(bias_gu.shape) == (e, two_i) and tuple(bias_down.shape) == (e, h))


def _is_dense_transposed_experts(module: nn.Module) -> bool:
    """Llama 4's experts layout and contract (see FP8DenseExperts)."""
    gu, down = module.gate_up_proj, module.down_proj
    e, h, two_i = gu.shape
    if two_i % 2 or tuple(down.shape) != (e, two_i // 2, h) or not hasattr(module, "act_fn") or getattr(module, "has_bias", False):
        return False
    try:
        params = list(inspect.signature(type(module).forward).parameters)
    except (TypeError, ValueError):
        return False
    return params == ["self", "hidden_states"]


def _check_standard_experts(name: str, module: nn.Module) -> None:
    e, two_i, h = module.gate_up_proj.shape
    if getattr(module, "has_bias", False) or getattr(module, "is_transposed", False) or not hasattr(module, "act_fn"):
        raise UnsupportedModelError(
            f"{name} ({type(module).__name__}): experts with biases / transposed layout / custom gating are not "
            "supported in FP8; keep them in full precision with --ignore"
        )
    if tuple(module.down_proj.shape) != (e, h, two_i // 2) or two_i % 2:
        raise UnsupportedModelError(f"{name}: unexpected experts shapes {tuple(module.gate_up_proj.shape)} / {tuple(module.down_proj.shape)}")


_LAYER = re.compile(r"^(.*\blayers)\.(\d+)\.")
# keep_sensitive: what it keeps and why (ACCURACY.md, "Per-layer sensitivity").
SENSITIVE_RULE = ("the first and the last decoder layer: the most sensitive to weight quantization on "
                  "SmolLM2-135M (per-layer KL ~1.5-2x the median, ACCURACY.md)")


def sensitive_modules(model: nn.Module) -> list[str]:
    """The Linear / fused-experts modules of the first and the last decoder layer (`...layers.N.`).

    Decided from module names alone, so it needs no weights and no calibration data; [] for a model
    without numbered layers.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_fused_experts(m)]
    nums = sorted({int(mm.group(2)) for n in names if (mm := _LAYER.match(n))})
    if not nums:
        return []
    ends = {nums[0], nums[-1]}
    return [n for n in names if (mm := _LAYER.match(n)) and int(mm.group(2)) in ends]


def replace_with_fp8(
    model: nn.Module, scheme: str, ignore: Iterable[str], dtype: torch.dtype
) -> tuple[list[str], list[str]]:
    """Swap every covered nn.Linear / transformers Conv1D / fused experts module of a meta-device model for its FP8
    version (a Conv1D, weight stored [in, out], becomes an FP8Linear with `transposed_source`).

    A module is kept in full precision when a regex in `ignore` matches its name (re.search), or when
    it is a Linear / Conv1D whose in/out features are not multiples of 16 (the FP8 GEMM's constraint; such
    layers are tiny: routers, shared-expert gates). Returns (quantized module names, kept Linear names).
    """
    patterns = [re.compile(p) for p in ignore]
    quantized, kept = [], []
    for name, module in list(model.named_modules()):
        is_linear = isinstance(module, nn.Linear)
        conv1d = not is_linear and _is_conv1d(module)
        is_experts = not (is_linear or conv1d) and _is_fused_experts(module)
        if not (is_linear or conv1d or is_experts):
            continue
        if any(p.search(name) for p in patterns):
            kept.append(name)
            continue
        if is_linear or conv1d:
            n_in, n_out = (module.nx, module.nf) if conv1d else (module.in_features, module.out_features)
            if n_in % 16 or n_out % 16 or _read_directly(model, name):
                kept.append(name)
                continue
            new = FP8Linear(n_in, n_out, module.bias is not None, scheme, dtype, transposed_source=conv1d)
        elif _is_dense_transposed_experts(module):
            new = FP8DenseExperts(module, scheme)
        elif _is_gpt_oss_experts(module):
            new = FP8GptOssExperts(module, scheme, dtype)
        else:
            _check_standard_experts(name, module)
            new = FP8Experts(module, scheme)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        quantized.append(name)
    return quantized, kept


class Coverage(NamedTuple):
    """How much of a model's weights an FP8 swap covers, in parameter elements (= bytes at the checkpoint dtype).

    `eligible`: every >= 2-D parameter outside the input / output embeddings (what a user expects in FP8);
    `deliberate`: the part kept on purpose (--ignore, routers, keep_sensitive, full-precision modules of a
    pre-quantized checkpoint); `unhandled`: {module class: [parameter names]} of the rest that is not FP8."""

    quantized: int
    eligible: int
    deliberate: int
    unhandled: dict[str, list[str]]

    @property
    def fraction(self) -> float:
        return self.quantized / self.eligible if self.eligible else 1.0

    @property
    def expected_fraction(self) -> float:
        """The quantized share of what was not kept on purpose."""
        expected = self.eligible - self.deliberate
        return self.quantized / expected if expected > 0 else 1.0


def coverage(model: nn.Module, deliberate: Iterable[str]) -> Coverage:
    """After replace_with_fp8: the FP8 share of `model`'s weights; `deliberate` are the ignore regexes the user or the
    defaults chose (a module they match counts as kept on purpose)."""
    patterns = [re.compile(p) for p in deliberate]
    skip = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    quantized = eligible = kept_on_purpose = 0
    unhandled: dict[str, list[str]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in skip or isinstance(module, nn.Embedding):
            continue
        on_purpose = any(p.search(name) for p in patterns)
        for attr, p in module._parameters.items():
            if p is None or p.dim() < 2 or id(p) in seen or attr.endswith("_scale"):
                continue
            seen.add(id(p))
            eligible += p.numel()
            if isinstance(module, (FP8Linear, FP8Experts)):
                if p.dtype != FP8_DTYPE:  # an FP8 module's biases: not weights a user expects in FP8
                    eligible -= p.numel()
                    continue
                quantized += p.numel()
            elif on_purpose:
                kept_on_purpose += p.numel()
            else:
                why = type(module).__name__
                if (isinstance(module, nn.Linear) or _is_conv1d(module)) and name and _read_directly(model, name):
                    why += f" (weight read directly by {type(model.get_submodule(name.rpartition('.')[0])).__name__})"
                elif isinstance(module, nn.Linear) or _is_conv1d(module):
                    why += " (dims not multiples of 16)"
                unhandled.setdefault(why, []).append(f"{name}.{attr}" if name else attr)
    return Coverage(quantized, eligible, kept_on_purpose, unhandled)
