"""Architecture coverage: Conv1D (GPT-2 family) in FP8, the quantized share in the report, a refusal instead of a
silently full-precision model, and a fixed fast subset of bench/coverage_sweep.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fp8stream
from fp8stream import UnsupportedModelError
from fp8stream.modules import FP8Linear
from fp8stream.quantize import SCHEMES

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "bench"))
from coverage_sweep import LOGIT_REL_BOUND, check_type  # noqa: E402
from tiny_models import quantize_weight  # noqa: E402


def _reference(w: torch.Tensor, scheme: str, whole: torch.Tensor | None = None):
    """A weight [out, in] quantized as the loader stores it (per-tensor: the float32 scale of the exact amax of the
    checkpoint tensor `whole` it is a slice of, default itself)."""
    from fp8stream.quantize import quantize_rows, scale_from_amax, tensor_amax

    if scheme == "fp8_per_tensor":
        amax = tensor_amax(w if whole is None else whole)
        return quantize_rows(w.clone(), scale_from_amax(amax).expand(w.shape[0]).contiguous())
    return quantize_weight(w, scheme)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _gpt2(out: Path, **overrides):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                     **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # a spread of magnitudes per output feature (a Conv1D weight's column), so scales matter
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name and "wpe" not in name:
                p.mul_(1 + 4 * torch.rand(1, p.shape[1]))
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(out)
    return out, model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return _gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("staging_mib", [256, 0.02])  # one chunk per tensor / column stripes of the [in, out] tensors
def test_gpt2_conv1d_is_fp8_with_per_output_scales(gpt2, scheme, staging_mib):
    path, ref = gpt2
    if scheme == "fp8_per_block":
        staging_mib = max(staging_mib, 0.6)  # 128-row blocks of [., 256] need ~0.5 MiB
    model = fp8stream.load(path, device="cpu", scheme=scheme, progress=False, staging_mib=staging_mib)
    rep = model.fp8stream_report
    ref_params = dict(ref.named_parameters())
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, FP8Linear)]
    assert len(convs) == 8 and all(m.transposed_source for _, m in convs)  # c_attn, c_proj, c_fc, mlp.c_proj x 2 layers
    for name, mod in convs:
        w = ref_params[f"{name}.weight"].detach()  # Conv1D: [in, out]
        q, s = _reference(w.t().contiguous(), scheme)  # the Linear layout, scales over the output features
        assert mod.weight.shape == (w.shape[1], w.shape[0])
        assert torch.equal(mod.weight.view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(mod.weight_scale.reshape(s.shape), s), name
        assert torch.equal(mod.bias, ref_params[f"{name}.bias"])
    assert rep.quantized_tensors == 8 and rep.quantized_fraction == 1.0
    assert rep.peak_bytes <= rep.final_bytes + rep.staging_bytes
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert _rel(got, want) < LOGIT_REL_BOUND
    assert model.generate(ids[:1, :6], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 9)


def test_gpt2_wrong_transpose_breaks_the_bound(gpt2):
    """Negative control: the logit bound catches a Conv1D weight read in the wrong orientation."""
    path, ref = gpt2
    model = fp8stream.load(path, device="cpu", progress=False)
    for block in model.transformer.h:
        mlp = block.mlp.c_proj  # [64, 256] as an FP8Linear, fed [in=256]: swap its rows (output features) around
        mlp.weight.data = mlp.weight.flip(0)
        mlp.weight_scale.data = mlp.weight_scale.flip(0)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(model(ids).logits, ref(ids).logits) > 2 * LOGIT_REL_BOUND


def test_gpt2_nan_names_the_tensor_and_column(gpt2, tmp_path):
    path, _ = gpt2
    sd = load_file(path / "model.safetensors")
    key = next(k for k in sd if k.endswith("h.1.mlp.c_fc.weight"))
    sd[key][5, 37] = float("nan")
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(fp8stream.CheckpointError, match=rf"model.safetensors: tensor '{key}' contains NaN or Inf \(column 37\)$"):
        fp8stream.load(tmp_path, device="cpu", progress=False)


def test_gpt2_export_is_refused_in_one_line(gpt2, tmp_path):
    path, _ = gpt2
    with pytest.raises(UnsupportedModelError, match="export of Conv1D models \\(gpt2"):
        fp8stream.export(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _llama_odd(out: Path):
    from tiny_models import make_checkpoint

    # hidden 72: no Linear has dims that are multiples of 16, so nothing can be FP8
    return make_checkpoint("llama", out, hidden_size=72, intermediate_size=136, num_attention_heads=4, num_key_value_heads=2)


def test_a_model_that_would_stay_full_precision_is_refused(tmp_path):
    path, _ = _llama_odd(tmp_path)
    with pytest.raises(UnsupportedModelError) as e:
        fp8stream.load(path, device="cpu", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "model type 'llama'" in msg and "only 0% of its weights" in msg
    assert "Linear (dims not multiples of 16)" in msg and "--allow-unquantized" in msg
    model = fp8stream.load(path, device="cpu", progress=False, allow_unquantized=True)
    assert model.fp8stream_report.quantized_fraction == 0.0 and model.fp8stream_report.quantized_tensors == 0


def test_ignoring_everything_on_purpose_is_not_refused(gpt2):
    path, _ = gpt2
    model = fp8stream.load(path, device="cpu", progress=False, ignore=[r"\.h\.\d+\."])
    assert model.fp8stream_report.quantized_fraction == 0.0


def test_cli_refuses_with_one_line_and_reports_the_fraction(tmp_path, gpt2):
    path, _ = _llama_odd(tmp_path / "odd")
    run = lambda *a: subprocess.run([sys.executable, "-m", "fp8stream", "load", *a, "--device", "cpu"],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    bad = run(str(path))
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fp8stream: error: ") and "model type 'llama'" in lines[0]
    ok = run(str(path), "--allow-unquantized", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["quantized_fraction"] == 0.0
    g = run(str(gpt2[0]), "--json")
    assert g.returncode == 0 and json.loads(g.stdout)["quantized_fraction"] == 1.0


# A fixed, fast subset of the sweep (bench/coverage_sweep.py; the full table is in the README): dense Linear,
# Conv1D, fused experts and Mixtral-style experts, each with the outcome the sweep gives them.
SUBSET = {"gpt2": "fp8", "openai-gpt": "fp8", "llama": "fp8", "mixtral": "fp8", "qwen3_moe": "fp8", "opt": "fp8", "llama4_text": "fp8", "gpt_oss": "fp8",
          "gpt_neox": "fp8", "phi3": "fp8", "falcon": "fp8", "bloom": "fp8"}


@pytest.mark.parametrize("model_type", sorted(SUBSET))
def test_sweep_subset(model_type, tmp_path):
    row = check_type(model_type, tmp_path)
    assert row["result"] == SUBSET[model_type], row


# The default decode loop on architectures with sliding-window, MLA and hybrid layers (the full table:
# bench/coverage_sweep.py --decode): transformers' tokens, or (gemma3) in float32 where bf16 rounds a masked
# attention over the static cache's slots otherwise; models whose cache keeps a recurrent / convolution state go
# to transformers' loop (their tokens differed in float32 before that rule).
# "same" covers "same in float32" (bf16 rounds the masked attention over the cache's unused slots otherwise: gemma3_text
# is one or the other with the cache length).
DECODE_SUBSET = {"gemma2": "same", "cohere2": "same", "gpt_oss": "same", "mistral": "same", "deepseek_v3": "same",
                 "gemma3_text": "same", "qwen3_5_text": "transformers (cache layers LinearAttentionLayer)",
                 "lfm3": "transformers (cache layers LinearAttentionLayer)"}


@pytest.mark.parametrize("model_type", sorted(DECODE_SUBSET))
def test_decode_loop_subset(model_type, tmp_path):
    row = check_type(model_type, tmp_path, decode=True)
    assert row["result"] == "fp8" and row["decode"].startswith(DECODE_SUBSET[model_type]), row


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpt2_reload_equals_a_fresh_load(gpt2, tmp_path, scheme):
    """reload() of Conv1D weights (transposed reads) gives load()'s bits, in place, from a directory and from tensors."""
    path, _ = gpt2
    other = tmp_path / "b"
    other.mkdir()
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (other / f.name).write_bytes(f.read_bytes())
    sd = {k: v * 1.5 if v.dim() == 2 else v for k, v in load_file(path / "model.safetensors").items()}
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    u8 = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    want = fp8stream.load(other, device="cpu", scheme=scheme, progress=False).state_dict()
    for source in (other, list(sd.items())):
        model = fp8stream.load(path, device="cpu", scheme=scheme, progress=False, staging_mib=0.6)
        ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
        fp8stream.reload(model, source, staging_mib=0.6)
        got = model.state_dict()
        assert all(torch.equal(u8(got[k]), u8(want[k])) for k in want), [k for k in want if not torch.equal(u8(got[k]), u8(want[k]))]
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs


def _llama4(out: Path):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig

    torch.manual_seed(0)
    cfg = Llama4TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                           max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(1 + 4 * torch.rand(*p.shape[:-2], 1, p.shape[-1]))  # spread over the output features of [.., in, out]
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(out)
    return out, model


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return _llama4(tmp_path_factory.mktemp("llama4"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_llama4_transposed_experts_are_fp8(llama4, scheme):
    """Llama 4's experts ([E, H, 2I] / [E, I, H], every token through every expert) are FP8: each expert's slice is
    the hand-quantized transpose, also when the budget streams them in column stripes; logits within the bound."""
    from fp8stream.experts import FP8DenseExperts

    path, ref = llama4
    staging = 0.6 if scheme == "fp8_per_block" else 0.02
    model = fp8stream.load(path, device="cpu", scheme=scheme, progress=False, staging_mib=staging)
    ref_params = dict(ref.named_parameters())
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, FP8DenseExperts)]
    assert len(experts) == 2
    for name, mod in experts:
        for attr in ("gate_up_proj", "down_proj"):
            w = ref_params[f"{name}.{attr}"].detach()  # [E, in, out]
            codes, scales = getattr(mod, attr), getattr(mod, f"{attr}_scale")
            for e in range(w.shape[0]):
                q, s = _reference(w[e].t().contiguous(), scheme, whole=w)  # per-tensor: one scale per checkpoint tensor
                assert torch.equal(codes[e].view(torch.uint8), q.view(torch.uint8)), (name, attr, e)
                assert torch.equal(scales[e].reshape(s.shape), s), (name, attr, e)
    rep = model.fp8stream_report
    assert rep.quantized_fraction > 0.99 and rep.peak_bytes <= rep.final_bytes + rep.staging_bytes
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(model(ids).logits, ref(ids).logits) < LOGIT_REL_BOUND


def test_llama4_nan_names_the_expert_and_column(llama4, tmp_path):
    path, _ = llama4
    sd = load_file(path / "model.safetensors")
    key = next(k for k in sd if k.endswith("layers.1.feed_forward.experts.down_proj"))
    sd[key][2, 5, 9] = float("nan")  # expert 2, input row 5, output feature 9
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(fp8stream.CheckpointError, match=rf"tensor '{key}' contains NaN or Inf \(\[2\], column 9\)$"):
        fp8stream.load(tmp_path, device="cpu", progress=False)


def test_llama4_reload_equals_a_fresh_load(llama4, tmp_path):
    path, _ = llama4
    other = tmp_path / "b"
    other.mkdir()
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (other / f.name).write_bytes(f.read_bytes())
    sd = {k: v * 1.5 if v.dim() >= 2 else v for k, v in load_file(path / "model.safetensors").items()}
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    u8 = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    want = fp8stream.load(other, device="cpu", progress=False).state_dict()
    for source in (other, list(sd.items())):
        model = fp8stream.load(path, device="cpu", progress=False, staging_mib=0.05)
        fp8stream.reload(model, source, staging_mib=0.05)
        got = model.state_dict()
        assert [k for k in want if not torch.equal(u8(got[k]), u8(want[k]))] == []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpt_oss_experts_are_fp8_with_biases_and_clamped_swiglu(tmp_path, scheme):
    """gpt-oss's experts (transposed, interleaved gate/up, biases, clamped SwiGLU) are FP8: each expert's slice is the
    hand-quantized transpose, the biases are kept exactly, logits within the bound."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    from fp8stream.experts import FP8GptOssExperts

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=32,
                       max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"],
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.02).mul_(1 + 4 * torch.rand(*p.shape[:-2], 1, p.shape[-1]))
    ref = ref.to(torch.bfloat16).eval()
    ref.save_pretrained(tmp_path)
    model = fp8stream.load(tmp_path, device="cpu", scheme=scheme, progress=False, staging_mib=0.6 if scheme == "fp8_per_block" else 0.02)
    ref_params = dict(ref.named_parameters())
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, FP8GptOssExperts)]
    assert len(experts) == 2
    for name, mod in experts:
        for attr in ("gate_up_proj", "down_proj"):
            w = ref_params[f"{name}.{attr}"].detach()
            for e in range(w.shape[0]):
                q, s = _reference(w[e].t().contiguous(), scheme, whole=w)
                assert torch.equal(getattr(mod, attr)[e].view(torch.uint8), q.view(torch.uint8)), (name, attr, e)
                assert torch.equal(getattr(mod, f"{attr}_scale")[e].reshape(s.shape), s)
            assert torch.equal(getattr(mod, f"{attr}_bias"), ref_params[f"{name}.{attr}_bias"])
    assert model.fp8stream_report.quantized_fraction > 0.99
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(model(ids).logits, ref(ids).logits) < LOGIT_REL_BOUND
