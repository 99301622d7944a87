"""The default decode path (decode.py): transformers' generate with a static cache, each decode step
through fp8stream's graph runner, gives the tokens of the eager path. On the CPU the runner runs
without capturing (the same buffers, copied in each step, run eagerly); on CUDA it replays CUDA graphs."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import make_checkpoint

import fp8stream
from fp8stream import decode

CUDA = torch.cuda.is_available()
ARCHS = ["llama", "qwen2", "qwen2_moe", "qwen3_moe", "mixtral"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {a: make_checkpoint(a, tmp_path_factory.mktemp(a))[0] for a in ARCHS}


def _prompts(batch: int, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, 250, (batch, length), generator=g)


def _generate(model, ids, new, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, **kw)


def _generate_in_transformers_loop(model, ids, new, **kw):
    """An option fp8stream's own loop does not take (return_dict_in_generate): transformers' generate runs the
    call, each decode step through the graph runner."""
    return _generate(model, ids, new, return_dict_in_generate=True, **kw).sequences


def _assert_same_as_dynamic(model, ids, out, new):
    """The tokens of transformers' eager path (dynamic cache): equal, or equal up to a step where the two
    paths' logits agree within rounding and a bf16 near-tie flipped the argmax (a static cache's masked
    attention rounds differently). Every step up to and including that one has close logits."""
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, cache_implementation="dynamic", disable_compile=True,
                             return_dict_in_generate=True, output_logits=True)
        mine = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(mine.sequences, out)
    for step, (a, b) in enumerate(zip(mine.logits, ref.logits)):
        tol = 0.05 * b.abs().amax()
        assert (a.float() - b.float()).abs().amax() <= tol, f"step {step}: logits differ"
        mine_tok, ref_tok = mine.sequences[:, ids.shape[1] + step], ref.sequences[:, ids.shape[1] + step]
        if not torch.equal(mine_tok, ref_tok):
            rows = (mine_tok != ref_tok).nonzero().flatten()
            ref_logits = b.float()[rows]
            margin = ref_logits.max(-1).values - ref_logits.gather(-1, mine_tok[rows, None]).squeeze(-1)
            assert bool((margin <= 2 * tol).all()), f"step {step}: a flip without a near-tie ({margin.tolist()})"
            return


def _route_through_runner_on_cpu(model):
    """transformers only uses get_compiled_call on accelerators; its testing flag lets the CPU take it."""
    from transformers.generation.configuration_utils import CompileConfig

    model.generation_config.compile_config = CompileConfig()
    model.generation_config.compile_config._compile_all_devices = True


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_runner_gives_the_eager_tokens(checkpoints, arch, batch):
    model = fp8stream.load(checkpoints[arch], device="cpu", progress=False)
    assert getattr(model, "_fp8stream_graphs", None) is None  # load installs it on CUDA only
    decode.install(model, capture=False, own_loop=False)  # transformers' loop (own loop: test_decode_loop.py)
    assert model.generation_config.cache_implementation == "static"
    _route_through_runner_on_cpu(model)
    ids = _prompts(batch)
    out = _generate(model, ids, 10)
    stats = decode.graph_stats(model)
    assert stats["graphs"] == 1 and stats["replays"] == 8 and stats["eager_steps"] == 0  # 9 decode steps: 1 first + 8 replays
    same_cache = _generate(model, ids, 10, disable_compile=True)  # static cache, model.__call__ every step
    assert torch.equal(out, same_cache)
    if arch in ("llama", "qwen2"):  # MoE: a near-tie in the router flips an expert, and the logits with it
        _assert_same_as_dynamic(model, ids, out, 10)
    # a later call with the same shapes reuses the cache (reset) and the graph: no capture, the same tokens
    replays = decode.graph_stats(model)["replays"]
    assert torch.equal(_generate(model, ids, 10), out)
    stats = decode.graph_stats(model)
    assert stats["graphs"] == 1 and stats["replays"] == replays + 9 and stats["eager_steps"] == 0, stats
    # a shorter call fits the kept cache (sized to the longest call so far): still no capture
    assert torch.equal(_generate(model, ids, 4), out[:, : ids.shape[1] + 4])
    assert decode.graph_stats(model)["graphs"] == 1
    # a larger batch needs another cache, hence another graph; release() frees both
    _generate(model, _prompts(batch + 1), 3)
    assert decode.graph_stats(model)["graphs"] == 2
    decode.release(model)
    assert model._fp8stream_graphs.kept_cache is None and not model._fp8stream_graphs.graphs


def test_runner_keeps_the_models_own_cache_choice(checkpoints):
    model = fp8stream.load(checkpoints["llama"], device="cpu", progress=False)
    model.generation_config.cache_implementation = "dynamic"
    decode.install(model, capture=False)
    assert model.generation_config.cache_implementation == "dynamic"


class _IntCache:
    """A compilable-looking cache whose position is a Python int: a replay would not advance it."""

    is_compileable = True

    def __init__(self):
        self.length = 0

    def update(self, *a, **k):
        pass

    def get_seq_length(self):
        return self.length


class _IntModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, input_ids, past_key_values, **unused):
        past_key_values.length += 1
        return input_ids * self.w + past_key_values.length


def test_python_level_cache_state_turns_graphs_off(caplog):
    model = _IntModel()
    runner = decode._GraphedSteps(model, capture=False)
    cache = _IntCache()
    with caplog.at_level(logging.WARNING, logger="fp8stream"):
        first = runner(input_ids=torch.ones(1, 1), past_key_values=cache)
        second = runner(input_ids=torch.ones(1, 1), past_key_values=cache)
    assert runner.disabled is not None and "Python-level state" in caplog.text
    assert first.item() == 2 and second.item() == 3  # eager from then on: every step advances the position
    assert runner.stats["eager_steps"] == 1


def test_moved_parameters_drop_the_graphs():
    model = _IntModel()
    runner = decode._GraphedSteps(model, capture=False)
    runner.graphs[("k",)] = object()
    runner.check_parameters()
    assert runner.graphs  # nothing moved
    model.w.data = torch.zeros(1)
    runner.check_parameters()
    assert not runner.graphs


def test_long_steps_and_unknown_inputs_run_eagerly():
    model = _IntModel()
    runner = decode._GraphedSteps(model, capture=False)
    runner(input_ids=torch.ones(1, 8), past_key_values=_IntCache())  # > MAX_GRAPH_TOKENS: a prefill chunk
    runner(input_ids=torch.ones(1, 1), past_key_values=_IntCache(), extra=[1, 2])  # a list: not replayable
    assert runner.stats["eager_steps"] == 2 and runner.stats["graphs"] == 0


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU (run on the device)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_decode_equals_eager(checkpoints, arch, batch):
    model = fp8stream.load(checkpoints[arch], device="cuda", progress=False)
    assert model.generation_config.cache_implementation == "static"
    ids = _prompts(batch).cuda()
    out = _generate_in_transformers_loop(model, ids, 12)
    stats = decode.graph_stats(model)
    assert stats["graphs"] == 1 and stats["replays"] == 10 and stats["eager_steps"] == 0, stats
    assert stats["fallback"].startswith("generation option return_dict_in_generate")
    eager_static = _generate(model, ids, 12, disable_compile=True)
    assert torch.equal(out, eager_static)
    assert torch.equal(_generate_in_transformers_loop(model, ids, 12), out)  # the kept cache and graph: no capture
    stats = decode.graph_stats(model)
    assert stats["graphs"] == 1 and stats["replays"] == 21 and stats["eager_steps"] == 0, stats
    if arch in ("llama", "qwen2"):
        _assert_same_as_dynamic(model, ids, out, 12)


class _NumberTokenizer:
    """The smallest tokenizer generate_text needs: a fixed 3-token prompt, ids printed as numbers."""

    chat_template, pad_token_id, eos_token_id = None, 0, None

    def __call__(self, text, return_tensors):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([[5, 6, 7]]))

    def decode(self, ids, skip_special_tokens):
        return " ".join(map(str, ids.tolist()))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU (run on the device)")
def test_cuda_generate_cli_reports_graphs(checkpoints, capsys):
    from fp8stream.generation import generate_text

    model = fp8stream.load(checkpoints["qwen3_moe"], device="cuda", progress=False)
    stats: dict = {}
    graphs = generate_text(model, _NumberTokenizer(), "x", 8, stats=stats)
    assert stats["graphs"]["replays"] >= 6 and stats["loop"] == "fp8stream", stats
    assert generate_text(model, _NumberTokenizer(), "x", 8, decode="eager") == graphs


def test_generate_reports_the_time_to_the_first_token(checkpoints):
    import time

    from fp8stream.cli import _generate_summary
    from fp8stream.generation import generate_text, process_start

    model = fp8stream.load(checkpoints["llama"], device="cpu", progress=False)
    stats: dict = {}
    text = generate_text(model, _NumberTokenizer(), "x", 6, decode="eager", stats=stats)
    # the streamer that times the first token changes no token
    assert text == generate_text(model, _NumberTokenizer(), "x", 6, decode="eager")
    assert 0 < stats["first_token_seconds"] <= stats["seconds"], stats
    started = time.time() - process_start()  # this process (pytest) has run longer than the generate call
    assert stats["first_token_seconds"] < stats["first_token_since_process_start"] < started, (stats, started)
    line = _generate_summary(stats)
    assert f"first token {stats['first_token_seconds']:.2f} s into generate" in line
    assert "after the process started" in line


def test_snapshot_puts_back_counters_and_python_attributes():
    """The warm-up before a capture (both loops) must leave no trace: a cache's device counters, its layers' plain
    Python attributes and the loop's own buffers are put back as they were."""
    from types import SimpleNamespace

    from fp8stream.decode import _snapshot

    layer = SimpleNamespace(seen=3, ready=True, keys=torch.zeros(4, 100), pos=torch.tensor([5]))
    cache = SimpleNamespace(layers=[layer], offset=7)
    buf = torch.tensor([1, 2])
    put_back = _snapshot(cache, [buf])
    layer.seen, layer.ready, cache.offset = 4, False, 8
    layer.pos += 1
    layer.keys += 1  # big tensors (the keys / values) are the step's own: not saved
    buf.add_(10)
    put_back()
    assert (layer.seen, layer.ready, cache.offset) == (3, True, 7)
    assert layer.pos.item() == 5 and buf.tolist() == [1, 2] and layer.keys.sum().item() == 400
