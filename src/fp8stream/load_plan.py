"""Load plan: which rows of which checkpoint tensor go to which rows of which model parameter.

The model is built from config.json with transformers' own class, parameters on the meta device.
The on-disk -> in-model mapping is transformers' own: its checkpoint conversion mapping renames keys
(WeightRenaming) and fuses tensors (WeightConverter, e.g. per-expert w1/w3 -> experts.gate_up_proj).
We never hand-write a per-model table. To learn where every source row lands in a fused parameter we
run the converter's own operations once on tiny *probe* tensors ([rows, 1], each value the global index
of a source row), so the result's layout is exactly what transformers would build, without reading
a byte of weights. A conversion that moves data across the last (column) dimension cannot be
streamed row-wise and is reported as unsupported rather than guessed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from ._renames import _expert_members, _Renamer
from .checkpoint import FLOAT_SOURCE_DTYPES, Checkpoint, TensorInfo
from .errors import CheckpointError, UnsupportedModelError
from .quantize import BLOCK, FP8_DTYPE


@dataclass(frozen=True)
class Piece:
    """Rows [src_row, src_row + rows) of checkpoint tensor `key` -> flat rows [dst_row, ...) of the target."""

    key: str
    src_row: int
    dst_row: int
    rows: int
    shard: int  # index of the checkpoint tensor among the target's sources (per-tensor scales are per shard)


@dataclass
class TargetPlan:
    name: str  # parameter name in the model
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # checkpoint keys, in shard order
    # tensor / expert parallel (parallel.local_plan): this rank's part only. `cols`: the column range
    # [c0, c1) of every source row that is read; `zeros`: nothing is read, the rank holds zeros.
    cols: tuple[int, int] | None = None
    sharded: bool = False
    zeros: bool = False
    # the checkpoint stores the parameter transposed (Conv1D [in, out] -> FP8Linear [out, in]): destination row r
    # is column r of the source (one piece); `shape` stays the checkpoint's
    transposed: bool = False


def _conversions(model):
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # older transformers: checkpoints already match module names
        return [], []
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _natural_order(keys) -> list[str]:
    """`keys` sorted with their numbers compared as numbers ('layers.2' before 'layers.10')."""
    parts: dict[str, tuple[int, int, str]] = {}  # one sort key per distinct dot-separated part (most repeat)

    def natural_key(key: str):
        out = []
        for p in key.split("."):
            k = parts.get(p)
            if k is None:
                # (0, n) for a number, (1, text) otherwise: a key with 'x0' where others have '0' must still sort, not raise
                k = parts[p] = (0, int(p), "") if p.isascii() and p.isdigit() else (1, 0, p)
            out.append(k)
        return out, key

    return sorted(keys, key=natural_key)


def build_plan(model: nn.Module, ckpt: Checkpoint, *, scale_suffix: str | None = None) -> dict[str, TargetPlan]:
    """Map every checkpoint tensor onto the (meta) model's parameters; raise on anything that does not fit.

    `scale_suffix` ('weight_scale' / 'weight_scale_inv'): a pre-quantized FP8 checkpoint. F8_E4M3
    weights are then planned like any weight, and each '<module>.<scale_suffix>' next to an FP8
    '<module>.weight' is set aside: its rows follow the weight's (see `scale_pieces`).
    """
    meta = dict(model.state_dict(keep_vars=True))
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    ignore_unexpected = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    renamings, converters = _conversions(model)
    rename = _Renamer(renamings, converters, getattr(model, "base_model_prefix", None), meta)

    plans: dict[str, TargetPlan] = {}
    groups: dict[tuple[int, str], list[tuple[str, str]]] = defaultdict(list)
    fp8_ok = scale_suffix is not None
    conv_of: dict[str, object] = {}  # converter source pattern -> the first converter that has it
    for c in converters:
        for p in c.source_patterns:
            conv_of.setdefault(p, c)
    for key in _natural_order(ckpt.tensors):
        info = ckpt.tensors[key]
        if fp8_ok and key.endswith("." + scale_suffix):
            weight = ckpt.tensors.get(key[: -len(scale_suffix)] + "weight")
            if weight is None or weight.dtype != FP8_DTYPE:
                raise CheckpointError(f"{info.file}: unexpected tensor '{key}' (no FP8 weight '{key[: -len(scale_suffix)]}weight' next to it)")
            continue
        target, pattern, loose = rename(key)
        if loose is not None:
            raise CheckpointError(f"{info.file}: unexpected tensor '{key}' (it only loosely resembles the checkpoint name pattern '{loose}')")
        if pattern is not None:
            conv = conv_of[pattern]
            _check_float(info, fp8_ok)
            groups[(id(conv), target)].append((pattern, key))
            continue
        if target in tied:
            continue  # e.g. lm_head.weight saved next to the embedding it is tied to: the tie wins
        if target not in meta:
            if any(p.search(key) for p in ignore_unexpected) or "rotary_emb.inv_freq" in key:
                continue
            raise CheckpointError(f"{info.file}: unexpected tensor '{key}' (the {type(model).__name__} built from config.json has no parameter '{target}')")
        expected = tuple(meta[target].shape)
        if info.shape != expected:
            raise CheckpointError(f"{info.file}: tensor '{key}' has shape {list(info.shape)} but the model's '{target}' is {list(expected)}")
        if target in params:
            _check_float(info, fp8_ok)
        if target in plans:
            raise CheckpointError(f"{info.file}: tensors '{plans[target].sources[0]}' and '{key}' both map to the model's '{target}'")
        plan = TargetPlan(target, expected, sources=[key])
        plan.pieces.append(Piece(key, 0, 0, info.flat_shape[0] if info.shape else 1, 0))
        plans[target] = plan

    for (conv_id, target), members in groups.items():
        module = target.rpartition(".")[0]
        if target not in meta and not any(k.startswith(module + ".") for k in meta):
            key = members[0][1]
            raise CheckpointError(f"{ckpt.tensors[key].file}: unexpected tensor '{key}' (the {type(model).__name__} built from config.json has no '{target}')")
    probed: dict = {}  # every layer of a model fuses the same shapes the same way: probe each kind once
    for (conv_id, target), members in groups.items():
        conv = next(c for c in converters if id(c) == conv_id)
        members = _expert_members(conv, target, members, ckpt, renamings, meta)
        for plan in _probe_converter(model, conv, target, members, ckpt.tensors, meta, probed):
            if plan.name in plans:
                raise CheckpointError(f"{ckpt.tensors[plans[plan.name].sources[0]].file}: tensor '{plans[plan.name].sources[0]}' and tensors like '{members[0][1]}' both map to the model's '{plan.name}'")
            plans[plan.name] = plan

    missing = [n for n in params if n not in plans and n not in tied]
    if missing:
        raise CheckpointError(f"{ckpt.path}: checkpoint has no tensor for parameter '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return plans


def _check_float(info: TensorInfo, fp8_ok: bool = False) -> None:
    if fp8_ok and info.dtype == FP8_DTYPE:
        return
    if info.dtype not in FLOAT_SOURCE_DTYPES:
        raise CheckpointError(f"{info.file}: tensor '{info.key}' has dtype {str(info.dtype).removeprefix('torch.')}, expected a float weight (bf16/fp16/fp32)")


def _probe_converter(model, conv, layer_name, members, infos, meta, cache: dict | None = None) -> list[TargetPlan]:
    """Run a WeightConverter's operations on [rows, 1] index tensors to learn each source row's destination.

    The result depends only on the converter and the members' patterns and shapes, so `cache` (one per
    plan) keeps it: the first layer is probed, the other layers reuse its runs with their own keys.
    """
    keys = [key for _, key in members]
    shapes = [infos[key].shape for key in keys]
    for key, src_shape in zip(keys, shapes):
        if len(src_shape) not in (1, 2):
            raise UnsupportedModelError(f"{infos[key].file}: tensor '{key}' ({len(src_shape)}-D) feeds a fused parameter; only 1-D/2-D sources can be streamed")
    signature = (id(conv), tuple(zip([pattern for pattern, _ in members], shapes)))
    widths = {src_shape[-1] for src_shape in shapes if len(src_shape) == 2}
    runs = cache.get(signature) if cache is not None else None
    if runs is None:
        runs = _probe_runs(model, conv, layer_name, members, infos)
        if cache is not None:
            cache[signature] = runs

    full = layer_name.replace("*.", "0.")
    plans = []
    for tpat, probe_shape, pieces, first_seen in runs:
        prefix, _, suffix = full.partition(tpat) if tpat in full else ("", "", "")
        name = prefix + tpat + suffix if tpat in full else tpat
        if name not in meta:
            raise CheckpointError(f"{infos[members[0][1]].file}: tensors like '{members[0][1]}' convert to '{name}', which the model does not have")
        shape = tuple(meta[name].shape)
        two_d = len(widths) > 0
        if two_d and (widths != {shape[-1]} or probe_shape != shape[:-1] + (1,)):
            if len(probe_shape) >= 2 and probe_shape[-1] != 1:
                raise UnsupportedModelError(f"'{name}': its checkpoint conversion ({', '.join(type(o).__name__ for o in conv.operations)}) moves data across columns; cannot stream it")
            raise CheckpointError(f"{infos[keys[0]].file}: tensors like '{keys[0]}' (width {sorted(widths)}, {len(keys)} tensors) do not fill '{name}' of shape {list(shape)}")
        if not two_d and probe_shape != shape:
            raise CheckpointError(f"{infos[keys[0]].file}: tensors like '{keys[0]}' do not fill '{name}' of shape {list(shape)}")
        if isinstance(pieces, str):
            raise UnsupportedModelError(f"'{name}': {pieces}")
        plan = TargetPlan(name, shape, sources=[keys[s_] for s_ in first_seen])
        plan.pieces.extend(Piece(keys[s_], src_row, d0, n, shard) for s_, src_row, d0, n, shard in pieces)
        plans.append(plan)
    return plans


def _probe_runs(model, conv, layer_name, members, infos) -> list:
    """(target pattern, probe shape, [(source index, source row, destination row, rows, shard)], sources in
    destination order) for each output of the converter, from index tensors pushed through its ops."""
    collected: dict[str, list[torch.Tensor]] = defaultdict(list)
    bases = [0]  # source i owns global probe indices [bases[i], bases[i + 1])
    for pattern, key in members:
        shape = infos[key].shape
        base = bases[-1]
        bases.append(base + shape[0])
        probe = torch.arange(base, base + shape[0], dtype=torch.float64)
        collected[pattern].append(probe.unsqueeze(1) if len(shape) == 2 else probe)
    out: dict = collected
    try:
        for op in conv.operations:
            out = op.convert(out, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                             full_layer_name=layer_name, model=model, config=model.config, missing_keys=set())
    except Exception as e:
        first = members[0][1]
        raise CheckpointError(f"{infos[first].file}: tensors like '{first}' cannot be fused into '{layer_name}' ({type(e).__name__}: {e})") from None

    runs = []
    for tpat, probe in out.items():
        ids = probe.reshape(-1).to(torch.int64)
        if int(torch.bincount(ids, minlength=bases[-1]).max()) > 1:
            runs.append((tpat, tuple(probe.shape), "its checkpoint conversion repeats source rows; cannot stream it", []))
            continue
        # Vectorised: which source each destination row comes from, and where runs of consecutive rows of
        # one source start (a fused expert parameter has ~100k rows; a Python loop per row is too slow).
        starts = torch.tensor(bases, dtype=torch.int64)
        src = torch.searchsorted(starts, ids, right=True) - 1
        breaks = torch.ones(ids.numel(), dtype=torch.bool)
        breaks[1:] = (ids[1:] != ids[:-1] + 1) | (src[1:] != src[:-1])
        run_dst = breaks.nonzero().flatten()
        run_len = torch.diff(run_dst, append=torch.tensor([ids.numel()]))
        first_seen = list(dict.fromkeys(src[run_dst].tolist()))  # sources in destination order = shard order
        shard_of = {s_: i for i, s_ in enumerate(first_seen)}
        pieces = [(s_, g - bases[s_], d0, n, shard_of[s_])
                  for d0, n, s_, g in zip(run_dst.tolist(), run_len.tolist(), src[run_dst].tolist(), ids[run_dst].tolist())]
        runs.append((tpat, tuple(probe.shape), pieces, first_seen))
    return runs


# ---- pre-quantized FP8 checkpoints (fp8stream export, compressed-tensors, transformers' "fp8") ----

_CT_SCHEMES = {"channel": "fp8_per_channel", "tensor": "fp8_per_tensor", "block": "fp8_per_block"}


def prequantized_scheme(qc, cfg_path) -> tuple[str, str] | None:
    """(scheme, scale tensor suffix) of a config.json `quantization_config`, None when there is none.

    Understood: compressed-tensors "float-quantized" with one FP8 weight scheme (channel / tensor /
    block 128x128, symmetric, static weights, dynamic or no input activations), and transformers'
    "fp8" (FineGrainedFP8: 128x128 `weight_scale_inv`, dynamic activations). Anything else is refused:
    fp8stream never requantizes or dequantizes a checkpoint that is already quantized.
    """
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_path}: 'quantization_config' is not an object")
    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise UnsupportedModelError(f"{cfg_path}: fp8 checkpoint with activation_scheme '{qc.get('activation_scheme')}'; only dynamic activations are supported")
        if qc.get("fmt", "e4m3") != "e4m3" or qc.get("scale_fmt", "float") != "float":
            raise UnsupportedModelError(f"{cfg_path}: fp8 checkpoint with fmt '{qc.get('fmt')}' / scale_fmt '{qc.get('scale_fmt')}'; only e4m3 with float32 scales is supported")
        if block is None:
            return "fp8_per_tensor", "weight_scale_inv"
        if list(block) != [BLOCK, BLOCK]:
            raise UnsupportedModelError(f"{cfg_path}: fp8 checkpoint with weight_block_size {block}; only [{BLOCK}, {BLOCK}] is supported")
        return "fp8_per_block", "weight_scale_inv"
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        if not isinstance(groups, dict) or not groups:
            raise UnsupportedModelError(f"{cfg_path}: compressed-tensors checkpoint without config_groups")
        schemes = set()
        for name, g in groups.items():
            w = (g or {}).get("weights") or {} if isinstance(g, dict) else {}
            a = g.get("input_activations") if isinstance(g, dict) else None
            fmt = (g.get("format") if isinstance(g, dict) else None) or qc.get("format")
            strategy = w.get("strategy")
            ok = (w.get("num_bits") == 8 and w.get("type") == "float" and w.get("symmetric", True) and not w.get("dynamic")
                  and strategy in _CT_SCHEMES and fmt in ("float-quantized", "naive-quantized")
                  and (strategy != "block" or list(w.get("block_structure") or []) == [BLOCK, BLOCK])
                  and (a is None or (a.get("num_bits") == 8 and a.get("type") == "float" and a.get("dynamic") is True)))
            if not ok:
                raise UnsupportedModelError(
                    f"{cfg_path}: compressed-tensors group '{name}' (format {fmt}, weights {json_brief(w)}, input_activations "
                    f"{json_brief(a)}) is not an FP8 scheme fp8stream loads (8-bit float weights per channel / tensor / "
                    f"{BLOCK}x{BLOCK} block, dynamic activations)")
            schemes.add(_CT_SCHEMES[strategy])
        if len(schemes) > 1:
            raise UnsupportedModelError(f"{cfg_path}: compressed-tensors groups mix schemes {sorted(schemes)}; fp8stream loads one scheme per model")
        return schemes.pop(), "weight_scale"
    raise UnsupportedModelError(f"{cfg_path}: checkpoint is quantized with quant_method '{method}'; fp8stream loads full-precision "
                                "checkpoints and FP8 ones (compressed-tensors float-quantized, fp8)")


def json_brief(x) -> str:
    import json

    return json.dumps(x, sort_keys=True)[:160]


def scale_pieces(plan: TargetPlan, ckpt: Checkpoint, scheme: str, suffix: str) -> list[tuple[str, Piece]]:
    """For an FP8 parameter of a pre-quantized checkpoint: (scale tensor, weight piece) for every piece.

    The scales follow the weight rows transformers' conversion put where (the plan's pieces): per
    channel a source's [rows, 1] scales land on the same destination rows as its weight rows; per
    tensor its one scale is broadcast over them; per block its [ceil(rows/128), ceil(K/128)] scales
    land on the destination's block rows, which needs every source to start on a 128-row boundary of
    its slice (what vLLM and transformers require of fused block-quantized weights too). Checked here,
    before any byte is read.
    """
    out = []
    n, k = plan.shape[-2], plan.shape[-1]
    for p in plan.pieces:
        w = ckpt.tensors[p.key]
        if not p.key.endswith(".weight") or len(w.shape) != 2:
            raise UnsupportedModelError(f"{w.file}: FP8 tensor '{p.key}' (shape {list(w.shape)}) is not a 2-D '<module>.weight'; cannot load its scales")
        skey = p.key[: -len("weight")] + suffix
        s = ckpt.tensors.get(skey)
        if s is None:
            raise CheckpointError(f"{w.file}: FP8 tensor '{p.key}' has no scale tensor '{skey}' in the checkpoint")
        rows = w.shape[0]
        expected = {"fp8_per_channel": [(rows, 1), (rows,)], "fp8_per_tensor": [(), (1,)],
                    "fp8_per_block": [(-(-rows // BLOCK), -(-k // BLOCK))]}[scheme]
        if s.shape not in expected:
            raise CheckpointError(f"{s.file}: scale tensor '{skey}' has shape {list(s.shape)}, expected {list(expected[0])} for {scheme} weight '{p.key}' {list(w.shape)}")
        if s.dtype not in FLOAT_SOURCE_DTYPES:
            raise CheckpointError(f"{s.file}: scale tensor '{skey}' has dtype {str(s.dtype).removeprefix('torch.')}, expected float32")
        if scheme == "fp8_per_block":
            start = p.dst_row % n
            if not (p.src_row % BLOCK == 0 and start % BLOCK == 0 and (p.rows % BLOCK == 0 or (p.src_row + p.rows == rows and start + p.rows == n))):
                raise UnsupportedModelError(f"{w.file}: block-quantized '{p.key}' lands at row {start} of '{plan.name}', not on a {BLOCK}-row block boundary; its block scales cannot be fused")
        out.append((skey, p))
    return out
