"""Tensor and expert parallelism: which part of every parameter a rank holds, and the collectives that
put the parts back together in the forward pass (gpt-fast style: sharded weights plus forward hooks).

The layout comes from transformers' own plans, so new architectures need no code here:
  * `base_model_tp_plan` (and the causal LM class's `_tp_plan`, e.g. lm_head) for --tp N: a Linear
    styled "*colwise*" holds rows [r*N/t, (r+1)*N/t) of its [N, K] weight (and bias); "*rowwise*"
    holds columns [r*K/t, (r+1)*K/t) and its output is summed over ranks with one all_reduce (its bias
    lives on rank 0 only, the other ranks hold zeros, so it is added once); "packed_*" splits each
    half (gate / up) separately; "*_rep" / "*gather_output" all-gathers the output. Styles that do not
    split weights (replicated_*, gather, ep_router, sequence_parallel, ...) leave the module whole.
    Transformers' fused MoE experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) named in the plan
    are split along I (each rank its gate rows and its up rows, and the matching down columns) and
    their output all-reduced.
  * --ep: the fused experts are split along E instead: rank r holds experts [r*E/n, (r+1)*E/n),
    tokens routed elsewhere contribute nothing on this rank, and the experts' outputs are summed with
    one all_reduce. Attention and dense MLPs follow the TP plan (tp=N) or are replicated (tp=1).
TP and EP use the same group: the whole world (tp is 1 or the world size).
"""

from __future__ import annotations

import bisect
import math
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ._fp8_linear import _scale_shape
from .errors import Fp8StreamError, UnsupportedModelError
from .experts import FP8Experts
from .load_plan import Piece, TargetPlan
from .modules import FP8Linear, _is_fused_experts

# Styles that keep a module's weights whole on every rank (they only change gradients, routing or
# sequence layouts, none of which matter for inference with replicated activations).
_REPLICATED = ("replicate", "replicated_with_grad_allreduce", "gather", "isolated", "ep_router", "sequence_parallel",
               "local", "local_params", "moe_identity_expert", "embedding_rowwise", "embedding_colwise", "all_reduce")


@dataclass(frozen=True)
class Shard:
    """The part of one parameter a rank holds: `dim` split into `world` equal parts (`parts` > 1: each of
    that many equal sections, e.g. gate and up, is split on its own); `zero`: held as zeros (a rowwise
    bias on ranks other than 0)."""

    dim: int
    rank: int
    world: int
    parts: int = 1
    zero: bool = False

    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.zero:
            return shape
        out = list(shape)
        out[self.dim] //= self.world
        return tuple(out)


@dataclass
class Layout:
    """One rank's share of the model: parameter name -> Shard, module name -> collective after its forward."""

    rank: int
    world: int
    tp: int
    ep: int
    shards: dict[str, Shard] = field(default_factory=dict)
    reduce: list[str] = field(default_factory=list)  # all_reduce(sum) of the output
    gather: list[str] = field(default_factory=list)  # all_gather of the output along the last dim
    split_input: list[str] = field(default_factory=list)  # rowwise_rep: take this rank's slice of the input
    experts: dict[str, tuple[int, int]] = field(default_factory=dict)  # EP: module -> (first expert, count)


def _pattern(key: str) -> re.Pattern:
    return re.compile(r"\d+".join(re.escape(p) for p in key.split("*")))


def _plans(model: nn.Module) -> tuple[list[tuple[re.Pattern, str, str]], bool]:
    """(compiled pattern, style, plan key) over full module/parameter names; and whether an EP plan exists."""
    cfg = model.config
    prefix = getattr(model, "base_model_prefix", "") or ""
    has_base = prefix and hasattr(model, prefix)
    out = []
    for key, style in (getattr(cfg, "base_model_tp_plan", None) or {}).items():
        out.append((_pattern(f"{prefix}.{key}" if has_base else key), str(style), key))
    for key, style in (getattr(model, "_tp_plan", None) or {}).items():
        out.append((_pattern(key), str(style), key))
    return out, bool(getattr(cfg, "base_model_ep_plan", None))


def _style(name: str, plans) -> tuple[str, str] | None:
    for rx, style, key in plans:
        if rx.fullmatch(name):
            return style, key
    return None


def _check_divides(size: int, parts: int, what: str) -> None:
    if size % parts:
        raise UnsupportedModelError(f"{what} ({size}) does not divide into {parts} equal parts")


def plan_layout(model: nn.Module, tp: int, ep: bool, rank: int, world: int, tied: set[str] | frozenset = frozenset()) -> Layout:
    """The layout for `rank` of `world`; raises UnsupportedModelError on anything that does not split evenly.

    `model` is the meta model after FP8 modules were swapped in (kept full-precision Linears count too).
    """
    if tp not in (1, world):
        raise Fp8StreamError(f"tp={tp} but the process group has {world} ranks (tp must be 1 or the world size)")
    if world > 1 and tp == 1 and not ep:
        raise Fp8StreamError(f"{world} ranks but tp=1 and ep off: pass tp={world} and/or ep")
    cfg = model.config
    layout = Layout(rank, world, tp, world if ep else 1)
    plans, _has_ep_plan = _plans(model)
    if tp > 1:
        if not plans:
            raise UnsupportedModelError(f"model_type '{cfg.model_type}': transformers defines no tensor-parallel plan (base_model_tp_plan) for it")
        heads = getattr(cfg, "num_attention_heads", None)
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        if heads:
            _check_divides(heads, tp, f"tp={tp}: num_attention_heads")
        if kv:
            _check_divides(kv, tp, f"tp={tp}: num_key_value_heads")
    any_experts = False
    for name, module in model.named_modules():
        if isinstance(module, FP8Experts) or _is_fused_experts(module):
            any_experts = True
            _experts(name, module, layout, ep)
            continue
        if tp == 1 or not isinstance(module, (nn.Linear, FP8Linear)):
            continue
        found = _style(name, plans)
        if found is None:
            continue
        style, key = found
        if style in _REPLICATED or "colwise" not in style and "rowwise" not in style:
            if style not in _REPLICATED:
                raise UnsupportedModelError(f"'{name}': tensor-parallel style '{style}' (plan key '{key}') is not supported")
            continue
        if f"{name}.weight" in tied:
            continue  # tied to the embedding (replicated): keep whole
        parts = 2 if style.startswith("packed") else 1
        w = module.weight
        n, k = w.shape
        if "colwise" in style:
            _check_divides(n, parts * tp, f"tp={tp}: '{name}' ({style}) output features")
            layout.shards[f"{name}.weight"] = Shard(0, rank, tp, parts)
            if module.bias is not None:
                layout.shards[f"{name}.bias"] = Shard(0, rank, tp, parts)
            if style.endswith("_rep") or "gather" in style:
                layout.gather.append(name)
        else:
            if parts > 1:
                raise UnsupportedModelError(f"'{name}': tensor-parallel style '{style}' (packed input columns) is not supported")
            _check_divides(k, tp, f"tp={tp}: '{name}' ({style}) input features")
            layout.shards[f"{name}.weight"] = Shard(1, rank, tp)
            if module.bias is not None and rank != 0:
                layout.shards[f"{name}.bias"] = Shard(0, rank, tp, zero=True)
            layout.reduce.append(name)
            if style.endswith("_rep"):
                layout.split_input.append(name)
    if ep and not any_experts:
        raise UnsupportedModelError(f"ep: model_type '{cfg.model_type}' has no fused MoE experts to distribute")
    return layout


def _experts(name: str, module: nn.Module, layout: Layout, ep: bool) -> None:
    e = module.gate_up_proj.shape[0]
    two_i = module.gate_up_proj.shape[1]
    rank, world = layout.rank, layout.world
    if ep:
        if not isinstance(module, FP8Experts):
            raise UnsupportedModelError(f"ep: '{name}' is kept in full precision (--ignore); only FP8 experts can be expert-parallel")
        _check_divides(e, world, f"ep={world}: '{name}' number of experts")
        layout.shards[f"{name}.gate_up_proj"] = Shard(0, rank, world)
        layout.shards[f"{name}.down_proj"] = Shard(0, rank, world)
        layout.experts[name] = (rank * e // world, e // world)
        layout.reduce.append(name)
        return
    if layout.tp == 1:
        return
    # Fused experts are sharded the way transformers' own plans shard them (gate_up packed_colwise, down
    # rowwise, outputs summed), also where an older plan leaves them out (transformers 5.17's Qwen2-MoE):
    # every transformers MoE uses this one fused layout, and replicating the experts would keep nearly
    # the whole model on every GPU.
    _check_divides(two_i // 2, layout.tp, f"tp={layout.tp}: '{name}' expert intermediate size")
    layout.shards[f"{name}.gate_up_proj"] = Shard(1, rank, layout.tp, parts=2)
    layout.shards[f"{name}.down_proj"] = Shard(2, rank, layout.tp)
    layout.reduce.append(name)


def _meta(shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


def shard_meta(model: nn.Module, layout: Layout) -> None:
    """Give every sharded meta parameter its local shape (FP8 scales follow their weights)."""
    modules = dict(model.named_modules())
    for pname, shard in layout.shards.items():
        mod_name, _, attr = pname.rpartition(".")
        module = modules[mod_name]
        p = module._parameters[attr]
        module._parameters[attr] = _meta(shard.local_shape(tuple(p.shape)), p.dtype)
    for name, module in modules.items():
        if isinstance(module, FP8Linear):
            module.out_features, module.in_features = module.weight.shape
            module.weight_scale = _meta(_scale_shape(module.scheme, (), *module.weight.shape), torch.float32)
        elif isinstance(module, FP8Experts):
            for attr in ("gate_up_proj", "down_proj"):
                w = getattr(module, attr)
                setattr(module, f"{attr}_scale", _meta(_scale_shape(module.scheme, tuple(w.shape[:1]), *w.shape[1:]), torch.float32))
            module.num_experts = module.gate_up_proj.shape[0]
            module.intermediate_dim = module.down_proj.shape[-1]
            module.expert_start = layout.experts.get(name, (0, 0))[0]
            module.expert_parallel = name in layout.experts
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape


def _runs(shape: tuple[int, ...], shard: Shard) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """The global flat rows this rank holds, as (first row, count) runs in local order, and the column
    range [c0, c1) when the last dimension is split (flat rows: all dims but the last; a 1-D tensor's elements)."""
    rows_shape = shape[:-1] if len(shape) >= 2 else shape
    total = math.prod(rows_shape)
    if shard.zero:
        return [], None
    if len(shape) >= 2 and shard.dim == len(shape) - 1:
        width = shape[-1] // shard.world
        return [(0, total)], (shard.rank * width, (shard.rank + 1) * width)
    d = shard.dim
    outer, size, inner = math.prod(rows_shape[:d]), rows_shape[d], math.prod(rows_shape[d + 1:])
    section = size // shard.parts
    local = section // shard.world
    runs = []
    for o in range(outer):
        for j in range(shard.parts):
            runs.append(((o * size + j * section + shard.rank * local) * inner, local * inner))
    return runs, None


def local_plan(plan: TargetPlan, shard: Shard | None) -> TargetPlan:
    """The plan restricted to this rank's rows (and columns): pieces renumbered to local destination rows."""
    if shard is None:
        return plan
    runs, cols = _runs(plan.shape, shard)
    out = TargetPlan(plan.name, shard.local_shape(plan.shape), sources=list(plan.sources), cols=cols, sharded=True, zeros=shard.zero)
    at = 0
    pieces = sorted(plan.pieces, key=lambda p: p.dst_row)
    starts = [p.dst_row for p in pieces]
    for g0, n in runs:
        i = max(bisect.bisect_right(starts, g0) - 1, 0)
        while i < len(pieces) and pieces[i].dst_row < g0 + n:
            p = pieces[i]
            lo, hi = max(g0, p.dst_row), min(g0 + n, p.dst_row + p.rows)
            if lo < hi:
                out.pieces.append(Piece(p.key, p.src_row + lo - p.dst_row, at + lo - g0, hi - lo, p.shard))
            i += 1
        at += n
    return out


# ---- the forward pass: collectives as forward hooks ----


def install_hooks(model: nn.Module, layout: Layout, group=None) -> None:
    import torch.distributed as dist

    modules = dict(model.named_modules())

    def all_reduce(_module, _args, out):
        out = out.contiguous()
        dist.all_reduce(out, group=group)
        return out

    def all_gather(_module, _args, out):
        out = out.contiguous()
        parts = [torch.empty_like(out) for _ in range(layout.world)]
        dist.all_gather(parts, out, group=group)
        return torch.cat(parts, dim=-1)

    def split_input(_module, args):
        x = args[0]
        width = x.shape[-1] // layout.world
        return (x[..., layout.rank * width : (layout.rank + 1) * width], *args[1:])

    for name in layout.split_input:
        modules[name].register_forward_pre_hook(split_input)
    for name in layout.reduce:
        modules[name].register_forward_hook(all_reduce)
    for name in layout.gather:
        modules[name].register_forward_hook(all_gather)


# ---- the process group ----


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int
    group: object = None


def current_group(tp: int, ep: bool) -> Group | None:
    """The initialised default process group for tp/ep (None when tp == 1 and not ep); clear errors otherwise."""
    if tp < 1:
        raise Fp8StreamError(f"tp must be >= 1, got {tp}")
    if tp == 1 and not ep:
        return None
    import torch.distributed as dist

    what = f"tp={tp}" + (" with ep" if ep else "") if tp > 1 else "ep"
    if not (dist.is_available() and dist.is_initialized()):
        raise Fp8StreamError(f"{what} needs an initialised torch.distributed process group "
                             "(launch with torchrun --nproc-per-node N and call torch.distributed.init_process_group)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp not in (1, world):
        raise Fp8StreamError(f"tp={tp} but the process group has {world} ranks (tp must equal the world size)")
    local = int(os.environ.get("LOCAL_RANK", rank))
    return Group(rank, world, local)
