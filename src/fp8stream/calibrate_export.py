"""`export --calibrate`: calibrate.py's GPTQ driver over a checkpoint, streaming one decoder layer at a time.

The model is built on the meta device and its layers are read from the checkpoint one by one
(calibrate_checkpoint). Every weight is rounded whole with the scales the plain export wrote for
its checkpoint tensors, and its rows go back to those tensors by the load plan's pieces, so a weight fused
from several checkpoint tensors (each expert's gate and up halves; no dense architecture transformers
builds as a causal LM fuses on-disk Linears today) is calibrated like any other. export.py writes the
plain checkpoint first and hands it over as a CodeStore; calibration_ids tokenizes the calibration text.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .calibrate import _element_scale, calibrate_decoder, capture_layer_inputs, gptq_experts
from .errors import CheckpointError, Fp8StreamError, UnsupportedModelError
from .experts import FP8Experts
from .gptq import gptq_fp8
from .modules import FP8Linear, _is_fused_experts
from .quantize import BLOCK, FP8_DTYPE, expand_block_scale, quantize_blocks, scale_from_amax, tensor_amax


def calibration_ids(src: Path, file: str | os.PathLike, tokens: int) -> torch.Tensor:
    """The first `tokens` token ids of the UTF-8 text `file`, with the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    file = Path(file)
    if tokens < 2:
        raise Fp8StreamError(f"--calib-tokens must be at least 2, got {tokens}")
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise Fp8StreamError(f"{file}: calibration text not found") from None
    except IsADirectoryError:
        raise Fp8StreamError(f"{file}: calibration text is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise Fp8StreamError(f"{file}: calibration text is not UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise Fp8StreamError(f"{file}: cannot read the calibration text ({e.strerror or e})") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{src}: no usable tokenizer to read the calibration text ({first})") from None
    ids = tok(text, return_tensors="pt").input_ids.reshape(-1)[:tokens]
    if ids.numel() < 2:
        raise Fp8StreamError(f"{file}: calibration text has {ids.numel()} token(s); at least 2 are needed")
    return ids


def _decoder_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and n_layers > 0:
            return name, mod
    raise UnsupportedModelError(f"{type(model).__name__}: no list of {n_layers} decoder layers found; cannot calibrate it")


class CodeStore(Protocol):
    """The exported checkpoint's fp8 weights and scales, by checkpoint key (export writes them plainly first)."""

    def scale(self, key: str) -> torch.Tensor:
        """The float32 scales written for tensor `key` ([R, 1] per channel, [1] per tensor, 128x128 blocks)."""

    def codes(self, key: str, row: int, rows: int) -> torch.Tensor:
        """Rows [row, row + rows) of the fp8 codes written for tensor `key`."""

    def write(self, key: str, row: int, codes: torch.Tensor) -> None:
        """Overwrite rows [row, row + len(codes)) of tensor `key`'s fp8 codes."""


@dataclass(frozen=True)
class _Rows:
    """Rows [src, src + rows) of checkpoint tensor `key` are rows [dst, dst + rows) of one destination weight."""

    key: str
    src: int
    dst: int
    rows: int


def _rows_of(plan, lo: int, hi: int, name: str) -> list[_Rows]:
    """The checkpoint rows that make flat rows [lo, hi) of a parameter (one expert's slice, or a whole
    Linear weight), from the load plan's pieces: the codes go back to those keys, fused or not."""
    if plan is None or plan.cols is not None:
        raise UnsupportedModelError(f"calibration: '{name}' is not made of whole checkpoint rows; cannot write its codes back")
    out = []
    for p in plan.pieces:
        a, b = max(p.dst_row, lo), min(p.dst_row + p.rows, hi)
        if a < b:
            out.append(_Rows(p.key, p.src_row + a - p.dst_row, a - lo, b - a))
    return out


def _gather_scales(rows: list[_Rows], n: int, k: int, scheme: str, store: CodeStore, name: str) -> torch.Tensor:
    """The stored scales (FP8Linear / one FP8Experts slice layout: [n] or 128x128 blocks) of a destination weight
    [n, k] assembled from the scales export wrote for each checkpoint tensor: the codes are rounded with exactly
    the scales the exported checkpoint carries (per tensor: each checkpoint tensor's own)."""
    if scheme != "fp8_per_block":
        out = torch.empty(n)
        for r in rows:
            s = store.scale(r.key).reshape(-1)
            out[r.dst : r.dst + r.rows] = s if s.numel() == 1 else s[r.src : r.src + r.rows]
        return out
    full = torch.empty(n, k)
    for r in rows:
        b0, b1 = r.src // BLOCK, -(-(r.src + r.rows) // BLOCK)
        sub = expand_block_scale(store.scale(r.key)[b0:b1], (b1 - b0) * BLOCK, k)
        full[r.dst : r.dst + r.rows] = sub[r.src - b0 * BLOCK : r.src - b0 * BLOCK + r.rows]
    blocks = full[::BLOCK, ::BLOCK].contiguous()
    if not torch.equal(expand_block_scale(blocks, n, k), full):
        raise UnsupportedModelError(f"calibration: the checkpoint tensors of '{name}' do not land on its {BLOCK}x{BLOCK} block grid")
    return blocks


def _gather_codes(rows: list[_Rows], n: int, k: int, store: CodeStore) -> torch.Tensor:
    out = torch.empty(n, k, dtype=FP8_DTYPE)
    for r in rows:
        out[r.dst : r.dst + r.rows] = store.codes(r.key, r.src, r.rows)
    return out


def _scatter_codes(rows: list[_Rows], codes: torch.Tensor, store: CodeStore) -> None:
    for r in rows:
        store.write(r.key, r.src, codes[r.dst : r.dst + r.rows])


def _scales(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weight_scale an FP8Linear holds, the per-element scale broadcastable to w) — export's and load's."""
    n, k = w.shape
    if scheme == "fp8_per_block":
        _, bs = quantize_blocks(w)
        return bs, expand_block_scale(bs, n, k)
    if scheme == "fp8_per_tensor":
        s = scale_from_amax(tensor_amax(w).reshape(1))
        return s.expand(n).contiguous(), s.reshape(1, 1)
    s = scale_from_amax(w.abs().amax(-1))
    return s, s[:, None]


@dataclass
class Calibrated:
    """What export --calibrate GPTQ-rounded: Linear and fused-experts module names (an experts module counts
    once, when at least one of its expert weights was), and the expert weights (one expert's gate_up or down)
    GPTQ-rounded / left plain (too few routed tokens)."""

    modules: list[str] = field(default_factory=list)
    expert_weights: int = 0
    plain_expert_weights: int = 0


@torch.no_grad()
def calibrate_checkpoint(ckpt, config, scheme: str, fp8_modules: set[str], ids: torch.Tensor, context: int,
                         store: CodeStore, dtype: torch.dtype = torch.bfloat16, progress: bool = False) -> Calibrated:
    """GPTQ-round the FP8 Linears and fused MoE experts of a checkpoint's decoder layers on the calibration ids.

    The model is built on the meta device; only the parameters in front of the first decoder layer
    (embeddings) and one decoder layer at a time are read from `ckpt` (in `dtype`, as `load` holds
    them), so host memory stays about one layer in full precision (plus its fp8 copy) and the
    calibration activations (each window's hidden states; for an experts module also its routed inputs),
    and one [K, K] float32 Hessian at a time per Linear group / expert projection.
    Each weight is GPTQ-rounded whole (fused or not) with the scales export wrote (`store`), and its rows
    are written back to the checkpoint tensors the load plan took them from (per expert: its gate and up
    halves to its own keys). Expert projections routed too few calibration tokens keep their plain codes
    (EXPERT_TOKENS_PER_INPUT).
    """
    from .source import Source as _Source
    from .load_plan import build_plan
    from .meta_model import build_meta_model

    model = build_meta_model(config, dtype)
    plans = build_plan(model, ckpt)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    prefix, layers = _decoder_layers(model, text_cfg.num_hidden_layers)
    src = _Source(ckpt, dtype, torch.device("cpu"))
    out_emb = model.get_output_embeddings()

    def materialize(module: nn.Module, mod_prefix: str, skip=()) -> None:
        for mod_name, mod in module.named_modules():
            if any(mod is s for s in skip):
                continue
            for attr, p in list(mod._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                name = ".".join(x for x in (mod_prefix, mod_name, attr) if x)
                plan = plans.get(name)
                if plan is None:
                    raise CheckpointError(f"{ckpt.path}: no checkpoint tensor for '{name}'; cannot calibrate")
                shape = tuple(p.shape)
                width = shape[-1] if len(shape) >= 2 else None
                flat = math.prod(shape[:-1]) if width else (shape[0] if shape else 1)
                x = src.rows(plan, 0, flat, width, name).reshape(shape).to(dtype)
                mod._parameters[attr] = nn.Parameter(x, requires_grad=False)

    # everything but the decoder layers and the output head: what runs before the first layer
    materialize(model, "", skip=[layers] + ([out_emb] if out_emb is not None else []))
    windows = list(ids.reshape(1, -1).split(context, dim=1))
    inputs = capture_layer_inputs(model, layers[0], windows)
    done = Calibrated()

    def enter(i):
        materialize(layers[i], f"{prefix}.{i}")
        return layers[i]

    def leave(i, layer):
        layers[i] = layer.to("meta")
        if bar is not None:
            bar.update(1)

    def targets_of(i, layer):
        return {n: m for n, m in layer.named_modules()
                if (isinstance(m, nn.Linear) or _is_fused_experts(m)) and f"{prefix}.{i}.{n}" in fp8_modules}

    def quantize(i, name, mod, stats):
        full = f"{prefix}.{i}.{name}"
        n, k = mod.weight.shape
        rows = _rows_of(plans.get(f"{full}.weight"), 0, n, f"{full}.weight")
        stored = _gather_scales(rows, n, k, scheme, store, f"{full}.weight")
        codes = gptq_fp8(mod.weight, stats.h, _element_scale(stored, scheme, n, k))
        _scatter_codes(rows, codes, store)
        done.modules.append(full)
        new = FP8Linear(mod.in_features, mod.out_features, mod.bias is not None, scheme, dtype, device="cpu")
        new.weight.data, new.weight_scale.data = codes, stored
        if mod.bias is not None:
            new.bias.data = mod.bias.data
        return new

    def quantize_experts(i, name, mod, routed):
        full = f"{prefix}.{i}.{name}"
        new = FP8Experts(mod, scheme, device="cpu")
        rows = {}
        for attr in ("gate_up_proj", "down_proj"):
            e_count, n, k = getattr(mod, attr).shape
            rows[attr] = [_rows_of(plans.get(f"{full}.{attr}"), e * n, (e + 1) * n, f"{full}.{attr}") for e in range(e_count)]
            for e, r in enumerate(rows[attr]):  # the plain export: the scales, and the codes of experts left plain
                getattr(new, f"{attr}_scale").data[e] = _gather_scales(r, n, k, scheme, store, f"{full}.{attr}")
                getattr(new, attr).data[e] = _gather_codes(r, n, k, store)
        chosen = gptq_experts(new, mod.gate_up_proj, mod.down_proj, routed)
        for e, attr in chosen:
            _scatter_codes(rows[attr][e], getattr(new, attr)[e], store)
        if chosen:
            done.modules.append(full)
        done.expert_weights += len(chosen)
        done.plain_expert_weights += 2 * new.num_experts - len(chosen)
        return new

    from .report import progress_bar

    bar = progress_bar(total=len(layers), desc="fp8stream calibrate", unit="layer", leave=False) if progress else None
    try:
        calibrate_decoder(layers, inputs, targets_of, quantize, enter, leave, quantize_experts)
    finally:
        if bar is not None:
            bar.close()
    return done
