"""Greedy text generation for the CLI, the demo and the evaluation (one place, no import circle between them)."""

from __future__ import annotations

import os
import time

DECODE_MODES = ("graphs", "compile", "eager")


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, decode: str = "graphs",
                  stats: dict | None = None) -> str:
    """Greedy generation; the chat template is applied when the tokenizer has one.

    decode: "graphs" (default): the model's own generate defaults; a CUDA model from fp8stream.load has a
    static cache and CUDA-graph decode steps (decode.py). "compile": transformers' static-cache recipe,
    the decode step torch.compile'd (mode reduce-overhead) on CUDA. "eager": a dynamic cache, no graphs,
    no compilation. `stats`, when given, receives new_tokens, seconds, the first token's time and (graphs) what
    the runner did."""
    import torch

    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    device = next(model.parameters()).device
    ids = ids.to(device)
    kw = {}
    previous = getattr(model, "fp8stream_decode", None)
    if decode == "compile":
        from .kernels import prepare

        prepare(device)
        kw["cache_implementation"] = "static"
    elif decode == "eager":
        kw["cache_implementation"] = "dynamic"
        kw["disable_compile"] = True
    if previous is not None:
        model.fp8stream_decode = "compile" if decode == "compile" else "graphs"
    if stats is not None:
        from .decode import graph_stats

        kw["streamer"] = first = _FirstToken()
        loop_calls = (graph_stats(model) or {}).get("loop_calls", 0)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                                 **kw)
    finally:
        if previous is not None:
            model.fp8stream_decode = previous
    new = out[0, ids.shape[1]:]
    if stats is not None:
        started = process_start()
        stats.update(new_tokens=int(new.numel()), seconds=time.perf_counter() - t0, decode=decode,
                     first_token_seconds=None if first.at is None else first.at - t0,
                     first_token_since_process_start=None if first.wall is None or started is None else first.wall - started)
        g = graph_stats(model)
        if g is not None and decode == "graphs":
            stats["graphs"] = g
            stats["loop"] = "fp8stream" if g.get("loop_calls", 0) > loop_calls else f"transformers ({g.get('fallback')})"
    return tokenizer.decode(new, skip_special_tokens=True)


class _FirstToken:
    """A transformers streamer that only notes when the first new token reached the host (generate's first put is
    the prompt, the second the first token; each put is a tensor already copied to the CPU by generate)."""

    def __init__(self):
        self.puts, self.at, self.wall = 0, None, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at, self.wall = time.perf_counter(), time.time()

    def end(self) -> None:
        pass


def process_start() -> float | None:
    """This process's start (epoch seconds, 10 ms resolution) from /proc on Linux, else None: a user's time to the
    first token counts the interpreter start and every import too."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks since boot
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])  # seconds since boot, 10 ms resolution (/proc/stat's btime has 1 s)
        return time.time() - (up - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
