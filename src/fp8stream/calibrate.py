"""Calibrated (GPTQ-style) rounding of FP8 weights: pure math plus a per-decoder-layer driver.

Plain rounding puts every weight on its nearest fp8 value. GPTQ (Frantar et al., 2022) instead
rounds one input column at a time and spreads the rounding error of that column over the columns
not yet rounded, weighted by the inverse of H = X^T X (X: the Linear's inputs on calibration text),
so that the layer's *output* error ||(W - Q) X|| is small rather than each weight's. The scales are
not touched (amax / 448, exactly those of plain rounding), so the result is stored in the same
layouts and computed by the same FP8 kernels; only which fp8 value each weight gets changes.

`gptq_fp8` is the column loop (a pure function). `calibrate_layer` runs it over one decoder layer:
the Linears that read the same input tensor (q/k/v; gate/up) form one group; a group's H comes from
inputs computed through the groups already quantized (o_proj sees the rounded q/k/v's attention), and
the layer's outputs, through every quantized Linear, are the next layer's calibration inputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, Fp8StreamError, UnsupportedModelError
from .modules import FP8Linear
from .quantize import FP8_DTYPE, expand_block_scale, quantize_blocks, round_fp8, scale_from_amax, tensor_amax

DAMP = 0.1  # H += DAMP * mean(diag H) * I (GPTQ's percdamp; 0.1 beat 0.01 on SmolLM2-135M, ACCURACY.md)
CALIB_TOKENS = 8192  # export --calibrate's default: the first 8192 tokens of the text (all of the GPL-3's 7658)
CALIB_CONTEXT = 2048  # calibration window length (at most the model's max_position_embeddings)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag) * I)^-1, damping raised until it is positive definite."""
    k = h.shape[0]
    mean_diag = h.diagonal().mean().item()
    eye = torch.eye(k, dtype=h.dtype)
    for _ in range(8):
        l, info = torch.linalg.cholesky_ex(h + eye * (damp * mean_diag))
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(l), upper=True)
        damp *= 10
    raise ValueError("calibration Hessian is not positive definite even with strong damping")


def gptq_fp8(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, *, damp: float = DAMP, block: int = 128,
             act_order: bool = True) -> torch.Tensor:
    """GPTQ rounding of w [N, K] to float8_e4m3fn codes with fixed scales.

    h: [K, K] second moment of the inputs (X^T X, any positive multiple); scale: float32 broadcastable to
    [N, K] ([N, 1] per channel, [1, 1] per tensor, [N, K] expanded blocks), w ~= codes * scale.
    Columns never seen by the calibration data (diag H = 0) are rounded plainly. With act_order the
    columns are processed in order of decreasing diag H (the largest inputs first); the codes are
    returned in the original column order. The result is plain rounding when H is diagonal.
    """
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"gptq_fp8: weight {tuple(w.shape)} and Hessian {tuple(h.shape)} do not match")
    n, k = w.shape
    W = w.float().clone()
    S = scale.float().expand(n, k)
    H = h.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H, S = W[:, perm], H[perm][:, perm], S[:, perm]
    # Real Hessians drive the updates into float32 denormals, which the CPU computes ~15x slower: flush them
    # (values below 1e-38 of a weight update; torch's default, off, is restored afterwards). The loop is
    # thousands of small vector ops: one intra-op thread runs it 5-8x faster than several on a busy CPU.
    flushed = torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codes = _gptq_columns(W, S, _inverse_hessian_factor(H, damp), block)
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(FP8_DTYPE)


def _gptq_columns(W: torch.Tensor, S: torch.Tensor, U: torch.Tensor, block: int) -> torch.Tensor:
    n, k = W.shape
    codes = torch.empty(n, k, dtype=torch.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.empty(n, i2 - i1)
        for i in range(i2 - i1):
            col, s = W1[:, i], S[:, i1 + i]
            c = round_fp8(col, s).float()
            codes[:, i1 + i] = c
            err = (col - c * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T): the squared output error on the inputs whose second moment is H."""
    d = w.float() - w_hat.float()
    return float(((d @ h.float()) * d).sum())


class _Stop(Exception):
    pass


@dataclass
class InputStats:
    """What calibration saw of a group's input: H = mean x x^T [K, K] and the per-channel amax [K]."""

    h: torch.Tensor
    amax: torch.Tensor


def _hessian_pass(layer: nn.Module, run: Callable[[int], None], windows: int, pending: dict[str, nn.Module]
                  ) -> tuple[list[str], InputStats]:
    """One pass over the calibration windows: the first pending Linear to run in a window and every
    other pending Linear called on the very same input tensor form the group; their H = sum X^T X / rows.
    The layer's forward is cut short as soon as a pending Linear outside the group is reached."""
    group: list[str] = []
    state: dict = {}
    h: torch.Tensor | None = None
    amax: torch.Tensor | None = None
    rows = 0

    def make_hook(name):
        def hook(_mod, args):
            nonlocal h, amax, rows
            x = args[0]
            if state.get("x") is None:
                if state["first_window"] and not group:
                    group.append(name)
                elif name != group[0]:
                    raise _Stop
                state["x"] = x
                x2 = x.reshape(-1, x.shape[-1]).float()
                h = x2.t() @ x2 if h is None else h.addmm_(x2.t(), x2)
                a = x2.abs().amax(0)
                amax = a if amax is None else torch.maximum(amax, a)
                rows += x2.shape[0]
            elif x is state["x"]:
                if state["first_window"] and name not in group:
                    group.append(name)
            else:
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in pending.items()]
    try:
        for w in range(windows):
            state.update(x=None, first_window=(w == 0))
            try:
                run(w)
            except _Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()
    if not group:
        raise Fp8StreamError(f"calibration: Linear(s) {', '.join(pending)} were not called by the layer's forward")
    return group, InputStats(h / max(rows, 1), amax)


@torch.no_grad()
def calibrate_layer(layer: nn.Module, targets: dict[str, nn.Module], run: Callable[[int], None], windows: int,
                    quantize: Callable[[str, nn.Module, InputStats], nn.Module]) -> None:
    """Quantize the Linears `targets` ({name relative to `layer`: module}) of one layer, group by group.

    `run(w)` runs the layer's forward on calibration window w; `quantize(name, module, stats)` returns the
    module that replaces it (computing with the calibrated fp8 weight; stats: the group's inputs), which
    every later pass uses.
    """
    pending = dict(targets)
    while pending:
        group, stats = _hessian_pass(layer, run, windows, pending)
        for name in group:
            new = quantize(name, pending.pop(name), stats)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, new)


def capture_layer_inputs(model: nn.Module, first_layer: nn.Module, windows: list[torch.Tensor]) -> list[tuple]:
    """(hidden_states, kwargs) that `model` passes to its first decoder layer, one per window of token ids.

    The forward is stopped at the layer, so only what precedes it (embeddings, rotary tables, the mask)
    has to hold real weights."""
    captured: list[tuple] = []

    def pre(_mod, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise _Stop

    handle = first_layer.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for ids in windows:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(windows):
        raise Fp8StreamError("calibration: the model's forward never reached its first decoder layer")
    return captured


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def calibrate_decoder(layers, inputs: list[tuple], targets_of: Callable[[int, nn.Module], dict[str, nn.Module]],
                      quantize: Callable[[int, str, nn.Module, InputStats], nn.Module],
                      enter: Callable[[int], nn.Module] | None = None, leave: Callable[[int, nn.Module], None] | None = None) -> None:
    """GPTQ over a stack of decoder layers, one at a time (see the module doc).

    inputs: capture_layer_inputs' list; targets_of(i, layer): the Linears of layer i to quantize (names relative
    to the layer); quantize(i, name, module, stats): the replacement module. enter(i) / leave(i, layer), when
    given, materialize layer i before it is calibrated and release it after its outputs are computed
    (streaming from a checkpoint); otherwise `layers[i]` is used in place.
    """
    hidden = [h for h, _ in inputs]
    kwargs = [kw for _, kw in inputs]
    for i in range(len(layers)):
        layer = enter(i) if enter is not None else layers[i]

        def run(w, layer=layer):
            layer(hidden[w], **kwargs[w])

        calibrate_layer(layer, targets_of(i, layer), run, len(hidden),
                        lambda name, mod, st, i=i: quantize(i, name, mod, st))
        hidden = [_hidden(layer(hidden[w], **kwargs[w])) for w in range(len(hidden))]
        if leave is not None:
            leave(i, layer)


# --- export --calibrate: the same driver, streaming one decoder layer at a time from a checkpoint ---------------


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


def _one_to_one(plan) -> str | None:
    """The checkpoint key of a parameter that is exactly one whole checkpoint tensor (no fusion, no slicing)."""
    if plan is None or len(plan.sources) != 1 or plan.cols is not None or len(plan.pieces) != 1 or len(plan.shape) != 2:
        return None
    p = plan.pieces[0]
    return p.key if (p.src_row, p.dst_row, p.rows) == (0, 0, plan.shape[0]) else None


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


@torch.no_grad()
def calibrate_checkpoint(ckpt, config, scheme: str, fp8_modules: set[str], ids: torch.Tensor, context: int,
                         write: Callable[[str, torch.Tensor], None], dtype: torch.dtype = torch.bfloat16,
                         progress: bool = False) -> list[str]:
    """GPTQ-round the FP8 Linears of a checkpoint's decoder layers on the calibration token ids.

    The model is built on the meta device; only the parameters in front of the first decoder layer
    (embeddings) and one decoder layer at a time are read from `ckpt` (in `dtype`, as `load` holds
    them), so host memory stays about one layer in full precision plus the calibration activations.
    Each calibrated Linear that is one whole checkpoint tensor is handed to write(key, fp8 codes) (its
    scales are the plain ones, already written); a fused one is rounded plainly. Returns the
    calibrated module names.
    """
    from .loader import _Source
    from .load_plan import build_meta_model, build_plan

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
    calibrated: list[str] = []

    def enter(i):
        materialize(layers[i], f"{prefix}.{i}")
        return layers[i]

    def leave(i, layer):
        layers[i] = layer.to("meta")
        if bar is not None:
            bar.update(1)

    def targets_of(i, layer):
        return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and f"{prefix}.{i}.{n}" in fp8_modules}

    def quantize(i, name, mod, stats):
        full = f"{prefix}.{i}.{name}"
        w = mod.weight
        stored, s = _scales(w, scheme)
        key = _one_to_one(plans.get(f"{full}.weight"))
        if key is not None:
            codes = gptq_fp8(w, stats.h, s)
            write(key, codes)
            calibrated.append(full)
        else:
            codes = round_fp8(w, s)
        new = FP8Linear(mod.in_features, mod.out_features, mod.bias is not None, scheme, dtype, device="cpu")
        new.weight.data, new.weight_scale.data = codes, stored
        if mod.bias is not None:
            new.bias.data = mod.bias.data
        return new

    from tqdm import tqdm

    bar = tqdm(total=len(layers), desc="fp8stream calibrate", unit="layer", leave=False) if progress else None
    try:
        calibrate_decoder(layers, inputs, targets_of, quantize, enter, leave)
    finally:
        if bar is not None:
            bar.close()
    return calibrated
