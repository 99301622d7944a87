"""Run under torchrun (gloo, CPU) by test_distributed.py: load each case with tp/ep, save logits and the report.

argv: CASES.json OUT_DIR. Each case: {"name", "path", "scheme", "tp", "ep"}. Writes OUT_DIR/<name>-rank<r>.pt
with {"logits", "generated", "report", "shapes", "state"} (or {"error"} for a case that must fail).
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

import fp8stream


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    for case in cases:
        try:
            model = fp8stream.load(case["path"], device="cpu", scheme=case["scheme"], progress=False, tp=case["tp"], ep=case["ep"],
                                   staging_mib=case.get("staging_mib", 256))
        except fp8stream.Fp8StreamError as e:
            torch.save({"error": str(e)}, out / f"{case['name']}-rank{rank}.pt")
            continue
        with torch.no_grad():
            logits = model(ids).logits
        gen = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
        shapes = {n: list(p.shape) for n, p in model.named_parameters()}
        state = {n: t.clone() for n, t in model.state_dict().items()}
        torch.save({"logits": logits, "generated": gen, "report": asdict(model.fp8stream_report), "shapes": shapes, "state": state},
                   out / f"{case['name']}-rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
