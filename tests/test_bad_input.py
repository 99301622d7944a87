"""Bad input: every fault is one clean Fp8StreamError line naming the file / tensor, never a wrong model.

Corrupt checkpoints are built by rewriting safetensors files directly (8-byte little-endian header
length + JSON header + data), so each case exercises exactly one kind of damage. A seeded fuzz test
then throws a few hundred random corruptions at a small sharded checkpoint and checks that each one
either fails cleanly or loads exactly the model its bytes describe.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fp8stream
from fp8stream import CheckpointError, Fp8StreamError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import make_checkpoint  # noqa: E402

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Pristine checkpoints, written once; tests corrupt copies of them."""
    root = tmp_path_factory.mktemp("pristine")
    out = {}
    for name, arch, shard in [("llama", "llama", None), ("llama_sharded", "llama", "200KB"),
                              ("mixtral", "mixtral", None), ("mixtral_sharded", "mixtral", "200KB"),
                              ("qwen2_moe", "qwen2_moe", None)]:
        make_checkpoint(arch, root / name, max_shard_size=shard)
        out[name] = root / name
    assert (out["llama_sharded"] / INDEX).is_file() and not (out["llama"] / INDEX).exists()
    return out


@pytest.fixture
def ckpt(pristine, tmp_path):
    """ckpt("llama") -> a fresh copy of a pristine checkpoint to damage."""

    def copy(name: str) -> Path:
        dst, i = tmp_path / name, 1
        while dst.exists():
            dst, i = tmp_path / f"{name}-{i}", i + 1
        shutil.copytree(pristine[name], dst)
        return dst

    return copy


def load(path, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    return fp8stream.load(path, **kw)


def one_line(msg: str) -> bool:
    return bool(msg) and len(msg.splitlines()) == 1 and msg == msg.strip()


def expect_error(path, *fragments, cls=CheckpointError, **kw) -> str:
    """Loading must raise `cls` with a one-line message containing every fragment."""
    with pytest.raises(Fp8StreamError) as ei:
        load(path, **kw)
    err, msg = ei.value, str(ei.value)
    assert isinstance(err, cls), f"{type(err).__name__} is not {cls.__name__}: {msg}"
    assert one_line(msg), repr(msg)
    for frag in fragments:
        assert str(frag) in msg, f"{str(frag)!r} not in {msg!r}"
    return msg


def read_st_bytes(raw: bytes) -> tuple[dict, bytes]:
    """(header, data section) of safetensors bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def read_st(path) -> tuple[dict, bytes]:
    return read_st_bytes(Path(path).read_bytes())


def header_bytes(header: dict) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def write_st(path, header: dict, data: bytes, hlen: int | None = None) -> None:
    text = header_bytes(header)
    Path(path).write_bytes(struct.pack("<Q", len(text) if hlen is None else hlen) + text + data)


def shard_of(ckpt: Path, key: str) -> Path:
    index = ckpt / INDEX
    if index.is_file():
        return ckpt / json.loads(index.read_text())["weight_map"][key]
    return ckpt / SINGLE


def edit_tensors(ckpt: Path, key: str, fn) -> Path:
    """Rewrite the shard holding `key` with fn(tensors dict) applied; the index follows added/removed keys."""
    file = shard_of(ckpt, key)
    tensors = load_file(file)
    before = set(tensors)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    index = ckpt / INDEX
    if index.is_file():
        doc = json.loads(index.read_text())
        for k in before - set(tensors):
            doc["weight_map"].pop(k)
        for k in set(tensors) - before:
            doc["weight_map"][k] = file.name
        index.write_text(json.dumps(doc))
    return file


def set_value(ckpt: Path, key: str, index, value: float) -> Path:
    def fn(t):
        t[key][index] = value

    return edit_tensors(ckpt, key, fn)


def edit_config(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def model_diff(a, b) -> str | None:
    """None if the two models hold bit-identical parameters and buffers, else the first differing name."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return f"keys differ: {sorted(set(sa) ^ set(sb))[:3]}"
    for k in sa:
        if sa[k].dtype != sb[k].dtype or sa[k].shape != sb[k].shape or not torch.equal(bits(sa[k]), bits(sb[k])):
            return k
    return None


# --------------------------------------------------------------------------------------- path & config


def test_path_missing(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    expect_error(missing, missing, "no such file or directory")


def test_path_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"not a directory")
    expect_error(f, f, "not a directory")


def test_no_config_json(ckpt):
    d = ckpt("llama")
    (d / "config.json").unlink()
    expect_error(d, d / "config.json", "missing")


def test_unknown_model_type(ckpt):
    d = ckpt("llama")
    edit_config(d, model_type="definitely_not_a_model")
    expect_error(d, d / "config.json", "definitely_not_a_model")


@pytest.mark.parametrize("text", ["{not json", '{"model_type": "llama",', "", "\xff\xfe garbage", "[1, 2]"])
def test_config_not_valid_json(ckpt, text):
    d = ckpt("llama")
    (d / "config.json").write_bytes(text.encode("latin-1"))
    expect_error(d, d / "config.json", "JSON")


def test_config_impossible_values(ckpt):
    d = ckpt("llama")
    edit_config(d, num_hidden_layers="two")
    msg = expect_error(d, d / "config.json", "num_hidden_layers")
    assert "expected int" in msg  # the reason, not just "Validation error for field ...:"
    d = ckpt("llama")
    edit_config(d, vocab_size=-1)
    expect_error(d, d / "config.json", "negative dimension")


# ---------------------------------------------------------------------------------------------- index


def test_index_names_missing_shard(ckpt):
    d = ckpt("llama_sharded")
    doc = json.loads((d / INDEX).read_text())
    doc["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (d / INDEX).write_text(json.dumps(doc))
    expect_error(d, d / INDEX, "model-00009-of-00009.safetensors", "does not exist")


def test_index_names_tensor_not_in_its_shard(ckpt):
    d = ckpt("llama_sharded")
    doc = json.loads((d / INDEX).read_text())
    key = "model.layers.1.mlp.down_proj.weight"
    real = doc["weight_map"][key]
    other = next(v for v in sorted(set(doc["weight_map"].values())) if v != real)
    doc["weight_map"][key] = other
    (d / INDEX).write_text(json.dumps(doc))
    expect_error(d, d / other, key, "not in this shard", real)
    # and a key the index promises that is in no shard at all
    d = ckpt("mixtral_sharded")
    doc = json.loads((d / INDEX).read_text())
    doc["weight_map"]["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = doc["weight_map"]["model.norm.weight"]
    (d / INDEX).write_text(json.dumps(doc))
    expect_error(d, "model.layers.0.block_sparse_moe.experts.9.w1.weight", "not in this shard")


@pytest.mark.parametrize("text", ['{"weight_map": ', '{"metadata": {}}', '{"weight_map": [1]}',
                                  '{"weight_map": {"model.norm.weight": 3}}', '{"weight_map": {"a": ["x"]}}'])
def test_index_malformed(ckpt, text):
    d = ckpt("llama_sharded")
    (d / INDEX).write_text(text)
    expect_error(d, d / INDEX, "not a valid safetensors index")


# -------------------------------------------------------------------------------- safetensors structure


def test_truncated_shard(ckpt):
    d = ckpt("llama_sharded")
    shard = shard_of(d, "model.layers.0.mlp.up_proj.weight")
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-1000])
    expect_error(d, shard, "truncated")
    shard.write_bytes(raw[:5])
    expect_error(d, shard, "truncated")
    shard.write_bytes(b"")
    expect_error(d, shard, "truncated")


@pytest.mark.parametrize("hlen", ["size", 2**63 + 5, 2**64 - 1, 0, 7])
def test_header_length_out_of_range(ckpt, hlen):
    d = ckpt("llama")
    f = d / SINGLE
    header, data = read_st(f)
    n = {"size": f.stat().st_size}.get(hlen, hlen)
    write_st(f, header, data, hlen=n)
    msg = expect_error(d, f)
    assert ("header length" in msg and "out of range" in msg) or "not valid JSON" in msg, msg


def test_data_offsets_out_of_range(ckpt):
    d = ckpt("llama")
    f = d / SINGLE
    header, data = read_st(f)
    key = "model.layers.1.self_attn.o_proj.weight"
    b, e = header[key]["data_offsets"]
    header[key]["data_offsets"] = [len(data) + 64, len(data) + 64 + (e - b)]
    write_st(f, header, data)
    expect_error(d, f, key, "out of range")


def test_overlapping_tensors(ckpt):
    d = ckpt("llama")
    f = d / SINGLE
    header, data = read_st(f)
    a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    assert header[a]["shape"] == header[b]["shape"]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # b now reads a's bytes
    write_st(f, header, data)
    expect_error(d, f, a, b, "overlap")


def test_header_duplicate_key(ckpt):
    d = ckpt("llama")
    f = d / SINGLE
    header, data = read_st(f)
    a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    text = header_bytes(header).replace(json.dumps(b).encode(), json.dumps(a).encode())  # JSON would keep the last
    f.write_bytes(struct.pack("<Q", len(text)) + text + data)
    expect_error(d, f, a, "more than once")


@pytest.mark.parametrize("entry", [
    {"dtype": "F4", "shape": [128, 128], "data_offsets": "keep"},
    {"dtype": "BF16", "shape": [128.0, 128], "data_offsets": "keep"},
    {"dtype": "BF16", "shape": "128,128", "data_offsets": "keep"},
    {"dtype": "BF16", "shape": [128, 128], "data_offsets": [0]},
    {"dtype": "BF16", "shape": [128, 128]},
    {"dtype": "BF16", "shape": [128, -128], "data_offsets": "keep"},
    {"dtype": "BF16", "shape": [128, 64], "data_offsets": "keep"},
    ["BF16"],
])
def test_malformed_header_entry(ckpt, entry):
    d = ckpt("llama")
    f = d / SINGLE
    header, data = read_st(f)
    key = "model.layers.1.self_attn.q_proj.weight"
    if isinstance(entry, dict) and entry.get("data_offsets") == "keep":
        entry = {**entry, "data_offsets": header[key]["data_offsets"]}
    header[key] = entry
    write_st(f, header, data)
    expect_error(d, f, key)


def test_header_not_an_object(ckpt):
    d = ckpt("llama")
    f = d / SINGLE
    _, data = read_st(f)
    text = b"[1, 2, 3]       "
    f.write_bytes(struct.pack("<Q", len(text)) + text + data)
    expect_error(d, f, "not a JSON object")


# ------------------------------------------------------------------------------ checkpoint vs the model


def test_tensor_shape_differs_from_model(ckpt):
    d = ckpt("llama_sharded")
    key = "model.layers.1.self_attn.k_proj.weight"
    f = edit_tensors(d, key, lambda t: t.__setitem__(key, t[key][:, :64].contiguous()))
    expect_error(d, f, key, "shape", "[64, 64]")


def test_checkpoint_key_missing(ckpt):
    for name in ("llama", "llama_sharded"):
        d = ckpt(name)
        key = "model.layers.1.mlp.down_proj.weight"
        edit_tensors(d, key, lambda t: t.pop(key))
        expect_error(d, d, key, "no tensor")


def test_unexpected_key(ckpt):
    for name in ("llama", "llama_sharded"):
        d = ckpt(name)
        extra = "model.layers.0.mlp.extra_proj.weight"
        f = edit_tensors(d, "model.norm.weight", lambda t: t.__setitem__(extra, torch.ones(4, 4, dtype=torch.bfloat16)))
        expect_error(d, f, extra, "unexpected")


def test_two_keys_for_one_parameter(ckpt):
    """'norm.weight' is renamed to 'model.norm.weight' (base-model prefix): two sources, never pick one silently."""
    d = ckpt("llama")
    f = edit_tensors(d, "model.norm.weight", lambda t: t.__setitem__("norm.weight", t["model.norm.weight"] * 2))
    expect_error(d, f, "model.norm.weight", "'norm.weight'", "both")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.bool])
@pytest.mark.parametrize("key", ["model.layers.0.self_attn.v_proj.weight", "model.layers.1.input_layernorm.weight"])
def test_integer_dtype_for_float_weight(ckpt, dtype, key):
    d = ckpt("llama")
    f = edit_tensors(d, key, lambda t: t.__setitem__(key, torch.ones(t[key].shape, dtype=dtype)))
    expect_error(d, f, key, "dtype", str(dtype).removeprefix("torch."))


@pytest.mark.parametrize("scheme", fp8stream.SCHEMES)
def test_nan_in_quantized_weight(ckpt, scheme):
    d = ckpt("llama_sharded")
    key = "model.layers.1.mlp.up_proj.weight"
    f = set_value(d, key, (77, 5), float("nan"))
    msg = expect_error(d, f, key, "NaN", scheme=scheme)
    if scheme == "fp8_per_channel":
        assert "row 77" in msg


@pytest.mark.parametrize("key", ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight",
                                 "model.layers.0.post_attention_layernorm.weight"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_inf_in_kept_weight(ckpt, key, value):
    d = ckpt("llama_sharded")
    f = set_value(d, key, (3, 2) if key.endswith(("embed_tokens.weight", "lm_head.weight")) else (3,), value)
    expect_error(d, f, key, "NaN or Inf")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path; run on the H100 by hand")
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_inf_in_kept_weight_cuda(ckpt, value):
    """On CUDA the kept chunks' check is an inf-norm reduction on the device: NaN and both infinities reach it."""
    d = ckpt("llama_sharded")
    key = "model.embed_tokens.weight"
    f = set_value(d, key, (3, 2), value)
    expect_error(d, f, key, "NaN or Inf", device="cuda")


def test_kept_weight_overflows_target_dtype(ckpt):
    """A float32 norm weight of 1e5 is finite but is Inf in float16: refuse rather than keep an Inf."""
    d = ckpt("llama")
    key = "model.norm.weight"
    f = edit_tensors(d, key, lambda t: t.__setitem__(key, torch.full(t[key].shape, 1e5, dtype=torch.float32)))
    expect_error(d, f, key, "float16", dtype=torch.float16)


MOE_KEYS = [
    ("qwen2_moe", "model.layers.1.mlp.experts.5.up_proj.weight", (17, 3)),
    ("qwen2_moe", "model.layers.0.mlp.experts.7.down_proj.weight", (100, 9)),
    ("qwen2_moe", "model.layers.0.mlp.experts.0.gate_proj.weight", (0, 0)),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.2.w3.weight", (40, 1)),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w2.weight", (127, 127)),
    ("mixtral_sharded", "model.layers.1.block_sparse_moe.experts.1.w1.weight", (5, 5)),
]


@pytest.mark.parametrize("scheme", fp8stream.SCHEMES)
@pytest.mark.parametrize("name,key,where", MOE_KEYS, ids=[f"{n}-{k.split('experts.')[1]}" for n, k, _ in MOE_KEYS])
def test_nan_in_moe_expert_names_exact_key(ckpt, scheme, name, key, where):
    d = ckpt(name)
    f = set_value(d, key, where, float("nan"))
    msg = expect_error(d, f, f"'{key}'", "NaN", scheme=scheme)
    if scheme == "fp8_per_channel":
        assert f"row {where[0]})" in msg, msg


def test_mixtral_missing_expert_w1(ckpt):
    for name in ("mixtral", "mixtral_sharded"):
        d = ckpt(name)
        key = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
        edit_tensors(d, key, lambda t: t.pop(key))
        expect_error(d, d, f"'{key}'", "no tensor")


def test_mixtral_expert_renumbered_is_not_silently_reordered(ckpt):
    """Expert 0 saved as expert 4: the converter would stack [1, 2, 3, 4] into slots [0, 1, 2, 3]."""
    d = ckpt("mixtral")
    p = "model.layers.0.block_sparse_moe.experts."

    def renumber(t):
        for w in ("w1", "w2", "w3"):
            t[f"{p}4.{w}.weight"] = t.pop(f"{p}0.{w}.weight")

    f = edit_tensors(d, p + "0.w1.weight", renumber)
    expect_error(d, f, f"'{p}4.w1.weight'", "unexpected", "4 experts")


@pytest.mark.parametrize("bad", ["model.layers.0.block_sparse_moe.experts.0.w1Xweight",  # '.' is a regex wildcard
                                 "model.layers.0.block_sparse_moe.experts.x0.w1.weight"])
def test_mixtral_misspelled_expert_key(ckpt, bad):
    d = ckpt("mixtral")
    good = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    f = edit_tensors(d, good, lambda t: t.__setitem__(bad, t.pop(good)))
    expect_error(d, f, f"'{bad}'", "unexpected")


def test_mixtral_duplicate_expert(ckpt):
    d = ckpt("mixtral")
    k = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    f = edit_tensors(d, k, lambda t: t.__setitem__(k.removeprefix("model."), t[k].clone()))
    expect_error(d, f, k, "both expert 1")


# ------------------------------------------------------------------------------------------------ fuzz


def _regions(raw: bytes) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", raw[:8])
    text_end = 8 + len(raw[8 : 8 + n].rstrip(b" "))
    return 8 + n, text_end


def _tensor_at(raw: bytes, offset: int) -> str:
    """The tensor whose data holds byte `offset` of a safetensors file."""
    header, _ = read_st_bytes(raw)
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    for k, v in header.items():
        if k != "__metadata__" and start + v["data_offsets"][0] <= offset < start + v["data_offsets"][1]:
            return k
    raise AssertionError(offset)


_SAME_CLASS = {"digit": "0123456789", "lower": "abcdefghijklmnopqrstuvwxyz", "upper": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
               "punct": '",:[]{}._ -'}


def _plausible_char(rng: random.Random, c: int) -> int:
    """A different character of the same kind (digit for digit...), so the JSON often stays valid."""
    ch = chr(c)
    for chars in _SAME_CLASS.values():
        if ch in chars:
            return ord(rng.choice(chars.replace(ch, "")))
    return rng.randrange(32, 127)


def _variants(rng: random.Random, files: dict[str, bytes], n: int, *, key_text_only: bool = False):
    """Seeded corruptions: (description, file name, corrupted bytes, kind).

    kind: truncate / hlen (header length field changed) / nan (a NaN or Inf over one element) / key (a
    character of a tensor name changed) -- all must fail; header (bit or byte flips anywhere in the
    first 8 + N bytes, or plausible edits of the JSON text) -- must fail or load the unchanged model;
    data (a byte of tensor data flipped) -- must fail naming that tensor or load exactly what the bytes say.
    """
    names = sorted(files)
    kinds = ["key"] if key_text_only else ["truncate"] * 4 + ["hlen"] * 3 + ["header"] * 6 + ["json"] * 8 + ["multi"] * 2 + ["data"] * 5
    for i in range(n):
        name = rng.choice(names)
        raw = bytearray(files[name])
        hend, text_end = _regions(raw)
        kind = rng.choice(kinds)
        if kind == "truncate":
            cut = rng.choice([rng.randrange(0, 16), rng.randrange(8, hend + 8), rng.randrange(hend, len(raw))])
            yield f"#{i} truncate {name} at {cut}/{len(raw)}", name, bytes(raw[:cut]), "truncate"
            continue
        if kind == "hlen":
            old = hend - 8
            new = rng.choice([old + rng.choice([-1, 1]) * rng.randrange(1, 17), rng.randrange(0, 2**64),
                              old ^ (1 << rng.randrange(64)), len(raw), 0])
            if new == old:
                new = old + 8
            raw[:8] = struct.pack("<Q", new)
            yield f"#{i} header length {old}->{new} in {name}", name, bytes(raw), "hlen"
            continue
        if kind == "data" and rng.random() < 0.3:  # a NaN / Inf written over one bf16 element: must be caught
            header, _ = read_st_bytes(bytes(raw))
            key = rng.choice(sorted(k for k in header if k != "__metadata__"))
            b, e = header[key]["data_offsets"]
            assert header[key]["dtype"] == "BF16"
            pos = hend + b + 2 * rng.randrange((e - b) // 2)
            raw[pos : pos + 2] = rng.choice([b"\xc0\x7f", b"\x80\x7f", b"\x80\xff", b"\xff\xff"])
            yield f"#{i} NaN/Inf at byte {pos} of {name} ({key})", name, bytes(raw), "nan"
            continue
        if kind == "data":
            pos = rng.randrange(hend, len(raw))
            raw[pos] ^= rng.randrange(1, 256)
            yield f"#{i} data byte {pos} of {name} ({_tensor_at(bytes(files[name]), pos)})", name, bytes(raw), "data"
            continue
        if kind == "key":  # inside a tensor name: renames it, keeps the JSON valid most of the time
            header, _ = read_st_bytes(bytes(raw))
            key = rng.choice([k for k in header if k != "__metadata__"])
            at = bytes(raw).index(json.dumps(key).encode(), 8) + 1 + rng.randrange(len(key))
            old = raw[at]
            raw[at] = _plausible_char(rng, old)
            yield f"#{i} key {key!r}: byte {at} {chr(old)!r}->{chr(raw[at])!r}", name, bytes(raw), "key"
            continue
        flips = rng.randrange(2, 5) if kind == "multi" else 1
        where = []
        for _ in range(flips):
            if kind == "header":  # anywhere in the length field, JSON text or its space padding
                pos = rng.randrange(0, hend)
                raw[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
            else:  # a plausible edit of the JSON text
                pos = rng.randrange(8, text_end)
                raw[pos] = _plausible_char(rng, raw[pos])
            where.append(pos)
        if bytes(raw) == files[name]:
            continue
        yield f"#{i} {kind} bytes {where} of {name}", name, bytes(raw), "header"


def _write_variant(base: Path, dst: Path, name: str, data: bytes) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(base, dst)
    (dst / name).write_bytes(data)


def _reference_for_data_flip(base: Path, dst: Path, name: str) -> object:
    """The model those bytes describe: the shard decoded by safetensors itself, rewritten cleanly, then loaded."""
    ref = dst.with_name(dst.name + "-ref")
    if ref.exists():
        shutil.rmtree(ref)
    shutil.copytree(base, ref)
    header, _ = read_st(dst / name)
    save_file(load_file(dst / name), ref / name, metadata=header.get("__metadata__"))
    return load(ref)


def _fuzz(base: Path, work: Path, seed: int, n: int, *, key_text_only=False):
    files = {p.name: p.read_bytes() for p in base.glob("*.safetensors")}
    baseline = load(base)
    problems, outcomes = [], {"error": 0, "same": 0, "data-changed": 0}
    for desc, name, data, kind in _variants(random.Random(seed), files, n, key_text_only=key_text_only):
        dst = work / "variant"
        _write_variant(base, dst, name, data)
        try:
            model = load(dst)
        except Fp8StreamError as e:
            msg = str(e)
            outcomes["error"] += 1
            if not one_line(msg):
                problems.append(f"{desc}: message is not one line: {msg!r}")
            elif name not in msg:
                problems.append(f"{desc}: message does not name the damaged file: {msg!r}")
            elif kind in ("data", "nan") and f"'{desc.rsplit('(', 1)[1][:-1]}'" not in msg:
                problems.append(f"{desc}: error does not name the damaged tensor: {msg!r}")
            continue
        except Exception as e:  # anything but Fp8StreamError is a bug
            problems.append(f"{desc}: raised {type(e).__module__}.{type(e).__name__}: {str(e)[:300]!r}")
            continue
        if kind in ("truncate", "hlen", "key", "nan"):
            problems.append(f"{desc}: loaded without an error")
            continue
        if kind == "header":  # a header edit may only be harmless (whitespace, metadata): same model exactly
            diff = model_diff(model, baseline)
            outcomes["same"] += 1
            if diff is not None:
                problems.append(f"{desc}: loaded a different model ('{diff}' changed) from a header edit")
            continue
        # a data byte: the model must be exactly the one these bytes describe
        ref = _reference_for_data_flip(base, dst, name)
        diff = model_diff(model, ref)
        if diff is not None:
            problems.append(f"{desc}: differs from the reference load at '{diff}'")
        outcomes["data-changed" if model_diff(model, baseline) else "same"] += 1
    assert not problems, f"{len(problems)} bad outcome(s):\n" + "\n".join(problems[:25])
    return outcomes


def test_fuzz_sharded_checkpoint(pristine, tmp_path):
    """~220 seeded corruptions of a 4-shard llama: truncation, header-length changes, bit/byte flips in the
    header, plausible edits of the JSON text, flipped data bytes."""
    outcomes = _fuzz(pristine["llama_sharded"], tmp_path, seed=20240601, n=220)
    assert outcomes["error"] > 150, outcomes  # most corruptions must be caught...
    assert outcomes["same"] + outcomes["data-changed"] > 0, outcomes  # ...and some are harmless, and load


def test_fuzz_tensor_names_single_file(pristine, tmp_path):
    """A single-file MoE checkpoint has no index to cross-check names against: a renamed key (expert
    renumbered, layer changed, 'weight' misspelled) must still never load."""
    outcomes = _fuzz(pristine["mixtral"], tmp_path, seed=7, n=60, key_text_only=True)
    assert outcomes["error"] == 60, outcomes


# ------------------------------------------------------------------------------------------ unchanged


def _snapshot(d: Path) -> dict:
    snap = {".": (d.stat().st_mtime_ns, d.stat().st_mode)}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root) / name
            st = p.stat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            snap[str(p.relative_to(d))] = (digest, st.st_size, st.st_mtime_ns, st.st_mode)
    return snap


def test_checkpoint_directory_unchanged(ckpt):
    good = ckpt("llama_sharded")
    before = _snapshot(good)
    model = load(good)
    assert model.fp8stream_report.quantized_tensors > 0
    assert _snapshot(good) == before

    bad = ckpt("mixtral_sharded")
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    set_value(bad, key, (9, 9), float("nan"))  # fails half way through the load, after files were opened
    before = _snapshot(bad)
    expect_error(bad, key)
    assert _snapshot(bad) == before

    broken = ckpt("llama")
    (broken / SINGLE).write_bytes((broken / SINGLE).read_bytes()[:-10])
    before = _snapshot(broken)
    expect_error(broken, "truncated")
    assert _snapshot(broken) == before


# ------------------------------------------------------------------------------------------------- CLI


REPORT_KEYS = {"peak_bytes", "final_bytes", "full_precision_bytes", "staging_bytes", "load_seconds",
               "quantized_tensors", "kept_tensors", "device", "scheme", "peak_measured_by"}


def test_cli_errors_and_json(ckpt, tmp_path):
    unknown = ckpt("llama")
    edit_config(unknown, model_type="no_such_arch")
    truncated = ckpt("llama_sharded")
    shard = shard_of(truncated, "model.norm.weight")
    shard.write_bytes(shard.read_bytes()[:-7])
    nan = ckpt("mixtral")
    nan_key = "model.layers.1.block_sparse_moe.experts.0.w3.weight"
    set_value(nan, nan_key, (2, 2), float("nan"))  # fails mid-load, while progress bars would be running
    good = ckpt("llama")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS"))}
    env["OMP_NUM_THREADS"] = "1"  # four interpreters share the cores
    cases = {
        "unknown": ([str(unknown)], ["config.json", "no_such_arch"]),
        "truncated": ([str(truncated)], [shard.name]),
        "nan": ([str(nan)], [nan_key, "NaN"]),
        "json": ([str(good), "--json"], []),
    }
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "fp8stream", "load", *args, "--device", "cpu"], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (args, _) in cases.items()
    }
    results = {name: (p.communicate(timeout=300), p.returncode) for name, p in procs.items()}

    for name, ((out, err), rc) in results.items():
        assert "Traceback" not in err and "Traceback" not in out, f"{name}: {err}"
        if name == "json":
            assert rc == 0, err
            report = json.loads(out)  # exactly one JSON object: nothing before or after it
            assert isinstance(report, dict) and REPORT_KEYS <= set(report), out
            assert report["device"] == "cpu" and report["scheme"] == "fp8_per_channel"
            assert report["quantized_tensors"] > 0 and report["kept_tensors"] > 0
            continue
        assert rc == 2, f"{name}: exit {rc}, stderr {err!r}"
        assert out == "", f"{name}: stdout {out!r}"
        lines = err.splitlines()
        assert len(lines) == 1 and err.endswith("\n"), f"{name}: stderr is not one line: {err!r}"
        assert lines[0].startswith("fp8stream: error: "), lines[0]
        for frag in cases[name][1]:
            assert frag in lines[0], f"{name}: {frag!r} not in {lines[0]!r}"
