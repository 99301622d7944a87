"""fp8stream's own decode loop behind `model.generate`: the default on CUDA for a plain greedy or sampling call.

Why not transformers' loop: its every step reads a flag from the device (are all sequences finished?), so the
host waits for the step's kernels and only then runs its own per-step Python (input preparation, the 4-D mask,
logits processors, stopping criteria) while the GPU idles. Here one CUDA graph holds the whole step: the forward
(the model builds its own mask from a 2-D mask buffer), the logits processors, the choice of the next token, and
the bookkeeping that feeds that token to the next step (position, mask, the finished flags). The host only
enqueues replays, and reads the device every `EOS_CHECK_EVERY` steps when the call can stop early (an
end-of-sequence token, a streamer to feed); a call that cannot stop early reads it once, at the end. Measured on
an H100 (Llama-3.1-8B shape, batch 1; BENCHMARKS.md): 137 tok/s against 130 for transformers' loop around the same
graph-replayed forwards; the rest of a step is its kernels.

What it runs: generate(input_ids, attention_mask of ones, max_new_tokens / max_length, min_new_tokens /
min_length, do_sample with temperature / top_k / top_p, repetition_penalty, eos / pad ids, streamer). Anything else
(beam search, left padding, custom logits processors or stopping criteria, stop strings, output_scores, a
dynamic cache, a cache with recurrent / convolution layers ...) goes to transformers' generate unchanged, whose decode steps still replay CUDA graphs
(decode._GraphedSteps); `graph_stats(model)["fallback"]` says why. Greedy tokens equal transformers' static-cache
generate (tests/test_decode_loop.py; float32 in bench/coverage_sweep.py --decode, where bf16 can round otherwise);
sampling draws from the same distribution, not the same random numbers.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("fp8stream")

# Host reads of the finished flags while a call can still stop early: a step is ~5 ms, so at most 7 wasted steps.
EOS_CHECK_EVERY = 8
# A new cache is sized up to a multiple of this, so that calls of different lengths share one cache and one graph.
# Each step attends over the whole cache (the mask hides the unused slots), so a shorter rounding is a faster step
# for short calls and more captures for calls of growing length. FP8STREAM_CACHE_ROUND sets it (benchmarks).
CACHE_ROUND = int(os.environ.get("FP8STREAM_CACHE_ROUND", "128") or 128)
MAX_LOOP_GRAPHS = 4

# Generation fields this loop implements; every other field must be unset (None) or at transformers' global default.
_HANDLED = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "use_cache",
    "cache_implementation", "compile_config", "transformers_version", "_from_model_config", "disable_compile",
})
_NOT_FOR_THIS_LOOP = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                      "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate")


@dataclass(frozen=True)
class _Sampling:
    """What picks the next token: baked into the captured graph, so part of the graph's key."""
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    min_new: int
    eos: tuple[int, ...]
    pad: int


@dataclass
class _Call:
    ids: torch.Tensor
    new_tokens: int
    sampling: _Sampling
    streamer: Any


def plan_call(model, inputs, generation_config, kwargs) -> _Call | str:
    """The call this loop runs, or why transformers' generate must run it (a short reason)."""
    if getattr(model, "fp8stream_decode", "graphs") != "graphs":
        return f"decode mode {model.fp8stream_decode}"
    kwargs = dict(kwargs)
    for k in _NOT_FOR_THIS_LOOP:
        if kwargs.pop(k, None) not in (None, False):
            return k
    streamer = kwargs.pop("streamer", None)
    ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    mask = kwargs.pop("attention_mask", None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long or ids.shape[1] == 0:
        return "inputs are not a 2-D tensor of token ids"
    device = next(model.parameters()).device
    if ids.device != device:
        return "inputs on another device than the model"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    try:
        config, rest = model._prepare_generation_config(generation_config, **kwargs)
    except Exception as e:  # transformers raises its own, clearer error from its generate
        return f"generation config ({type(e).__name__})"
    rest = {k: v for k, v in rest.items() if not (k == "use_cache" and v)}
    if rest:
        return f"model inputs {sorted(rest)}"
    if mask is not None and (mask.shape != ids.shape or not bool(mask.bool().all())):
        return "an attention mask with padding"
    defaults = config._get_default_generation_params() if hasattr(config, "_get_default_generation_params") else {}
    known = _known_fields(type(config))
    for k, v in config.to_dict().items():
        if k in _HANDLED or k not in known or v is None or v is False or (k in defaults and v == defaults[k]):
            continue
        return f"generation option {k}={v!r}"
    if config.cache_implementation != "static" or config.use_cache is False or config.disable_compile:
        return f"cache {config.cache_implementation}" + (", compile disabled" if config.disable_compile else "")
    length = ids.shape[1]
    new = config.max_new_tokens if config.max_new_tokens is not None else (config.max_length or 20) - length
    if new is None or new < 1:
        return "no new tokens to generate"
    min_new = max(config.min_new_tokens or 0, (config.min_length or 0) - length, 0)
    eos = config.eos_token_id
    eos = () if eos is None else tuple(int(e) for e in ([eos] if isinstance(eos, int) else (eos.tolist() if isinstance(eos, torch.Tensor) else eos)))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    sample = bool(config.do_sample)
    temperature = float(config.temperature if config.temperature is not None else 1.0)
    if sample and temperature <= 0:
        return "temperature <= 0"
    sampling = _Sampling(sample, temperature if sample else 1.0, int(config.top_k or 0) if sample else 0,
                         float(config.top_p if config.top_p is not None else 1.0) if sample else 1.0,
                         float(config.repetition_penalty or 1.0), min(min_new, new), eos, int(pad))
    return _Call(ids, int(new), sampling, streamer)


@functools.cache
def _known_fields(config_class) -> frozenset:
    """GenerationConfig's own fields (a model's generation_config may carry custom entries, which no generate reads)."""
    return frozenset(config_class().to_dict())


class _Buffers:
    """The step's state, at fixed addresses (a graph reads and writes these)."""

    def __init__(self, batch: int, cache_len: int, s: _Sampling, device):
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # the position of the token in `tok`
        self.pos_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, cache_len, dtype=torch.long, device=device)
        self.slots = torch.arange(cache_len, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # tokens chosen so far
        self.out = torch.zeros(batch, cache_len + 1, dtype=torch.long, device=device)
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.seen: torch.Tensor | None = None  # tokens so far (repetition penalty), sized at the first prefill
        self.eos = torch.tensor(s.eos, dtype=torch.long, device=device) if s.eos else None
        self.graph = None
        self.host_state: tuple | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.tok, self.pos, self.pos_ids, self.mask, self.step, self.out, self.unfinished, self.seen)
                if t is not None]


def _choose(logits: torch.Tensor, b: _Buffers, s: _Sampling) -> torch.Tensor:
    """The next token from the last position's logits, in transformers' order: repetition penalty, the
    min-new-tokens ban on end-of-sequence, then (sampling) temperature, top-k, top-p; float32 like its processors."""
    x = logits.float()
    if b.seen is not None:
        x = torch.where(b.seen, torch.where(x < 0, x * s.repetition_penalty, x / s.repetition_penalty), x)
    if s.min_new and b.eos is not None:
        x[:, b.eos] = torch.where(b.step < s.min_new, float("-inf"), x[:, b.eos])
    if not s.do_sample:
        return x.argmax(-1)
    if s.temperature != 1.0:
        x = x / s.temperature
    if 0 < s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        ordered, order = torch.sort(x, dim=-1)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[:, -1] = False  # the most likely token always stays
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = x.softmax(-1)
    # argmax(p / E), E ~ Exp(1), draws from p: no host sync, so it can live in a graph (torch.multinomial may not)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


def _emit(token: torch.Tensor, b: _Buffers, s: _Sampling) -> None:
    """Record the chosen token and make it the next step's input (all on the device)."""
    token = torch.where(b.unfinished, token, s.pad)
    b.out.index_copy_(1, b.step, token[:, None])
    if b.eos is not None:
        b.unfinished &= ~torch.isin(token, b.eos)
    if b.seen is not None:
        b.seen.scatter_(1, token[:, None], True)
    b.tok.copy_(token[:, None])
    b.step.add_(1)
    b.pos.add_(1)
    b.pos_ids.copy_(b.pos.expand_as(b.pos_ids))
    b.mask.copy_((b.slots <= b.pos).expand_as(b.mask))


class Loop:
    """Per model: the kept static cache and, per (batch, cache length, sampling), the buffers and the captured step."""

    def __init__(self, model, capture: bool, stats: dict):
        self.model = model
        self.capture = capture
        self.stats = stats
        self.cache = None
        self.cache_key: tuple[int, int] | None = None
        self.entries: dict[tuple, _Buffers] = {}
        self.disabled: str | None = None
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "past_key_values" if "past_key_values" in params else ("cache" if "cache" in params else None)
        self.extra = {k: v for k, v in (("cache_position", None), ("logits_to_keep", 1)) if k in params}
        self.unsupported = "no cache argument" if self.cache_arg is None else _unsupported_layers(model)

    def release(self) -> None:
        self.entries.clear()
        self.cache = self.cache_key = None

    def _cache_for(self, batch: int, needed: int):
        if self.cache is not None and self.cache_key[0] == batch and self.cache_key[1] >= needed:
            self.cache.reset()
            return self.cache
        from transformers import StaticCache

        length = -(-needed // CACHE_ROUND) * CACHE_ROUND
        self.entries.clear()  # their graphs write into the old cache's storage
        self.cache = StaticCache(config=self.model.config.get_text_config(decoder=True), max_cache_len=length)
        self.cache_key = (batch, length)
        return self.cache

    def _forward(self, ids, mask, position_ids, cache_position, cache) -> torch.Tensor:
        kw = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, self.cache_arg: cache,
              "use_cache": True, "return_dict": True}
        if "cache_position" in self.extra:
            kw["cache_position"] = cache_position
        if "logits_to_keep" in self.extra:
            kw["logits_to_keep"] = 1
        return self.model(**kw).logits[:, -1, :]

    def _step(self, b: _Buffers, s: _Sampling, cache) -> None:
        _emit(_choose(self._forward(b.tok, b.mask, b.pos_ids, b.pos, cache), b, s), b, s)

    def run(self, call: _Call) -> torch.Tensor:
        from .decode import _host_state

        ids, s, n = call.ids, call.sampling, call.new_tokens
        batch, length = ids.shape
        cache = self._cache_for(batch, length + n - 1)
        key = (batch, self.cache_key[1], s)
        b = self.entries.get(key)
        if b is None:
            if len(self.entries) >= MAX_LOOP_GRAPHS:
                self.entries.clear()
            b = self.entries[key] = _Buffers(batch, self.cache_key[1], s, ids.device)
        self.stats["loop_calls"] = self.stats.get("loop_calls", 0) + 1
        if call.streamer is not None:
            call.streamer.put(ids.cpu())
        # the prefill runs eagerly: the prompt's keys / values and the first token
        b.unfinished.fill_(True)
        b.step.zero_()
        b.mask.copy_((b.slots < length).expand_as(b.mask))
        b.pos.fill_(length - 1)
        positions = torch.arange(length, device=ids.device)
        logits = self._forward(ids, b.mask, positions.expand(batch, -1), positions, cache)
        if s.repetition_penalty != 1.0:
            if b.seen is None or b.seen.shape[1] != logits.shape[-1]:
                b.seen, b.graph = torch.zeros(batch, logits.shape[-1], dtype=torch.bool, device=ids.device), None
            b.seen.zero_()
            b.seen.scatter_(1, ids, True)
        _emit(_choose(logits, b, s), b, s)
        can_stop = b.eos is not None
        done = sent = 1
        if call.streamer is not None:
            self._stream(call.streamer, b, 0, 1)
        if n > 1 and self.capture and self.disabled is None and (b.graph is None or b.host_state != _host_state(cache)):
            self._capture(b, s, cache)
        while done < n:
            if b.graph is not None:
                b.graph.replay()
                self.stats["replays"] += 1
            else:
                self._step(b, s, cache)
                self.stats["eager_steps"] += 1
            done += 1
            if (can_stop or call.streamer is not None) and (done % EOS_CHECK_EVERY == 0 or done == n):
                if call.streamer is not None:
                    sent = self._stream(call.streamer, b, sent, done)
                if can_stop and not bool(b.unfinished.any()):
                    break
        if call.streamer is not None:
            self._stream(call.streamer, b, sent, done)
            call.streamer.end()
        new = b.out[:, :done]
        if can_stop:  # transformers stops after the step that finished the last sequence
            hit = torch.isin(new, b.eos)
            first = torch.where(hit.any(1), hit.int().argmax(1), done - 1)
            new = new[:, : int(first.max()) + 1]
        return torch.cat([ids, new], dim=1)

    @staticmethod
    def _stream(streamer, b: _Buffers, sent: int, done: int) -> int:
        for t in b.out[:, sent:done].cpu().unbind(1):  # one put per token, as transformers' generate does
            streamer.put(t)
        return done

    def _capture(self, b: _Buffers, s: _Sampling, cache) -> None:
        """Warm-up step (lazy kernel choices, Triton JIT: nothing of that may run while capturing) on a side
        stream, the state put back, then the capture; a Python-level cache change or a failed capture turns
        graphs off for this model (the steps then run eagerly, still without a per-step sync)."""
        from .decode import _host_state, _snapshot

        t0 = time.perf_counter()
        b.graph = None
        before = _host_state(cache)
        put_back = _snapshot(cache, b.tensors())

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(b, s, cache)
        torch.cuda.current_stream().wait_stream(stream)
        put_back()
        if _host_state(cache) != before:
            return self._disable(f"{type(cache).__name__} keeps Python-level state that a forward changes")
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step(b, s, cache)
        except Exception as e:  # a host sync or an uncapturable op in the step
            put_back()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return self._disable(f"capture failed ({type(e).__name__}: {first})")
        if _host_state(cache) != before:
            put_back()
            return self._disable(f"{type(cache).__name__} keeps Python-level state that a forward changes")
        b.graph, b.host_state = graph, before
        self.stats["graphs"] += 1
        self.stats["capture_seconds"] += time.perf_counter() - t0

    def _disable(self, why: str) -> None:
        self.disabled = why
        for e in self.entries.values():
            e.graph = None
        log.warning("fp8stream: decode steps run without CUDA graphs: %s", why)


def _unsupported_layers(model) -> str | None:
    """Why the loop cannot run this model's cache, or None. Only attention layers (full or sliding window) are
    taken: layers that keep a recurrent or convolution state (Qwen3.5, LFM, Mamba hybrids) read the 2-D mask as
    the tokens of the current forward, which this loop's cache-length mask is not (their tokens differed from
    transformers' in float32: bench/coverage_sweep.py --decode)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    try:
        cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=8)
    except Exception as e:  # transformers' own generate will say what is wrong
        return f"static cache ({type(e).__name__})"
    kinds = {type(layer) for layer in cache.layers}
    other = sorted(k.__name__ for k in kinds - {StaticLayer, StaticSlidingWindowLayer})
    return f"cache layers {', '.join(other)}" if other else None
