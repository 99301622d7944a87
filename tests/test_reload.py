"""reload(): new weights into a live FP8 model, in place, with exactly the numbers of a fresh load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fp8stream
from fp8stream import CheckpointError, Fp8StreamError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tiny_models import make_checkpoint  # noqa: E402

ARCHS = ("llama", "qwen3_moe", "mixtral")
SCHEMES = fp8stream.SCHEMES


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(A, B) checkpoints per architecture: same shapes, different weights."""
    root = tmp_path_factory.mktemp("reload")
    return {arch: (make_checkpoint(arch, root / f"{arch}-A", seed=0)[0], make_checkpoint(arch, root / f"{arch}-B", seed=1)[0])
            for arch in ARCHS}


_LOADS: dict = {}


def _load(path, scheme):
    return fp8stream.load(path, device="cpu", scheme=scheme, progress=False)


def _fresh(path, scheme):
    """The state of a fresh load (cached: a reference, never reloaded into)."""
    if (path, scheme) not in _LOADS:
        _LOADS[(path, scheme)] = _state(_load(path, scheme))
    return _LOADS[(path, scheme)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _state(model) -> dict[str, torch.Tensor]:
    return {k: _bits(v).clone() for k, v in model.state_dict().items()}


def _pairs(path: Path):
    """B as a trainer would have it: safetensors tensors with the on-disk names, shuffled."""
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(f))
    keys = list(sd)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(0)).tolist()
    return [(keys[i], sd[keys[i]]) for i in order]


def _ptrs(model) -> dict[str, int]:
    out = {k: v.data_ptr() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if hasattr(m, "fp8_gate_up"):
            out[f"{name}.fp8_gate_up"] = m.fp8_gate_up.weight.data_ptr()
            out[f"{name}.fp8_gate_up_scale"] = m.fp8_gate_up.weight_scale.data_ptr()
    return out


def _differs(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kind", ["dir", "tensors"])
def test_reload_equals_fresh_load(ckpts, arch, scheme, kind):
    a, b = ckpts[arch]
    model = _load(a, scheme)
    before, ptrs = _state(model), _ptrs(model)
    params = {n: id(p) for n, p in model.named_parameters()}
    want = _fresh(b, scheme)
    quantized = [k[: -len("_scale")] for k in want if k.endswith("_scale")]  # the FP8 weights
    differ = _differs(before, want)
    assert quantized and all(k in differ for k in quantized)  # A and B differ everywhere: the test can fail

    report = fp8stream.reload(model, b if kind == "dir" else _pairs(b))

    got = _state(model)
    assert got.keys() == want.keys() and _differs(got, want) == []
    assert _ptrs(model) == ptrs  # every weight, scale, kept tensor and the fused gate/up storage stays where it was
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert isinstance(report, fp8stream.LoadReport) and report.load_format == "reload" and report.scheme == scheme
    assert report.final_bytes == model.fp8stream_report.final_bytes
    assert 0 < report.peak_bytes - report.final_bytes <= report.staging_bytes
    assert report.quantized_tensors == model.fp8stream_report.quantized_tensors
    assert report.kept_tensors == model.fp8stream_report.kept_tensors
    if kind == "dir":
        assert report.read_bytes >= sum(f.stat().st_size for f in b.glob("*.safetensors")) * 0.9


def test_reload_runs_and_fused_mlp_sees_new_weights(ckpts):
    """The fused gate/up GEMM reads the reloaded weights (its storage is the one written), and the logits are
    the fresh load's."""
    a, b = ckpts["llama"]
    model = _load(a, "fp8_per_channel")
    assert model.fp8stream_report.gate_up_fused > 0
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old = model(ids).logits
        fp8stream.reload(model, b)
        new = model(ids).logits
        want = _load(b, "fp8_per_channel")(ids).logits
    assert torch.equal(new, want) and not torch.equal(old, new)


def test_small_staging_same_bits(ckpts):
    a, b = ckpts["qwen3_moe"]
    model = _load(a, "fp8_per_tensor")
    report = fp8stream.reload(model, _pairs(b), staging_mib=0.25)
    assert _differs(_state(model), _fresh(b, "fp8_per_tensor")) == []
    assert report.peak_bytes - report.final_bytes <= report.staging_bytes == 2**18


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_reload_from_the_trainer_model_state_dict(ckpts, arch, tmp_path):
    """transformers' in-memory names and layout (fused experts.gate_up_proj, Mixtral's renamed experts): the same
    bits as a fresh load of the saved checkpoint, per-shard per-tensor scales included."""
    a, _ = ckpts[arch]
    b, trainer = make_checkpoint(arch, tmp_path / "B", seed=2)
    names = dict(trainer.state_dict())
    assert any(k.endswith("experts.gate_up_proj") for k in names)  # not the on-disk names
    for scheme in ("fp8_per_tensor", "fp8_per_block"):
        model = _load(a, scheme)
        fp8stream.reload(model, trainer.state_dict().items())
        assert _differs(_state(model), _fresh(b, scheme)) == []


# ---- partial updates


def _expected_partial(arch_ckpts, scheme):
    """A's state with exactly the rows fed by the partial update's tensors taken from B's fresh load."""
    a, b = arch_ckpts
    old, new = _fresh(a, scheme), _fresh(b, scheme)
    want = dict(old)
    gu, gus = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.gate_up_proj_scale"
    inter = old[gu].shape[1] // 2
    want[gu], want[gus] = old[gu].clone(), old[gus].clone()
    want[gu][1, :inter] = new[gu][1, :inter]  # expert 1's w1: the gate half of its rows
    if scheme == "fp8_per_block":
        want[gus][1, : inter // 128] = new[gus][1, : inter // 128]
    else:
        want[gus][1, :inter] = new[gus][1, :inter]
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight_scale",
              "model.layers.1.input_layernorm.weight"):
        want[k] = new[k]
    return want


PARTIAL = ["model.layers.0.block_sparse_moe.experts.1.w1.weight", "model.layers.0.self_attn.q_proj.weight",
           "model.layers.1.input_layernorm.weight"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kind", ["dir", "tensors"])
def test_partial_update_changes_only_given_rows(ckpts, scheme, kind, tmp_path):
    a, b = ckpts["mixtral"]
    model = _load(a, scheme)
    ptrs = _ptrs(model)
    pairs = [(k, v) for k, v in _pairs(b) if k in PARTIAL]
    assert len(pairs) == len(PARTIAL)
    if kind == "dir":
        part = tmp_path / "part"
        part.mkdir()
        (part / "config.json").write_text((b / "config.json").read_text())
        save_file(dict(pairs), part / "model.safetensors")
        report = fp8stream.reload(model, part)
    else:
        report = fp8stream.reload(model, pairs)
    want, got = _expected_partial(ckpts["mixtral"], scheme), _state(model)
    assert _differs(got, want) == []
    assert _differs(want, _fresh(a, scheme)) != []  # something did change
    assert _ptrs(model) == ptrs
    assert (report.quantized_tensors, report.kept_tensors) == (2, 1)


def test_partial_block_split_is_an_error_and_changes_nothing(ckpts):
    """Qwen3-MoE's 64-row w1 and w3 share each 128-row scale block of gate_up: one without the other cannot be
    requantized exactly."""
    a, b = ckpts["qwen3_moe"]
    model = _load(a, "fp8_per_block")
    before = _state(model)
    key = "model.layers.0.mlp.experts.2.gate_proj.weight"
    pairs = [(k, v) for k, v in _pairs(b) if k in (key, "model.layers.0.self_attn.q_proj.weight")]
    with pytest.raises(CheckpointError) as e:
        fp8stream.reload(model, pairs)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and "experts.2.up_proj.weight" in msg and "128-row" in msg
    assert _differs(_state(model), before) == []
    # the pair together is fine
    pairs += [(k, v) for k, v in _pairs(b) if k == "model.layers.0.mlp.experts.2.up_proj.weight"]
    fp8stream.reload(model, pairs)
    got, new = _state(model), _fresh(b, "fp8_per_block")
    gu = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(got[gu][2], new[gu][2]) and torch.equal(got[gu][1], before[gu][1])


# ---- bad input leaves the model unchanged


def _bad_cases(b: Path):
    pairs = _pairs(b)
    names = [k for k, _ in pairs]
    last = names[-1]
    w = dict(pairs)
    q = "model.layers.1.self_attn.q_proj.weight"
    nan_last = pairs[:-1] + [(last, _with(w[last], float("nan")))]
    return {
        "unknown": (pairs + [("model.layers.9.mlp.up_proj.weight", w[q])], "model.layers.9.mlp.up_proj.weight", "not a weight of this model"),
        "shape": ([(k, v[:-1] if k == q else v) for k, v in pairs], q, "has shape"),
        "dtype": ([(k, v.to(torch.int32) if k == q else v) for k, v in pairs], q, "dtype int32"),
        "nan_last": (nan_last, last, "NaN or Inf"),
        "inf_quantized": ([(k, _with(v, float("inf")) if k == q else v) for k, v in pairs], q, "NaN or Inf"),
        "not_tensor": ([(k, v.tolist() if k == q else v) for k, v in pairs], q, "not a tensor"),
        "twice": (pairs + [(q, w[q])], q, "given twice"),
    }


def _with(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() - 1] = value  # the very last element: the last row read
    return t


@pytest.mark.parametrize("case", ["unknown", "shape", "dtype", "nan_last", "inf_quantized", "not_tensor", "twice"])
def test_bad_tensor_is_one_line_error_and_model_unchanged(ckpts, case):
    a, b = ckpts["mixtral"]
    model = _load(a, "fp8_per_channel")
    before = _state(model)
    pairs, name, what = _bad_cases(b)[case]
    with pytest.raises(Fp8StreamError) as e:
        fp8stream.reload(model, pairs)
    msg = str(e.value)
    assert "\n" not in msg and f"'{name}'" in msg and what in msg, msg
    assert _differs(_state(model), before) == []


def test_nan_in_last_tensor_of_a_directory(ckpts, tmp_path):
    a, b = ckpts["qwen3_moe"]
    sd = load_file(b / "model.safetensors")
    last = "lm_head.weight"  # the last parameter streamed (kept in the model dtype)
    sd[last] = _with(sd[last], float("nan"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((b / "config.json").read_text())
    save_file(sd, bad / "model.safetensors")
    for scheme in ("fp8_per_tensor", "fp8_per_block"):
        model = _load(a, scheme)
        before = _state(model)
        with pytest.raises(CheckpointError, match=rf"tensor '{last}' contains NaN or Inf.*the model is unchanged"):
            fp8stream.reload(model, bad)
        assert _differs(_state(model), before) == []
    # without the finiteness pass: still an error, after the writes, and it says so
    with pytest.raises(CheckpointError, match=rf"'{last}' contains NaN or Inf.*partly updated"):
        fp8stream.reload(model, bad, check_finite=False)
    assert _differs(_state(model), before) != []


def test_kept_tensor_overflowing_the_model_dtype(ckpts):
    a, b = ckpts["llama"]
    model = fp8stream.load(a, device="cpu", progress=False, dtype=torch.float16)
    before = _state(model)
    pairs = [(k, v.float() * (1e6 if k == "model.norm.weight" else 1)) for k, v in _pairs(b)]
    with pytest.raises(CheckpointError, match="'model.norm.weight' contains NaN or Inf \\(or values too large for float16\\)"):
        fp8stream.reload(model, pairs)
    assert _differs(_state(model), before) == []


def test_not_an_fp8stream_model_and_bad_sources(ckpts):
    a, b = ckpts["llama"]
    with pytest.raises(Fp8StreamError, match="not built by fp8stream.load"):
        fp8stream.reload(torch.nn.Linear(2, 2), b)
    model = _load(a, "fp8_per_channel")
    with pytest.raises(Fp8StreamError, match="pass state_dict.items"):
        fp8stream.reload(model, dict(_pairs(b)))
    with pytest.raises(CheckpointError, match="no such file"):
        fp8stream.reload(model, b / "nope")
    with pytest.raises(CheckpointError, match="no tensor of this model"):
        fp8stream.reload(model, [])


def test_dummy_loaded_model_takes_a_full_reload(ckpts):
    a, b = ckpts["mixtral"]
    model = fp8stream.load(a, device="cpu", load_format="dummy", progress=False)
    fp8stream.reload(model, _pairs(b))
    assert _differs(_state(model), _fresh(b, "fp8_per_channel")) == []


# ---- tensor / expert parallel under torchrun (gloo)

DIST_CASES = [  # name, arch, scheme, tp, ep
    ("llama-tp", "llama", "fp8_per_channel", 2, False),
    ("moe-tp-tensor", "qwen3_moe", "fp8_per_tensor", 2, False),
    ("moe-tpep", "qwen3_moe", "fp8_per_channel", 2, True),
]


def test_tp_ep_reload_equals_single_process(ckpts, tmp_path):
    from test_distributed import _assemble, _meta  # the tp/ep load tests' own assembly of the ranks' parts
    from fp8stream.parallel import plan_layout

    cases = [dict(name=n, a=str(ckpts[arch][0]), b=str(ckpts[arch][1]), scheme=s, tp=tp, ep=ep) for n, arch, s, tp, ep in DIST_CASES]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "reload_worker.py"), str(tmp_path / "cases.json"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for n, arch, scheme, tp, ep in DIST_CASES:
        ranks = [torch.load(tmp_path / f"{n}-rank{r}.pt", weights_only=False) for r in range(2)]
        for r in ranks:
            # each rank: the reload (from the directory, from tensors) equals that rank's fresh tp/ep load of B, in place
            assert r["dir_diff"] == [] and r["tensors_diff"] == [] and r["ptrs_kept"], (n, r)
            assert r["changed"] and r["peak_over_final"] <= r["staging"]
            # a rank reads only its part of the directory: the bytes its own tp/ep load reads (test_distributed checks
            # that those are about half), plus the finiteness pass over its rows
            assert r["read_bytes_unchecked"] == r["load_read_bytes"] < 0.75 * r["whole_bytes"] * (2 if scheme == "fp8_per_tensor" else 1)
            assert r["load_read_bytes"] < r["read_bytes"] < r["load_read_bytes"] + 0.75 * r["whole_bytes"]
            # NaN in rows only rank 0 holds: both ranks refuse, naming the tensor, and stay unchanged
            assert "model.layers.0.self_attn.q_proj.weight' contains NaN" in r["nan_error"] and r["nan_unchanged"]
        if arch != "llama":  # a partial update of expert 0 only: rank 1 of an ep split has nothing to write, and joins in
            for rank, r in enumerate(ranks):
                assert r["partial_diff"] == [], (n, rank, r["partial_diff"])
                assert len(r["partial_changed"]) == (2 if ep and rank == 1 else 4), (n, rank, r["partial_changed"])
        # the ranks' parts put together are the single-process fresh load of B
        meta = _meta(arch, scheme)
        tied = set(getattr(meta, "all_tied_weights_keys", None) or {})
        layouts = [plan_layout(meta, tp, ep, r, 2, tied) for r in (0, 1)]
        single = _fresh(ckpts[arch][1], scheme)
        for k, want in single.items():
            if k.endswith(".bias"):
                continue
            got = _assemble([ranks[0]["state"], ranks[1]["state"]], layouts, k, want.shape)
            assert torch.equal(got, want), (n, k)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path; run on the H100 by hand")
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_cuda_graph_replay_after_reload_sees_the_new_weights(ckpts, arch):
    """A decode step captured in a CUDA graph before the reload, replayed after it (no re-capture), equals an eager
    step of a fresh load of B: every storage the graph reads kept its address and holds B's values. With GPU source
    tensors (a colocated trainer)."""
    a, b = ckpts[arch]
    model = fp8stream.load(a, device="cuda", progress=False)
    ids = torch.randint(0, 256, (1, 1), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        for _ in range(3):  # warm up on a side stream (kernel choice, lazy module loads) before capture
            model(ids, use_cache=False)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(ids, use_cache=False).logits
        graph.replay()
        before = captured.clone()
        fp8stream.reload(model, [(k, v.cuda()) for k, v in _pairs(b)])
        graph.replay()
        torch.cuda.synchronize()
        want = fp8stream.load(b, device="cuda", progress=False)(ids, use_cache=False).logits
    assert not torch.equal(before, want)
    assert torch.equal(captured, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path; run on the H100 by hand")
@pytest.mark.parametrize("where", ["quantized", "kept"])
def test_cuda_nan_in_gpu_tensors_is_caught_before_any_write(ckpts, where):
    """The CUDA finiteness pass (one multi-tensor launch per batch) finds a NaN in one chunk of many; nothing changes."""
    a, b = ckpts["qwen3_moe"]
    model = fp8stream.load(a, device="cuda", progress=False)
    before = _state(model)
    pairs = [(k, v.cuda()) for k, v in _pairs(b)]
    i = next(i for i, (k, v) in enumerate(pairs) if (v.dim() == 2) == (where == "quantized") and "embed" not in k and "head" not in k)
    pairs[i][1].view(-1)[-1] = float("nan")
    with pytest.raises(CheckpointError, match=rf"tensor '{pairs[i][0]}' contains NaN or Inf"):
        fp8stream.reload(model, pairs)
    after = _state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
