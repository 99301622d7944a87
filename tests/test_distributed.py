"""Tensor and expert parallel loads on the CPU: 2 processes under torchrun (gloo) against the single-process model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fp8stream
from fp8stream.meta_model import build_meta_model
from fp8stream.modules import replace_with_fp8
from fp8stream.parallel import Shard, local_plan, plan_layout
from fp8stream.load_plan import Piece, TargetPlan
from tiny_models import make_checkpoint, make_config

HERE = Path(__file__).parent
# Logits of a 2-rank load against the single-process load of the same scheme. The FP8 weights and scales
# are identical (checked bit for bit below). What differs: a row-parallel layer (o_proj, down_proj,
# experts under TP) quantizes its input activations per token over the rank's half of K (a finer grain
# than one device's whole row), and partial sums are rounded to bf16 before the all_reduce. Both are
# FP8-rounding-sized (a few % of the logits here); a misplaced row is > 60% (test_load's negative control).
REL_BOUND = 0.15

CASES = [  # name, arch, scheme, tp, ep
    ("llama-tp", "llama", "fp8_per_channel", 2, False),
    ("llama-tp-tensor", "llama", "fp8_per_tensor", 2, False),
    ("moe-tp", "qwen3_moe", "fp8_per_channel", 2, False),
    ("moe-ep", "qwen3_moe", "fp8_per_channel", 1, True),
    ("moe-tpep", "qwen3_moe", "fp8_per_channel", 2, True),
    ("moe-tpep-tensor", "qwen3_moe", "fp8_per_tensor", 2, True),
    ("qwen2-tp", "qwen2", "fp8_per_channel", 2, False),  # q/k/v biases, tied lm_head (stays whole)
    ("qwen2moe-tp", "qwen2_moe", "fp8_per_channel", 2, False),  # shared expert (whole: not in the plan)
    ("llama-ep", "llama", "fp8_per_channel", 1, True),  # must fail: no experts
]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def _torchrun(*args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ckpts = {arch: make_checkpoint(arch, root / arch)[0] for arch in ("llama", "qwen3_moe", "qwen2", "qwen2_moe")}
    cases = [dict(name=n, path=str(ckpts[a]), scheme=s, tp=tp, ep=ep) for n, a, s, tp, ep in CASES]
    (root / "cases.json").write_text(json.dumps(cases))
    out = root / "out"
    out.mkdir()
    proc = _torchrun(HERE / "dist_worker.py", root / "cases.json", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {n: [torch.load(out / f"{n}-rank{r}.pt", weights_only=False) for r in range(2)] for n, *_ in CASES}
    return ckpts, results


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _assemble(states, layouts, name, full_shape):
    """The whole tensor from the ranks' parts, as parallel.Shard describes them (FP8 scales follow their weight)."""
    pname = name[: -len("_scale")] if name.endswith("_scale") else name
    shard = layouts[0].shards.get(pname)
    parts = [st[name] for st in states]
    if shard is None or (pname != name and shard.dim == len(full_shape)):  # whole; or the scales of a column split
        assert torch.equal(parts[0], parts[1]), name
        return parts[0]
    return torch.cat([torch.cat([p.chunk(shard.parts, dim=shard.dim)[j] for p in parts], dim=shard.dim)
                      for j in range(shard.parts)], dim=shard.dim)


@pytest.mark.parametrize("name,arch,scheme,tp,ep", [c for c in CASES if c[0] != "llama-ep"])
def test_matches_single_process(runs, name, arch, scheme, tp, ep):
    ckpts, results = runs
    single = _single(ckpts[arch], scheme)
    r0, r1 = results[name]

    # 1. the ranks' parts put together are the single-device FP8 weights and scales, bit for bit
    #    (per-channel rows split over columns get the whole row's scale: the amax is reduced over ranks;
    #    per-tensor scales too), and a rank never holds another rank's part
    meta = _meta(arch, scheme)
    tied = set(getattr(meta, "all_tied_weights_keys", None) or {})
    layouts = [plan_layout(meta, tp, ep, r, 2, tied) for r in (0, 1)]
    for n, want in single.state_dict().items():
        if n.endswith(".bias") and layouts[1].shards.get(n) is not None and layouts[1].shards[n].zero:
            assert torch.equal(r0["state"][n], want) and not r1["state"][n].any(), n
            continue
        got = _assemble([r0["state"], r1["state"]], layouts, n, want.shape)
        assert got.shape == want.shape and torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                                                       want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want), n

    # 2. logits: every rank the same; within FP8 rounding of the single-process model
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = single(ids).logits
    assert torch.equal(r0["logits"], r1["logits"])
    assert _rel(r0["logits"], want) < (REL_BOUND if tp > 1 else 0.01), _rel(r0["logits"], want)  # EP alone: whole rows, same math
    assert torch.equal(r0["generated"], r1["generated"])

    # 3. per rank: the bound holds, about half the final bytes, about half the bytes read
    rep, one = [r["report"] for r in (r0, r1)], single.fp8stream_report
    params = dict(single.named_parameters())
    halved = 0  # bytes of the sharded parameters (and the scales of those split by rows) that a rank does not hold
    for n, shard in layouts[0].shards.items():
        halved += params[n].nbytes // 2
        if f"{n}_scale" in params and shard.dim != params[n].dim() - 1:
            halved += params[f"{n}_scale"].nbytes // 2
    for r, rank in zip(rep, (0, 1)):
        assert (r["rank"], r["world_size"], r["tp"], r["ep"]) == (rank, 2, tp, 2 if ep else 1)
        assert r["peak_bytes"] <= r["final_bytes"] + r["staging_bytes"]
        # exactly half of every sharded part; embeddings, norms, routers (and attention under EP alone) whole
        assert r["final_bytes"] == one.final_bytes - halved
        assert r["final_bytes"] < 0.75 * one.final_bytes and r["read_bytes"] < 0.75 * one.read_bytes
    # no byte read twice except the parameters both ranks hold whole
    passes = 2 if scheme == "fp8_per_tensor" else 1  # per tensor: an amax pass, then the rows
    whole = sum(p.numel() * 2 * (passes if p.dtype == torch.float8_e4m3fn else 1)  # checkpoint is bf16
                for n, p in single.named_parameters() if n not in layouts[0].shards and not n.endswith("_scale"))
    assert rep[0]["read_bytes"] + rep[1]["read_bytes"] == one.read_bytes + whole - _zero_bias_bytes(single, layouts[1])


_SINGLE = {}


def _single(path, scheme):
    if (path, scheme) not in _SINGLE:
        _SINGLE[(path, scheme)] = fp8stream.load(path, device="cpu", scheme=scheme, progress=False)
    return _SINGLE[(path, scheme)]


def _zero_bias_bytes(model, layout):
    return sum(p.numel() * 2 for n, p in model.named_parameters() if n in layout.shards and layout.shards[n].zero)


def test_ep_without_experts_is_a_clear_error(runs):
    _, results = runs
    for r in results["llama-ep"]:
        assert "no fused MoE experts" in r["error"]


def test_cli_torchrun_load_json(runs):
    ckpts, _ = runs
    proc = _torchrun("-m", "fp8stream", "load", ckpts["qwen3_moe"], "--device", "cpu", "--tp", "2", "--ep", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # rank 0 prints one JSON object
    doc = json.loads(lines[0])
    assert [r["rank"] for r in doc["ranks"]] == [0, 1] and doc["world_size"] == 2 and doc["ep"] == 2


def test_cli_tp_without_torchrun_is_an_error(runs, capsys):
    from fp8stream.cli import main

    ckpts, _ = runs
    assert main(["load", str(ckpts["llama"]), "--device", "cpu", "--tp", "2"]) == 2
    assert "torchrun" in capsys.readouterr().err


def test_load_tp_without_process_group_is_an_error(runs):
    ckpts, _ = runs
    with pytest.raises(fp8stream.Fp8StreamError, match="process group"):
        fp8stream.load(ckpts["llama"], device="cpu", tp=2, progress=False)


def _meta(arch, scheme="fp8_per_channel", **over):
    cfg = make_config(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    model = build_meta_model(cfg, torch.bfloat16)
    replace_with_fp8(model, scheme, [r"(^|\.)gate$", r"(^|\.)shared_expert_gate$", r"^lm_head$"], torch.bfloat16)
    return model


def test_layout_follows_transformers_plan():
    lay = plan_layout(_meta("qwen3_moe"), tp=2, ep=False, rank=1, world=2)
    assert lay.shards["model.layers.0.self_attn.q_proj.weight"] == Shard(0, 1, 2)
    assert lay.shards["model.layers.0.self_attn.o_proj.weight"] == Shard(1, 1, 2)
    assert lay.shards["model.layers.0.mlp.experts.gate_up_proj"] == Shard(1, 1, 2, parts=2)
    assert lay.shards["model.layers.0.mlp.experts.down_proj"] == Shard(2, 1, 2)
    assert "model.layers.0.mlp.experts" in lay.reduce and "model.layers.0.self_attn.o_proj" in lay.reduce
    assert "model.layers.0.mlp.gate.weight" not in lay.shards  # the router stays whole
    ep = plan_layout(_meta("qwen3_moe"), tp=2, ep=True, rank=1, world=2)
    assert ep.shards["model.layers.0.mlp.experts.gate_up_proj"] == Shard(0, 1, 2) and ep.experts["model.layers.0.mlp.experts"] == (4, 4)


@pytest.mark.parametrize("arch,tp,ep,world,over,match", [
    ("llama", 2, False, 2, dict(num_key_value_heads=1), "num_key_value_heads \\(1\\) does not divide into 2"),
    ("llama", 4, False, 4, dict(num_attention_heads=2, num_key_value_heads=2), "num_attention_heads \\(2\\) does not divide into 4"),
    ("qwen3_moe", 1, True, 3, {}, "number of experts \\(8\\) does not divide into 3"),
    ("llama", 2, False, 4, {}, "tp must be 1 or the world size"),
])
def test_sizes_that_do_not_divide_are_clear_errors(arch, tp, ep, world, over, match):
    with pytest.raises(fp8stream.Fp8StreamError, match=match):
        plan_layout(_meta(arch, **over), tp=tp, ep=ep, rank=0, world=world)


def test_local_plan_packed_rows():
    """gate_up_proj [E=2, 2I=8, H]: rank 1 of 2 holds rows 2-3 (gate) and 6-7 (up) of every expert."""
    plan = TargetPlan("x", (2, 8, 4), sources=["g0", "u0", "g1", "u1"])
    plan.pieces = [Piece("g0", 0, 0, 4, 0), Piece("u0", 0, 4, 4, 1), Piece("g1", 0, 8, 4, 2), Piece("u1", 0, 12, 4, 3)]
    got = local_plan(plan, Shard(1, 1, 2, parts=2))
    assert got.shape == (2, 4, 4) and got.cols is None
    assert got.pieces == [Piece("g0", 2, 0, 2, 0), Piece("u0", 2, 2, 2, 1), Piece("g1", 2, 4, 2, 2), Piece("u1", 2, 6, 2, 3)]
    cols = local_plan(TargetPlan("y", (2, 4, 8), [Piece("d", 0, 0, 8, 0)], ["d"]), Shard(2, 1, 2))
    assert cols.cols == (4, 8) and cols.shape == (2, 4, 4)
