"""build_plan renames a checkpoint key once per key shape and reuses it for the other numbers (_renames._Renamer):
the plans and every error must be exactly those of renaming each key with transformers."""

from __future__ import annotations

import copy
import dataclasses
import random
import re
from pathlib import Path

import pytest
import torch

from fp8stream import _renames, load_plan
from fp8stream.checkpoint import Checkpoint
from fp8stream.errors import Fp8StreamError
from fp8stream.load_plan import build_plan
from fp8stream.loader import _load_config
from fp8stream.meta_model import build_meta_model
from tiny_models import make_checkpoint

# several layers and experts: most keys share their shape with an earlier key
MANY = {
    "qwen2_moe": dict(num_hidden_layers=6, num_experts=12),
    "qwen3_moe": dict(num_hidden_layers=6, num_experts=12),
    "mixtral": dict(num_hidden_layers=6, num_local_experts=12),
    "llama": dict(num_hidden_layers=12),
    "qwen2": dict(num_hidden_layers=12),
    "opt": dict(num_hidden_layers=12),
}


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            path, _ = make_checkpoint(arch, tmp_path_factory.mktemp(arch), **MANY[arch])
            cache[arch] = build_meta_model(_load_config(Path(path)), torch.bfloat16), Checkpoint(path)
        return cache[arch]

    return get


def _plans(model, ckpt) -> dict:
    return {name: dataclasses.astuple(plan) for name, plan in build_plan(model, ckpt).items()}


def _renamer(model) -> _renames._Renamer:
    renamings, converters = load_plan._conversions(model)
    return _renames._Renamer(renamings, converters, model.base_model_prefix, dict(model.state_dict(keep_vars=True)))


@pytest.mark.parametrize("arch", list(MANY))
def test_reuse_gives_the_plans_of_renaming_every_key(many, arch, monkeypatch):
    model, ckpt = many(arch)
    reused = _plans(model, ckpt)
    monkeypatch.setattr(_renames, "_REUSE_RENAMES", False)
    assert _plans(model, ckpt) == reused


def _variants(key: str, rng: random.Random) -> list[str]:
    """Names a damaged checkpoint might hold: other (repeated, out of range, zero-padded) numbers, no 'model.'
    prefix (transformers adds it back where that names a parameter), an edited character."""
    out = []
    for name in (key, key.partition(".")[2]):
        out += [".".join(rng.choice(["0", "1", "5", "11", "99", "007"]) if p.isdigit() else p for p in name.split("."))
                for _ in range(3)]
    for _ in range(3):
        i = rng.randrange(len(key))
        out.append(key[:i] + rng.choice("._:x0") + key[i + 1:])
        out.append(key[:i] + key[i + 1:])
    return out


@pytest.mark.parametrize("arch", list(MANY))
def test_reuse_gives_transformers_renaming_for_every_key(many, arch):
    model, ckpt = many(arch)
    renamer = _renamer(model)
    keys = load_plan._natural_order(ckpt.tensors)
    got = [renamer(k) for k in keys]
    assert renamer.reuse and sum(v is not None for v in renamer.shapes.values()) >= 5, renamer.shapes
    assert got == [renamer.exact(k) for k in keys]
    rng = random.Random(arch)
    variants = [v for k in keys for v in _variants(k, rng)]
    assert [renamer(v) for v in variants] == [renamer.exact(v) for v in variants]


def _damaged(ckpt: Checkpoint, key: str, new: str | None = None, *, keep: bool = False, shape=None) -> Checkpoint:
    """A copy of `ckpt` (headers only) with `key` renamed to `new` (or kept and copied to `new`), or its shape changed."""
    out = copy.copy(ckpt)
    out.tensors = dict(ckpt.tensors)
    info = out.tensors[key] if keep else out.tensors.pop(key)
    new = new or key
    out.tensors[new] = dataclasses.replace(info, key=new, shape=shape or info.shape)
    return out


E = "model.layers.4.mlp.experts.7."
M = "model.layers.4.block_sparse_moe.experts.7."
DAMAGE = [  # (arch, key of a later layer / expert, damage, a fragment of the error)
    ("qwen2_moe", E + "up_proj.weight", dict(new=E + "up_proj:weight"), "loosely resembles"),
    ("qwen2_moe", E + "up_proj.weight", dict(new=E + "up_projs.weight"), "has no parameter"),
    ("qwen2_moe", E + "up_proj.weight", dict(new=E.replace(".7.", ".99.") + "up_proj.weight"), "expert 99"),
    ("qwen2_moe", E + "up_proj.weight", dict(new=E.replace(".4.", ".40.") + "up_proj.weight"), "model.layers.40.mlp.experts.gate_up_proj"),
    ("qwen2_moe", E + "up_proj.weight", dict(new=E.replace(".7.", ".08.") + "up_proj.weight", keep=True), "both expert 8"),
    ("qwen2_moe", E + "down_proj.weight", dict(shape=(128, 32)), "tensors like"),
    ("qwen2_moe", "model.layers.4.self_attn.q_proj.weight", dict(new="model.layers.40.self_attn.q_proj.weight"), "has no parameter"),
    ("qwen2_moe", "model.layers.4.self_attn.q_proj.weight", dict(new="layers.4.self_attn.q_proj.weight", keep=True), "both map to"),
    ("qwen2_moe", "model.layers.4.self_attn.q_proj.weight", dict(shape=(128, 64)), "has shape [128, 64]"),
    ("mixtral", M + "w1.weight", dict(new=M + "w1Xweight"), "unexpected tensor"),
    ("mixtral", M + "w1.weight", dict(new=M.replace(".block", ":block") + "w1.weight"), "loosely resembles"),
    ("mixtral", M + "w3.weight", dict(new=M.replace(".4.", ".44.") + "w3.weight"), "unexpected tensor"),
    ("mixtral", M + "w2.weight", dict(new=M.replace(".7.", ".04.") + "w2.weight", keep=True), "both expert 4"),
    ("llama", "model.layers.9.mlp.up_proj.weight", dict(new="model.layers.9.mlp.up_proj.weight.9"), "has no parameter"),
    ("llama", "model.layers.9.mlp.up_proj.weight", dict(new="model.layers.9.9.mlp.up_proj.weight"), "has no parameter"),
]


@pytest.mark.parametrize("arch,key,damage,fragment", DAMAGE, ids=[f"{a}-{d.get('new') or d.get('shape')}" for a, _, d, _ in DAMAGE])
def test_damaged_later_key_gives_the_same_error(many, arch, key, damage, fragment, monkeypatch):
    """The damaged key is not the first of its shape, so without the checks it would take a reused renaming."""
    model, ckpt = many(arch)
    ckpt = _damaged(ckpt, key, **damage)

    def error():
        with pytest.raises(Fp8StreamError) as e:
            build_plan(model, ckpt)
        return type(e.value), str(e.value)

    reused = error()
    monkeypatch.setattr(_renames, "_REUSE_RENAMES", False)
    assert error() == reused
    assert fragment in reused[1], reused[1]


def _synthetic_keys() -> list[str]:
    keys = []
    for i in (0, 1, 2, 3, 10, 11, 23, 7, 1, 0):
        for j in (0, 5, 1, 12, 3, 0, 1):
            keys += [f"model.layers.{i}.ffn.experts.{j}.w1.weight", f"h.{i}.attn.{j}.proj.weight", f"blocks.{i}.{j}.norm.weight",
                     f"{i}.ffn.{j}", f"layers.{i}.LayerNorm.gamma", f"model.layers.{i}.ffnX{j}.w1.weight"]
    return keys


def _renamings(*pairs):
    from transformers.core_model_loading import WeightRenaming

    return [WeightRenaming(source_patterns=s, target_patterns=t) for s, t in pairs]


@pytest.mark.parametrize("pairs,reuse", [
    ([(".ffn.", ".mlp."), ("attn.*.proj", "attention.proj"), ("LayerNorm.gamma", "LayerNorm.weight")], True),
    ([("experts.*.w1.weight", "experts.w1"), ("blocks.*.norm", "norm")], True),
    ([(r"layers\.1\.", "layers.one.")], False),  # a regex that tells numbers apart
    ([(r"layers\.(\d+)\.ffn", r"blocks.\1.mlp")], False),  # a group
    ([("ffn.", "mlp")], False),  # a number after the dot would be glued to 'mlp'
    ([("ffn", "mlp.1")], False),  # a number in the replacement
])
def test_renamings_that_see_numbers_are_not_reused(pairs, reuse):
    """Hand-made renamings: reuse only where `_number_blind` holds, and always transformers' result."""
    renamer = _renames._Renamer(_renamings(*pairs), [], "model", {"model.layers.3.mlp.experts.0.w1.weight": 1})
    keys = _synthetic_keys()
    assert [renamer(k) for k in keys] == [renamer.exact(k) for k in keys]
    assert renamer.reuse == reuse and any(v is not None for v in renamer.shapes.values()) == reuse


def test_stateful_or_custom_renamings_turn_reuse_off():
    import transformers.core_model_loading as cml

    transforms = [cml.PrefixChange(prefix_to_add="model")]
    if hasattr(cml, "LayerPairCollapse"):  # transformers >= 5.24
        transforms.append(cml.LayerPairCollapse())
    for transform in transforms:
        assert not _renames._number_blind(transform)


def _compiled_as(pairs, regexes):
    """Renamings whose compiled regexes are given, as older transformers compile them (5.17: 'LayerNorm.gamma' with no
    '(?!\\w)' after it, '.weight_g$' with its anchor)."""
    out = _renamings(*pairs)
    for t, rx in zip(out, regexes):
        t.compiled_sources = re.compile(rx)
    return out


def test_older_transformers_regexes_keep_reuse_and_stay_exact():
    """A final word with no boundary after it (its match may end inside a longer word) is reused only when the
    replacement ends in a word character, so the rest of that word stays glued to a word; '$' anchors are reused.
    Every key still gets transformers' own result."""
    ok = _compiled_as([("LayerNorm.gamma", "LayerNorm.weight"), (".weight_g$", ".parametrizations.weight.original0"), (".ffn.", ".mlp.")],
                      [r"(?P<g0>LayerNorm.gamma)", r"(?P<g0>.weight_g$)", r"(?P<g0>.ffn.)"])
    assert all(_renames._number_blind(t) for t in ok)
    glued = _compiled_as([("LayerNorm.gamma", "LayerNorm.")], [r"(?P<g0>LayerNorm.gamma)"])  # 'gamma5' -> 'LayerNorm.5'
    assert not _renames._number_blind(glued[0])
    renamer = _renames._Renamer(ok, [], "model", {"model.layers.3.mlp.experts.0.w1.weight": 1})
    keys = _synthetic_keys() + [f"layers.{i}.LayerNorm.gamma{j}.x{i + 1}" for i in (0, 3, 5) for j in (0, 5, 7)] + [
        f"h.{i}.conv.weight_g" for i in (0, 1, 12)] + [f"h.{i}.conv.weight_g.{i + 1}" for i in (0, 1, 12)]
    assert [renamer(k) for k in keys] == [renamer.exact(k) for k in keys]
    assert renamer.reuse and sum(v is not None for v in renamer.shapes.values()) >= 5


def test_meta_model_skips_torch_init_on_meta_only(monkeypatch):
    """build_meta_model: torch's init functions do nothing to meta parameters (nn.Linear.reset_parameters in
    __init__), still initialise real tensors inside the build (constructors' buffers), and are restored after."""
    from torch import nn

    from fp8stream.meta_model import _no_init_weights
    from tiny_models import make_config  # noqa: E402

    calls = []
    real = nn.init.kaiming_uniform_
    monkeypatch.setattr(nn.init, "kaiming_uniform_", lambda t, *a, **k: calls.append(t.is_meta) or real(t, *a, **k))
    patched = nn.init.kaiming_uniform_
    model = build_meta_model(make_config("llama"), torch.bfloat16)
    assert all(p.is_meta for p in model.parameters()) and calls == []
    assert nn.init.kaiming_uniform_ is patched  # restored
    with _no_init_weights():
        w = nn.init.uniform_(torch.zeros(64), 1.0, 2.0)
        nn.Linear(4, 4, device="meta")
    assert (w >= 1).all() and calls == []
    nn.Linear(4, 4)
    assert calls == [False]  # outside the build, torch's init runs as before
