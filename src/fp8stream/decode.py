"""CUDA-graph decode steps inside transformers' generate: the default decode path of an FP8 model on CUDA.

With a static KV cache, transformers' generate runs every decode step through `model.get_compiled_call()`
(torch.compile, mode reduce-overhead: minutes of compilation before the first token on an 8B model).
`install` gives the model its own: the forward of a decode step is captured once as a CUDA graph and
replayed for every later step with that step's inputs copied into the captured buffers. Capturing costs
about two forwards, not a compilation. Everything else in generate (logits processors, sampling,
stopping criteria, streamers) stays transformers'.

Why a replay is the step's forward: a graph freezes every Python-level decision made while it was
captured. The step's inputs (token ids, positions, the 4-D mask transformers prepares for a static
cache) are tensors copied in before each replay; the KV cache's position is a device tensor that the
captured kernels advance themselves. A cache whose Python-level state (an int, a list length) changes
in a forward cannot be replayed: that is checked on the warm-up forward, and such a model, a forward
that syncs (capture raises) or inputs of a kind not handled here run eagerly, with one warning.
"""

from __future__ import annotations

import logging
import time
import types
from typing import Any

import torch

log = logging.getLogger("fp8stream")

# Steps of more tokens than this (a chunked prefill, speculative verification) run eagerly.
MAX_GRAPH_TOKENS = 4
# Graphs kept per model; a new KV cache object (a generate call that needed a longer cache) drops the rest.
MAX_GRAPHS = 8


def install(model: torch.nn.Module, *, capture: bool | None = None, own_loop: bool = True) -> None:
    """Make `model.generate` decode through CUDA graphs by default (static cache + graph-captured steps).

    A plain greedy / sampling call runs fp8stream's own loop (decode_loop.py: the whole step in one graph, no
    per-step host sync); any other call runs transformers' generate, each decode step replayed from a graph
    of the forward. Leaves a generation config that already names a cache implementation as it is; a model
    class that transformers does not mark as compilable keeps the dynamic cache. `capture=False` runs the
    same paths without graphs (the CPU tests use it); `own_loop=False` always uses transformers' loop."""
    if capture is None:
        capture = next(model.parameters()).is_cuda
    runner = _GraphedSteps(model, capture)
    if own_loop:
        from .decode_loop import Loop, plan_call

        runner.loop = loop = Loop(model, capture, runner.stats)
        transformers_generate = model.generate

        def generate(self, inputs=None, generation_config=None, **kwargs):
            call = loop.unsupported or plan_call(self, inputs, generation_config, kwargs)
            if isinstance(call, str):
                runner.stats["fallback"] = call
                log.debug("fp8stream: transformers' generate runs this call: %s", call)
                return transformers_generate(inputs=inputs, generation_config=generation_config, **kwargs)
            runner.check_parameters()
            with torch.no_grad():
                return loop.run(call)

        generate.__doc__ = transformers_generate.__doc__
        model.generate = types.MethodType(generate, model)
    original = model.get_compiled_call

    def get_compiled_call(self, compile_config=None):
        if getattr(self, "fp8stream_decode", "graphs") != "graphs":  # "compile": transformers' own torch.compile
            return original(compile_config)
        runner.check_parameters()
        return runner

    model.get_compiled_call = types.MethodType(get_compiled_call, model)
    prepare = getattr(model, "_prepare_static_cache", None)
    if prepare is not None:
        model._prepare_static_cache = types.MethodType(_reusing_static_cache(runner, prepare), model)
    model.fp8stream_decode = "graphs"
    model._fp8stream_graphs = runner
    gc = getattr(model, "generation_config", None)
    if gc is not None and getattr(gc, "cache_implementation", None) is None and getattr(type(model), "_can_compile_fullgraph", False):
        gc.cache_implementation = "static"


def _reusing_static_cache(runner: "_GraphedSteps", original):
    """transformers' generate builds a new StaticCache in every call (5.x): graphs captured on the previous
    one would write into its storage, so each call would capture again (~0.2-0.3 s on an 8B model, more than a
    short answer's decoding). Hand back the previous call's cache instead, reset (keys / values zeroed, position
    0), when its batch size and length are the ones this call gets (transformers sizes a static cache to the
    longest call so far, so the length repeats); anything else gets a new cache, which replaces the kept one.
    As with transformers 4's reused cache, a `past_key_values` returned by one call is reset by the next."""

    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, *args, **kwargs):
        chunked = (args[0] if args else kwargs.get("prefill_chunk_size")) is not None
        plain = (cache_implementation == "static" and not chunked and not self.config.is_encoder_decoder
                 and getattr(self, "fp8stream_decode", "graphs") == "graphs")
        length = max(max_cache_len, getattr(self, "_previous_max_cache_length", -1))
        kept = runner.kept_cache
        if plain and kept is not None and kept[0] == (batch_size, length):
            cache = kept[1]
            sizes = {getattr(layer, "batch_size", batch_size) for layer in getattr(cache, "layers", [])
                     if getattr(layer, "is_initialized", False)}
            if sizes <= {batch_size}:
                cache.reset()
                self._previous_max_cache_length = length
                return cache
        cache = original(cache_implementation, batch_size, max_cache_len, *args, **kwargs)
        runner.kept_cache = ((batch_size, length), cache) if plain else None
        return cache

    return _prepare_static_cache


def release(model: torch.nn.Module) -> None:
    """Free what the decode runner keeps between generate calls: its graphs (their memory pools) and the
    reused KV cache. The next generate call builds and captures again."""
    runner = getattr(model, "_fp8stream_graphs", None)
    if runner is not None:
        runner.graphs.clear()
        runner.kept_cache = None
        runner.cache = None
        if runner.loop is not None:
            runner.loop.release()


def graph_stats(model: torch.nn.Module) -> dict[str, Any] | None:
    """What the decode runner did: graphs captured, capture seconds, replays, eager steps (None if not installed)."""
    runner = getattr(model, "_fp8stream_graphs", None)
    return None if runner is None else dict(runner.stats)


def _flatten(value, prefix: str, out: list) -> bool:
    """Tensors of a step's kwargs (nested dicts: a model with several mask kinds) as (path, tensor); False
    when a value is of a kind whose replay could differ (a list, an object other than the cache)."""
    if isinstance(value, torch.Tensor):
        out.append((prefix, value))
        return True
    if isinstance(value, dict):
        return all(_flatten(v, f"{prefix}.{k}", out) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def _is_cache(value) -> bool:
    return hasattr(value, "update") and hasattr(value, "get_seq_length")


def _host_state(cache) -> tuple:
    """The cache's Python-level state (ints, bools, sizes), which a replay would not advance."""
    objs = [cache] + list(getattr(cache, "layers", []) or [])
    state = []
    for i, o in enumerate(objs):
        for k, v in sorted(vars(o).items()):
            if isinstance(v, (bool, int, float, str)) or v is None:
                state.append((i, k, v))
            elif isinstance(v, (list, tuple)):
                state.append((i, k, len(v)))
            elif isinstance(v, torch.Tensor):
                state.append((i, k, tuple(v.shape), v.data_ptr()))
    return tuple(state)


def _small_tensors(cache) -> list[torch.Tensor]:
    """The cache's device-side counters (positions, lengths): saved around the warm-up forward, so that
    the warm-up does not advance them (the keys / values it writes are the step's own, written again)."""
    objs = [cache] + list(getattr(cache, "layers", []) or [])
    return [v for o in objs for v in vars(o).values() if isinstance(v, torch.Tensor) and v.numel() <= 64]


def _snapshot(cache, tensors: list[torch.Tensor] = ()):
    """A function that puts back `tensors`, the cache's device counters and its plain Python attributes as they are
    now: a warm-up forward before a capture must leave no trace (the keys / values it writes are the step's own,
    written again by the step)."""
    state = list(tensors) + _small_tensors(cache)
    saved = [t.clone() for t in state]
    objs = [cache] + list(getattr(cache, "layers", []) or [])
    attrs = [(o, {k: v for k, v in vars(o).items() if v is None or isinstance(v, (bool, int, float, str))}) for o in objs]

    def put_back() -> None:
        for t, v in zip(state, saved):
            t.copy_(v)
        for o, d in attrs:
            for k, v in d.items():
                setattr(o, k, v)

    return put_back


class _Graph:
    def __init__(self, static: list[torch.Tensor], graph, output):
        self.static, self.graph, self.output = static, graph, output


class _GraphedSteps:
    """model(**step_kwargs), replayed from a CUDA graph per distinct step signature."""

    def __init__(self, model: torch.nn.Module, capture: bool):
        self.model = model
        self.capture = capture
        self.graphs: dict[tuple, _Graph] = {}
        self.cache: Any = None  # the cache the graphs write into (held: an id() of a freed one could repeat)
        self.kept_cache: tuple[tuple[int, int], Any] | None = None  # ((batch, length), cache) for the next call
        self.disabled: str | None = None
        self.params = self._param_ptrs()
        self.stats = {"graphs": 0, "capture_seconds": 0.0, "replays": 0, "eager_steps": 0}
        self.loop = None  # decode_loop.Loop, when install gave the model fp8stream's own generate loop

    def _param_ptrs(self) -> tuple:
        return tuple(p.data_ptr() for p in self.model.parameters())

    def check_parameters(self) -> None:
        """Once per generate call: a graph reads the parameters where they were at capture."""
        ptrs = self._param_ptrs()
        if ptrs != self.params:
            self.params = ptrs
            self.graphs.clear()
            if self.loop is not None:
                self.loop.release()

    def _eager(self, kwargs):
        self.stats["eager_steps"] += 1
        return self.model(**kwargs)

    def _disable(self, why: str) -> None:
        self.disabled = why
        self.graphs.clear()
        log.warning("fp8stream: decode steps run eagerly (no CUDA graphs): %s", why)

    def __call__(self, **kwargs):
        if self.disabled is not None:
            return self._eager(kwargs)
        ids = kwargs.get("input_ids")
        if ids is None or ids.dim() != 2 or ids.shape[-1] > MAX_GRAPH_TOKENS:
            return self._eager(kwargs)
        caches = [v for v in kwargs.values() if _is_cache(v)]
        tensors: list[tuple[str, torch.Tensor]] = []
        rest = []
        for k, v in sorted(kwargs.items()):
            if _is_cache(v):
                continue
            if not _flatten(v, k, tensors):
                return self._eager(kwargs)
            if not isinstance(v, (torch.Tensor, dict)):
                rest.append((k, v))
        if len(caches) != 1:  # a graph needs the static cache that holds its keys / values
            return self._eager(kwargs)
        cache = caches[0]
        if not getattr(cache, "is_compileable", False):
            return self._eager(kwargs)
        if cache is not self.cache:  # a new cache: graphs of the old one would write into its storage
            self.graphs.clear()
            self.cache = cache
        key = (tuple((p, tuple(t.shape), t.dtype, t.device) for p, t in tensors), tuple(rest))
        g = self.graphs.get(key)
        if g is None:
            if len(self.graphs) >= MAX_GRAPHS:
                self.graphs.clear()
            return self._first(kwargs, key, tensors, cache)
        for buf, (_, t) in zip(g.static, tensors):
            buf.copy_(t)
        if self.capture:
            g.graph.replay()
        else:
            g.output = self.model(**g.graph)
        self.stats["replays"] += 1
        return g.output

    def _first(self, kwargs, key, tensors, cache):
        """Warm-up forward (lazy kernel choice, Triton JIT, cuBLAS handles: nothing of that may happen while
        capturing), then the capture; the first replay computes this step."""
        t0 = time.perf_counter()
        static = [t.clone() for _, t in tensors]
        by_path = dict(zip((p for p, _ in tensors), static))

        def rebuild(v, prefix):
            if isinstance(v, torch.Tensor):
                return by_path[prefix]
            if isinstance(v, dict):
                return {k: rebuild(x, f"{prefix}.{k}") for k, x in v.items()}
            return v

        static_kwargs = {k: (v if _is_cache(v) else rebuild(v, k)) for k, v in kwargs.items()}
        put_back = _snapshot(cache)
        before = _host_state(cache)
        if not self.capture:
            out = self.model(**static_kwargs)
            if _host_state(cache) != before:  # this forward was the step itself: its changes stay
                self._disable(f"{type(cache).__name__} keeps Python-level state that a forward changes")
                return out
            self.graphs[key] = _Graph(static, static_kwargs, out)  # the "graph" is the static kwargs, run eagerly
            self.stats["graphs"] += 1
            self.stats["capture_seconds"] += time.perf_counter() - t0
            return out
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model(**static_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        put_back()
        if _host_state(cache) != before:
            self._disable(f"{type(cache).__name__} keeps Python-level state that a forward changes")
            return self._eager(kwargs)
        # Each graph keeps its own memory pool: a pool shared with graphs that were since dropped (a new cache)
        # trips the caching allocator (torch 2.11: "use_count > 0" internal assert on the next capture).
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self.model(**static_kwargs)
        except Exception as e:  # a host sync or an uncapturable op in the forward
            put_back()
            self._disable(f"capture failed ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
            return self._eager(kwargs)
        if _host_state(cache) != before:  # capture ran the Python again
            put_back()
            self._disable(f"{type(cache).__name__} keeps Python-level state that a forward changes")
            return self._eager(kwargs)
        graph.replay()
        self.graphs[key] = _Graph(static, graph, out)
        self.stats["graphs"] += 1
        self.stats["capture_seconds"] += time.perf_counter() - t0
        return out
