"""fp8stream's own decode loop behind model.generate (decode_loop.py): the tokens of transformers' generate for every
option it takes, transformers' generate for every option it does not, and sampling from the distribution
transformers' processors define. On the CPU the step runs eagerly (the same buffers and on-device bookkeeping);
on CUDA it replays one captured graph per (batch, cache, sampling)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_checkpoint

import fp8stream
from fp8stream import decode, decode_loop

CUDA = torch.cuda.is_available()
ARCHS = ["llama", "qwen2_moe", "mixtral"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for a in ARCHS:
        path, _ = make_checkpoint(a, tmp_path_factory.mktemp(a))
        m = fp8stream.load(path, device="cpu", progress=False)
        decode.install(m, capture=False)
        out[a] = m
    return out


def _prompts(batch: int, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed + batch))


def _pair(model, ids, **kw):
    """(fp8stream's loop, transformers' static-cache loop) for one call; disable_compile sends the second to
    transformers, whose steps then run model.__call__ on the same kind of cache."""
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, **kw}
    with torch.no_grad():
        before = decode.graph_stats(model).get("loop_calls", 0)
        mine = model.generate(ids, **kw)
        assert decode.graph_stats(model)["loop_calls"] == before + 1, decode.graph_stats(model).get("fallback")
        ref = model.generate(ids, disable_compile=True, **kw)
    assert decode.graph_stats(model)["fallback"] == "cache static, compile disabled"
    return mine, ref


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_equal_transformers(models, arch, batch):
    model = models[arch]
    ids = _prompts(batch)
    mine, ref = _pair(model, ids)
    assert torch.equal(mine, ref) and mine.shape == (batch, 19)
    # an end-of-sequence token that row 0 reaches at its 4th new token: that row is padded after it, and a batch
    # of one stops there (transformers' length)
    eos = int(ref[0, 7 + 3])
    mine, ref = _pair(model, ids, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(mine, ref), (mine, ref)
    if batch == 1:
        assert mine.shape[1] < 19
    assert (mine[0, 7:] == eos).any() and (mine[0, 7:][(mine[0, 7:] == eos).nonzero()[0, 0] + 1:] == 1).all()
    # the ban on stopping before min_new_tokens, and the repetition penalty
    mine, ref = _pair(model, ids, eos_token_id=[eos, 2], min_new_tokens=6, repetition_penalty=1.3)
    assert torch.equal(mine, ref)
    assert mine.shape[1] >= 7 + 6


def test_length_from_max_length_and_min_length(models):
    model = models["llama"]
    ids = _prompts(2)
    mine, ref = _pair(model, ids, max_new_tokens=None, max_length=11)
    assert torch.equal(mine, ref) and mine.shape[1] == 11
    eos = int(ref[1, 8])
    mine, ref = _pair(model, ids, max_new_tokens=None, max_length=15, min_length=12, eos_token_id=eos)
    assert torch.equal(mine, ref)


def test_calls_share_the_cache_and_the_step(models):
    model = models["mixtral"]
    loop = model._fp8stream_graphs.loop
    _pair(model, _prompts(2), max_new_tokens=20)
    cache, key = loop.cache, loop.cache_key
    assert key == (2, decode_loop.CACHE_ROUND)
    _pair(model, _prompts(2, length=30), max_new_tokens=5)  # shorter / longer prompts fit the same cache
    assert loop.cache is cache and len([k for k in loop.entries if k[0] == 2]) == 1
    _pair(model, _prompts(3), max_new_tokens=3)  # another batch size: another cache
    assert loop.cache is not cache and loop.cache_key == (3, decode_loop.CACHE_ROUND)
    _pair(model, _prompts(3, length=decode_loop.CACHE_ROUND + 2), max_new_tokens=20)  # longer than the cache: a longer one
    assert loop.cache_key == (3, 2 * decode_loop.CACHE_ROUND)
    decode.release(model)
    assert loop.cache is None and not loop.entries


class _Streamer:
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_gets_the_prompt_then_each_token(models):
    model = models["qwen2_moe"]
    ids = _prompts(1)
    s = _Streamer()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=19, do_sample=False,
                             pad_token_id=0, streamer=s)
    assert decode.graph_stats(model)["fallback"] != "streamer"
    assert torch.equal(s.puts[0], ids) and s.ended
    assert len(s.puts) == 1 + 19 and all(p.shape == (1,) for p in s.puts[1:])
    assert torch.equal(torch.stack(s.puts[1:], 1), out[:, 7:])


def test_generate_text_says_which_loop_ran(models):
    from fp8stream.cli import _generate_summary
    from fp8stream.generation import generate_text
    from test_decode import _NumberTokenizer

    model = models["llama"]
    stats: dict = {}
    text = generate_text(model, _NumberTokenizer(), "x", 6, stats=stats)
    assert stats["loop"] == "fp8stream" and stats["first_token_seconds"] is not None
    assert "fp8stream decode loop" in _generate_summary(stats)
    assert text == generate_text(model, _NumberTokenizer(), "x", 6, decode="eager")  # transformers, dynamic cache
    model.generation_config.cache_implementation = "dynamic"
    try:
        generate_text(model, _NumberTokenizer(), "x", 6, stats=stats)
    finally:
        model.generation_config.cache_implementation = "static"
    assert stats["loop"] == "transformers (cache dynamic)"


@pytest.mark.parametrize("option, reason", [
    ({"num_beams": 2}, "generation option num_beams=2"),
    ({"return_dict_in_generate": True}, "generation option return_dict_in_generate=True"),
    ({"no_repeat_ngram_size": 2}, "generation option no_repeat_ngram_size=2"),
    ({"cache_implementation": "dynamic"}, "cache dynamic"),
    ({"logits_processor": [lambda ids, scores: scores]}, "logits_processor"),
])
def test_options_it_does_not_take_go_to_transformers(models, option, reason):
    model = models["llama"]
    ids = _prompts(2)
    calls = decode.graph_stats(model).get("loop_calls", 0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0, **option)
    stats = decode.graph_stats(model)
    assert stats["fallback"] == reason and stats.get("loop_calls", 0) == calls
    assert (out.sequences if hasattr(out, "sequences") else out).shape[-1] == 7 + 4


def test_left_padding_goes_to_transformers(models):
    model = models["llama"]
    ids = _prompts(2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert decode.graph_stats(model)["fallback"] == "an attention mask with padding" and out.shape == (2, 12)


def _transformers_probs(logits, temperature, top_k, top_p):
    """The distribution transformers samples from: its own warpers, then a softmax."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)])
    return procs(torch.zeros(logits.shape[0], 1, dtype=torch.long), logits.clone()).softmax(-1)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 50, 1.0), (0.7, 20, 0.9), (1.5, 1000, 0.5)])
def test_sampling_draws_from_transformers_distribution(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 300, generator=g) * 3
    want = _transformers_probs(logits, temperature, top_k, top_p)
    s = decode_loop._Sampling(True, temperature, top_k, top_p, 1.0, 0, (), 0)
    b = decode_loop._Buffers(20000, 8, s, "cpu")
    torch.manual_seed(1)
    for row in range(2):
        draws = decode_loop._choose(logits[row].expand(20000, -1), b, s)
        freq = torch.bincount(draws, minlength=300).float() / draws.numel()
        assert (freq[want[row] == 0] == 0).all()  # nothing outside top-k / top-p is ever drawn
        tv = 0.5 * (freq - want[row]).abs().sum()
        assert tv < 0.03, tv  # ~0.005 expected from 20000 draws


def test_sampling_is_seeded_and_top_k_one_is_greedy(models):
    model = models["qwen2_moe"]
    ids = _prompts(2)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, pad_token_id=0)
    with torch.no_grad():
        torch.manual_seed(3)
        a = model.generate(ids, do_sample=True, temperature=0.8, top_p=0.95, **kw)
        torch.manual_seed(3)
        b = model.generate(ids, do_sample=True, temperature=0.8, top_p=0.95, **kw)
        greedy = model.generate(ids, do_sample=False, **kw)
        one = model.generate(ids, do_sample=True, top_k=1, **kw)
    assert decode.graph_stats(model)["loop_calls"] >= 4
    assert torch.equal(a, b) and torch.equal(one, greedy)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU (run on the device)")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen2_moe", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_own_loop_equals_transformers(tmp_path, arch, batch):
    path, _ = make_checkpoint(arch, tmp_path / arch)
    model = fp8stream.load(path, device="cuda", progress=False)  # the default: own loop, graphs
    ids = _prompts(batch).cuda()
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, **kw)
        stats = decode.graph_stats(model)
        assert stats["loop_calls"] == 1 and stats["graphs"] == 1 and stats["replays"] == 11 and stats["eager_steps"] == 0, stats
        ref = model.generate(ids, disable_compile=True, **kw)
        assert torch.equal(out, ref)
        again = model.generate(ids, **kw)  # the kept cache and graph: no capture
        assert torch.equal(again, out) and decode.graph_stats(model)["graphs"] == 1
        eos = int(ref[0, 7 + 5])
        mine = model.generate(ids, **{**kw, "min_new_tokens": 0, "eos_token_id": eos})
        ref = model.generate(ids, disable_compile=True, **{**kw, "min_new_tokens": 0, "eos_token_id": eos})
        assert torch.equal(mine, ref)
        torch.manual_seed(0)
        sampled = model.generate(ids, **{**kw, "do_sample": True, "temperature": 0.7, "top_p": 0.9})
        assert sampled.shape == out.shape and decode.graph_stats(model)["graphs"] == 3
