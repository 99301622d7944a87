"""Run under torchrun (gloo, CPU) by test_reload.py: load A with tp/ep, reload B into it (from the directory and from
tensors), compare with this rank's fresh tp/ep load of B, and check a NaN only rank 0's rows hold.

argv: CASES.json OUT_DIR. Each case: {"name", "a", "b", "scheme", "tp", "ep"}. Writes OUT_DIR/<name>-rank<r>.pt.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

import fp8stream


def _state(model):
    return {k: (v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v).clone() for k, v in model.state_dict().items()}


def _diff(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    for case in cases:
        kw = dict(device="cpu", scheme=case["scheme"], progress=False, tp=case["tp"], ep=case["ep"])
        fresh = fp8stream.load(case["b"], **kw)
        want, load_read = _state(fresh), fresh.fp8stream_report.read_bytes
        model = fp8stream.load(case["a"], **kw)
        before = _state(model)
        ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
        rep = fp8stream.reload(model, case["b"])
        res = {"dir_diff": _diff(_state(model), want), "changed": _diff(before, want) != [],
               "peak_over_final": rep.peak_bytes - rep.final_bytes, "staging": rep.staging_bytes, "read_bytes": rep.read_bytes, "load_read_bytes": load_read,
               "whole_bytes": sum(f.stat().st_size for f in Path(case["b"]).glob("*.safetensors"))}
        res["read_bytes_unchecked"] = fp8stream.reload(model, case["b"], check_finite=False).read_bytes  # no first pass
        res["ptrs_kept"] = {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs
        model = fp8stream.load(case["a"], **kw)
        ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
        pairs = list(load_file(Path(case["b"]) / "model.safetensors").items())
        fp8stream.reload(model, pairs)
        res["tensors_diff"] = _diff(_state(model), want)
        res["ptrs_kept"] = res["ptrs_kept"] and {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs
        # NaN in row 0 of a column-parallel weight: only rank 0 holds that row
        q = "model.layers.0.self_attn.q_proj.weight"
        bad = [(k, v.clone() if k == q else v) for k, v in pairs]
        next(v for k, v in bad if k == q)[0, 0] = float("nan")
        before = _state(model)
        try:
            fp8stream.reload(model, bad)
            res["nan_error"] = ""
        except fp8stream.Fp8StreamError as e:
            res["nan_error"] = str(e)
        res["nan_unchanged"] = _diff(_state(model), before) == []
        res["ptrs_kept"] = res["ptrs_kept"] and {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs
        res["state"] = _state(model)
        if "experts" in " ".join(want):  # partial: layer 0's q_proj and expert 0 (under ep: only rank 0 holds it)
            model = fp8stream.load(case["a"], **kw)
            old = _state(model)
            give = (q, "model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.experts.0.up_proj.weight")
            fp8stream.reload(model, [(k, v) for k, v in pairs if k in give])
            expect = dict(old)
            for k in (q, q + "_scale"):
                expect[k] = want[k]
            gu = "model.layers.0.mlp.experts.gate_up_proj"
            holds_expert0 = not case["ep"] or rank == 0
            for k in (gu, gu + "_scale"):
                expect[k] = old[k].clone()
                if holds_expert0:
                    expect[k][0] = want[k][0]
            res["partial_diff"] = _diff(_state(model), expect)
            res["partial_changed"] = _diff(old, expect)
        torch.save(res, out / f"{case['name']}-rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
