"""Calibrated (GPTQ-style) rounding of FP8 weights: a per-decoder-layer driver of gptq.py's pure math.

Plain rounding puts every weight on its nearest fp8 value. GPTQ (Frantar et al., 2022) instead
rounds one input column at a time and spreads the rounding error of that column over the columns
not yet rounded, weighted by the inverse of H = X^T X (X: the Linear's inputs on calibration text),
so that the layer's *output* error ||(W - Q) X|| is small rather than each weight's. The scales are
not touched (amax / 448, exactly those of plain rounding), so the result is stored in the same
layouts and computed by the same FP8 kernels; only which fp8 value each weight gets changes.

`gptq_fp8` (gptq.py) is the column loop (a pure function). `calibrate_layer` runs it over one decoder layer:
the Linears that read the same input tensor (q/k/v; gate/up) form one group; a group's H comes from
inputs computed through the groups already quantized (o_proj sees the rounded q/k/v's attention), and
the layer's outputs, through every quantized Linear, are the next layer's calibration inputs.

Fused MoE experts (transformers' 3-D gate_up_proj [E, 2I, H] / down_proj [E, H, I]) are one GPTQ problem
per expert and projection (`gptq_experts`): a pre-hook on the real experts module captures what the
model's own router sent it (hidden states, top-k ids); expert e's gate_up gets H = sum x x^T over its
tokens, its down the same over act(gate) * up computed through its rounded gate_up. An expert projection
routed fewer tokens than its input width keeps plain rounding (EXPERT_TOKENS_PER_INPUT).

`export --calibrate` runs this driver over a checkpoint, one decoder layer at a time (calibrate_export.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .errors import Fp8StreamError
from .experts import FP8Experts
from .gptq import DAMP, gptq_fp8
from .quantize import expand_block_scale

CALIB_TOKENS = 8192  # export --calibrate's default: the first 8192 tokens of the text (all of the GPL-3's 7658)
CALIB_CONTEXT = 2048  # calibration window length (at most the model's max_position_embeddings)
# An expert projection is GPTQ-rounded only when the calibration routed it at least this many tokens per input
# feature (K: the hidden size for gate_up, the expert's intermediate size for down), i.e. when its H can have
# full rank; otherwise it keeps plain rounding. On the tiny MoE models (ACCURACY.md, bench/moe_gptq_error.py
# --sweep) gate_up GPTQ-rounded on n < K/2 tokens had a larger held-out output error than plain rounding for
# most experts, at n = K/2 mixed, at n >= K a smaller one for every expert.
EXPERT_TOKENS_PER_INPUT = 1.0


class _Stop(Exception):
    pass


@dataclass
class InputStats:
    """What calibration saw of a group's input: H = mean x x^T [K, K] and the per-channel amax [K]."""

    h: torch.Tensor
    amax: torch.Tensor


@dataclass
class RoutedInputs:
    """What a fused-experts module received in one calibration window: its input hidden states [T, H] and
    the top-k expert ids [T, k] the model's own router chose for them."""

    hidden: torch.Tensor
    index: torch.Tensor


def _routed_args(module: nn.Module, args: tuple, kwargs: dict) -> RoutedInputs:
    # transformers calls experts(hidden_states, top_k_index, top_k_weights), positionally or by name
    # (the names differ between models): bind to the forward's own signature and take the first two.
    values = list(inspect.signature(module.forward).bind(*args, **kwargs).arguments.values())
    hidden, index = values[0], values[1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return RoutedInputs(hidden, index.reshape(hidden.shape[0], -1))


def _hessian_pass(layer: nn.Module, run: Callable[[int], None], windows: int, pending: dict[str, nn.Module]
                  ) -> tuple[list[str], InputStats | list[RoutedInputs]]:
    """One pass over the calibration windows: the first pending Linear to run in a window and every
    other pending Linear called on the very same input tensor form the group; their H = sum X^T X / rows.
    The layer's forward is cut short as soon as a pending Linear outside the group is reached.

    A pending fused-experts module (any non-Linear in `pending`) reached first is a group of its own:
    its routed inputs of every window are returned instead (its per-expert Hessians need the routing)."""
    group: list[str] = []
    state: dict = {}
    h: torch.Tensor | None = None
    amax: torch.Tensor | None = None
    rows = 0
    routed: list[RoutedInputs] = []

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

    def make_experts_hook(name):
        def hook(mod, args, kwargs):
            if state.get("x") is None and (group == [name] or (state["first_window"] and not group)):
                group[:] = [name]
                routed.append(_routed_args(mod, args, kwargs))
            raise _Stop  # nothing after the experts is needed in this pass
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) if isinstance(m, nn.Linear)
               else m.register_forward_pre_hook(make_experts_hook(n), with_kwargs=True) for n, m in pending.items()]
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
        raise Fp8StreamError(f"calibration: module(s) {', '.join(pending)} were not called by the layer's forward")
    if routed:
        return group, routed
    return group, InputStats(h / max(rows, 1), amax)


@torch.no_grad()
def calibrate_layer(layer: nn.Module, targets: dict[str, nn.Module], run: Callable[[int], None], windows: int,
                    quantize: Callable[[str, nn.Module, InputStats], nn.Module],
                    quantize_experts: Callable[[str, nn.Module, list[RoutedInputs]], nn.Module] | None = None) -> None:
    """Quantize the Linears `targets` ({name relative to `layer`: module}) of one layer, group by group.

    `run(w)` runs the layer's forward on calibration window w; `quantize(name, module, stats)` returns the
    module that replaces it (computing with the calibrated fp8 weight; stats: the group's inputs), which
    every later pass uses. `targets` may also hold fused-experts modules; `quantize_experts(name, module,
    routed)` then returns their replacement (routed: what the experts received, window by window).
    """
    pending = dict(targets)
    if quantize_experts is None and any(not isinstance(m, nn.Linear) for m in pending.values()):
        raise Fp8StreamError("calibrate_layer: fused-experts targets need quantize_experts")
    while pending:
        group, stats = _hessian_pass(layer, run, windows, pending)
        for name in group:
            mod = pending.pop(name)
            new = quantize(name, mod, stats) if isinstance(mod, nn.Linear) else quantize_experts(name, mod, stats)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, new)


# --- fused MoE experts: one GPTQ problem per expert and projection ----------------------------------------------


def expert_tokens(routed: list[RoutedInputs], num_experts: int) -> list[list[torch.Tensor]]:
    """tokens[w][e]: the rows of window w routed to expert e (grouped as FP8Experts.reference_forward groups them)."""
    out = []
    for r in routed:
        flat = r.index.reshape(-1)
        counts = torch.bincount(flat, minlength=num_experts)[:num_experts].tolist()
        token_of = torch.argsort(flat, stable=True)[: sum(counts)] // r.index.shape[-1]
        out.append(list(token_of.split(counts)))
    return out


def expert_hessian(routed: list[RoutedInputs], tokens: list[list[torch.Tensor]], e: int,
                   features: Callable[[int, torch.Tensor, bool], torch.Tensor]) -> torch.Tensor:
    """sum f f^T / count over the calibration tokens routed to expert e, f = features(e, x, decode) of its
    tokens x (the identity for gate_up; act(gate) * up through the rounded gate_up for down)."""
    h, count = None, 0
    for r, tok in zip(routed, tokens):
        if tok[e].numel() == 0:
            continue
        decode = r.hidden.shape[0] <= kernels.MOE_GEMV_MAX_T  # FP8Experts' rule, by the window's token count
        f = features(e, r.hidden[tok[e]], decode).float()
        h = f.t() @ f if h is None else h.addmm_(f.t(), f)
        count += f.shape[0]
    return h / count


def _element_scale(stored: torch.Tensor, scheme: str, n: int, k: int) -> torch.Tensor:
    """The per-element scale (broadcastable to [n, k]) of one weight's stored scales ([n] or 128x128 blocks)."""
    return expand_block_scale(stored, n, k) if scheme == "fp8_per_block" else stored[:, None]


@torch.no_grad()
def gptq_experts(fp8: FP8Experts, gate_up: torch.Tensor, down: torch.Tensor, routed: list[RoutedInputs], *,
                 damp: float = DAMP, tokens_per_input: float | None = None) -> list[tuple[int, str]]:
    """GPTQ for fused experts, in place on `fp8` (an FP8Experts holding the scales and the plain codes).

    gate_up [E, 2I, H], down [E, H, I]: the full-precision weights. Expert by expert, gate_up is GPTQ-rounded
    on H = sum x x^T over the calibration tokens routed to it, then down on the sum over the same tokens of
    a a^T, a = act(gate) * up computed by `fp8` itself through the expert's (rounded) gate_up, as later
    Linear groups see the rounded earlier ones. A projection is only GPTQ-rounded when the expert got at
    least tokens_per_input (default EXPERT_TOKENS_PER_INPUT) x its input width K tokens; otherwise it
    keeps its plain codes. One expert at a time: the Hessians held are one [H, H] and one [I, I] float32,
    not E of each (all experts' at once would be 60 x (2048^2 + 1408^2) x 4 B ~ 1.5 GB per Qwen1.5-MoE layer).
    Returns the GPTQ-rounded (expert, "gate_up_proj" / "down_proj") pairs.
    """
    ratio = EXPERT_TOKENS_PER_INPUT if tokens_per_input is None else tokens_per_input
    tokens = expert_tokens(routed, fp8.num_experts)
    done = []
    for e in range(fp8.num_experts):
        count = sum(int(t[e].numel()) for t in tokens)
        for attr, w, features in (("gate_up_proj", gate_up, lambda e, x, d: x), ("down_proj", down, fp8.gated)):
            if count == 0 or count < ratio * w.shape[-1]:
                continue
            h = expert_hessian(routed, tokens, e, features)
            s = _element_scale(getattr(fp8, f"{attr}_scale")[e], fp8.scheme, *w.shape[1:])
            getattr(fp8, attr).data[e] = gptq_fp8(w[e], h, s, damp=damp)
            done.append((e, attr))
    return done


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
                      enter: Callable[[int], nn.Module] | None = None, leave: Callable[[int, nn.Module], None] | None = None,
                      quantize_experts: Callable[[int, str, nn.Module, list[RoutedInputs]], nn.Module] | None = None) -> None:
    """GPTQ over a stack of decoder layers, one at a time (see the module doc).

    inputs: capture_layer_inputs' list; targets_of(i, layer): the Linears of layer i to quantize (names relative
    to the layer); quantize(i, name, module, stats): the replacement module. enter(i) / leave(i, layer), when
    given, materialize layer i before it is calibrated and release it after its outputs are computed
    (streaming from a checkpoint); otherwise `layers[i]` is used in place. quantize_experts(i, name, module,
    routed): the replacement of a fused-experts module among the targets (see calibrate_layer).
    """
    hidden = [h for h, _ in inputs]
    kwargs = [kw for _, kw in inputs]
    for i in range(len(layers)):
        layer = enter(i) if enter is not None else layers[i]

        def run(w, layer=layer):
            layer(hidden[w], **kwargs[w])

        experts = None if quantize_experts is None else (lambda name, mod, routed, i=i: quantize_experts(i, name, mod, routed))
        calibrate_layer(layer, targets_of(i, layer), run, len(hidden),
                        lambda name, mod, st, i=i: quantize(i, name, mod, st), experts)
        hidden = [_hidden(layer(hidden[w], **kwargs[w])) for w in range(len(hidden))]
        if leave is not None:
            leave(i, layer)
