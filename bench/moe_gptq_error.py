"""GPTQ for fused MoE experts (export --calibrate), measured on the tiny random-weight MoE test models (CPU).

No real MoE checkpoint exists offline, so this measures the rounding itself, not a real model's perplexity:
for each architecture a tiny checkpoint (tests/tiny_models.py) is exported plainly and with --calibrate on
--calib-tokens random token ids (the test suite's CALIB), both are loaded with fp8stream.load, and for every
expert of every layer the output error tr((W - Q) H (W - Q)^T) (gptq.output_error) of its plain and its
GPTQ codes is computed on
  calib:    the expert's own calibration H (its routed inputs in the calibrated model: what GPTQ minimised;
            for down, act(gate) * up through the GPTQ gate_up), and
  held-out: the same on --held-out other random ids (generalisation).
Then the whole model: mean squared logit error and KL(bf16 || fp8) of both exports against the bf16 model
on the held-out ids (--linears-only: also an export whose experts all stay plain, GPTQ for the Linears only).
With --sweep, the check behind calibrate.EXPERT_TOKENS_PER_INPUT: each expert projection GPTQ-rounded on
only n = f * K of its calibration tokens (K its input width), held-out error relative to plain rounding.

    PYTHONPATH=src python bench/moe_gptq_error.py [--arch qwen2_moe qwen3_moe mixtral] [--calib-tokens 512]
        [--held-out 512] [--linears-only] [--sweep 0.125,0.25,0.5,1,2]

Prints one JSON line per architecture (and per sweep point).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fp8stream  # noqa: E402
from fp8stream.calibrate import EXPERT_TOKENS_PER_INPUT, RoutedInputs, expert_hessian, expert_tokens  # noqa: E402
from fp8stream.gptq import gptq_fp8, output_error  # noqa: E402
from fp8stream.experts import FP8Experts  # noqa: E402
from fp8stream.quantize import dequantize, expand_block_scale  # noqa: E402
from tiny_models import make_checkpoint  # noqa: E402


def routed_inputs(model, ids: torch.Tensor, window: int) -> dict[str, list[RoutedInputs]]:
    """{experts module name: what it received, window by window} on `ids` run in windows of `window` tokens."""
    got: dict[str, list[RoutedInputs]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, FP8Experts):
            def hook(_m, args, name=name):
                got.setdefault(name, []).append(RoutedInputs(args[0].reshape(-1, args[0].shape[-1]), args[1]))
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for w in ids.reshape(-1).split(window):
                model(w[None])
    finally:
        for h in handles:
            h.remove()
    return got


def element_scale(stored, scheme, n, k):
    return expand_block_scale(stored, n, k) if scheme == "fp8_per_block" else stored[:, None]


def expert_errors(ref, cal, plain, routed: dict[str, list[RoutedInputs]]) -> list[dict]:
    """Per expert and projection: tokens, output error of the plain and the GPTQ codes on `routed`'s H."""
    rows = []
    for name, windows in routed.items():
        c, p = cal.get_submodule(name), plain.get_submodule(name)
        r = ref.get_submodule(name)
        tokens = expert_tokens(windows, c.num_experts)
        for e in range(c.num_experts):
            count = sum(int(t[e].numel()) for t in tokens)
            row = {"module": name, "expert": e, "tokens": count}
            if count:
                for proj, feats in (("gate_up_proj", lambda e, x, d: x), ("down_proj", c.gated)):
                    h = expert_hessian(windows, tokens, e, feats)
                    w = getattr(r, proj)[e].float()
                    row[f"{proj}_k"] = w.shape[-1]
                    for tag, m in (("plain", p), ("gptq", c)):
                        q = dequantize(getattr(m, proj)[e], getattr(m, f"{proj}_scale")[e], m.scheme)
                        row[f"{proj}_{tag}"] = output_error(w, q, h)
            rows.append(row)
    return rows


def logits_error(ref, model, ids: torch.Tensor, window: int) -> dict:
    mse, kl, n = 0.0, 0.0, 0
    with torch.no_grad():
        for w in ids.reshape(-1).split(window):
            a = ref(w[None]).logits.float()
            b = model(w[None]).logits.float()
            mse += float(((a - b) ** 2).mean(-1).sum())
            kl += float((a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).sum())
            n += w.numel()
    return {"logit_mse": mse / n, "kl": kl / n}


def summarise(rows: list[dict], key: str, chosen: set) -> dict:
    """Over the GPTQ-rounded expert projections (`chosen`: (module, expert, projection))."""
    out = {}
    for proj in ("gate_up_proj", "down_proj"):
        with_err = [r for r in rows if (r["module"], r["expert"], proj) in chosen and f"{proj}_plain" in r]
        ratios = sorted(r[f"{proj}_gptq"] / r[f"{proj}_plain"] for r in with_err)
        out[f"{key}_{proj}"] = {
            "experts": len(with_err),
            "lower": sum(x < 1 for x in ratios),
            "sum_plain": sum(r[f"{proj}_plain"] for r in with_err),
            "sum_gptq": sum(r[f"{proj}_gptq"] for r in with_err),
            "ratio_median": ratios[len(ratios) // 2] if ratios else None,
            "ratio_max": ratios[-1] if ratios else None,
        }
    return out


def sweep(ref, plain, routed_cal, routed_held, fractions: list[float], seed: int = 0) -> list[dict]:
    """Each projection of each expert GPTQ-rounded on n = fraction * K of its calibration tokens (K: the projection's
    input width; experts with fewer tokens are skipped), its held-out output error relative to plain rounding's.
    down's inputs go through the plain gate_up (calibration would use the GPTQ one)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for frac in fractions:
        for proj in ("gate_up_proj", "down_proj"):
            ratios = []
            for name, windows in routed_cal.items():
                p, r = plain.get_submodule(name), ref.get_submodule(name)
                feats = (lambda e, x, d: x) if proj == "gate_up_proj" else p.gated
                tok, held, held_tok = expert_tokens(windows, p.num_experts), routed_held[name], expert_tokens(routed_held[name], p.num_experts)
                for e in range(p.num_experts):
                    w = getattr(r, proj)[e].float()
                    n = max(1, int(frac * w.shape[1]))
                    x_all = torch.cat([feats(e, wi.hidden[t[e]], False).float() for wi, t in zip(windows, tok)])
                    if x_all.shape[0] < n or sum(int(t[e].numel()) for t in held_tok) < 32:
                        continue
                    x = x_all[torch.randperm(x_all.shape[0], generator=g)[:n]]
                    s = element_scale(getattr(p, f"{proj}_scale")[e], p.scheme, *w.shape)
                    q = gptq_fp8(w, x.t() @ x / n, s).float() * s
                    h_held = expert_hessian(held, held_tok, e, feats)
                    plain_q = dequantize(getattr(p, proj)[e], getattr(p, f"{proj}_scale")[e], p.scheme)
                    ratios.append(output_error(w, q, h_held) / output_error(w, plain_q, h_held))
            ratios.sort()
            out.append({"sweep_tokens_per_input": frac, "proj": proj, "experts": len(ratios),
                        "held_out_ratio_median": ratios[len(ratios) // 2] if ratios else None,
                        "held_out_worse": sum(x > 1 for x in ratios), "held_out_ratio_max": ratios[-1] if ratios else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["qwen2_moe", "qwen3_moe", "mixtral"])
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--held-out", type=int, default=512)
    ap.add_argument("--scheme", default="fp8_per_channel")
    ap.add_argument("--linears-only", action="store_true", help="also export with GPTQ for the Linears only (experts plain)")
    ap.add_argument("--sweep", default="", help="comma-separated calibration tokens per input feature (n / K) for the threshold check")
    args = ap.parse_args()
    calib = torch.randint(0, 256, (args.calib_tokens,), generator=torch.Generator().manual_seed(1))  # the tests' CALIB
    held = torch.randint(0, 256, (args.held_out,), generator=torch.Generator().manual_seed(4))
    window = 256  # the tiny models' max_position_embeddings: export --calibrate's windows
    for arch in args.arch:
        with tempfile.TemporaryDirectory() as tmp:
            src, ref = make_checkpoint(arch, Path(tmp) / "src")
            fp8stream.export(src, Path(tmp) / "plain", scheme=args.scheme)
            summary = fp8stream.export(src, Path(tmp) / "cal", scheme=args.scheme, calib_ids=calib)
            plain = fp8stream.load(Path(tmp) / "plain", device="cpu", progress=False)
            cal = fp8stream.load(Path(tmp) / "cal", device="cpu", progress=False)
            routed_cal = routed_inputs(cal, calib, window)
            routed_held = routed_inputs(cal, held, window)
            calib_rows = expert_errors(ref, cal, plain, routed_cal)
            chosen = {(r["module"], r["expert"], proj) for r in calib_rows for proj in ("gate_up_proj", "down_proj")
                      if r["tokens"] and r["tokens"] >= EXPERT_TOKENS_PER_INPUT * r[f"{proj}_k"]}
            line = {"arch": arch, "scheme": args.scheme, "calibration": summary["calibration"],
                    "tokens_per_input": EXPERT_TOKENS_PER_INPUT, **summarise(calib_rows, "calib", chosen),
                    **summarise(expert_errors(ref, cal, plain, routed_held), "held_out", chosen),
                    "logits_plain": logits_error(ref, plain, held, window), "logits_gptq": logits_error(ref, cal, held, window)}
            if args.linears_only:  # the same export with every expert left plain: what the experts' GPTQ adds
                import fp8stream.calibrate as calibrate

                calibrate.EXPERT_TOKENS_PER_INPUT, keep = float("inf"), calibrate.EXPERT_TOKENS_PER_INPUT
                try:
                    fp8stream.export(src, Path(tmp) / "lin", scheme=args.scheme, calib_ids=calib)
                finally:
                    calibrate.EXPERT_TOKENS_PER_INPUT = keep
                lin = fp8stream.load(Path(tmp) / "lin", device="cpu", progress=False)
                line["logits_gptq_linears_only"] = logits_error(ref, lin, held, window)
            print(json.dumps(line), flush=True)
            if args.sweep:
                for row in sweep(ref, plain, routed_cal, routed_held, [float(x) for x in args.sweep.split(",")]):
                    print(json.dumps({"arch": arch, **row}), flush=True)


if __name__ == "__main__":
    main()
