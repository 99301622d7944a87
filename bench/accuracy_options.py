"""Accuracy options for ACCURACY.md, simulated on the bf16 demo model (CPU, float32 reference arithmetic).

Each option replaces every nn.Linear but lm_head (or those not kept) with a module that computes exactly
what fp8stream's reference path computes: dequantized fp8 activation @ dequantized fp8 weight^T in float32,
cast to bf16. The weight side is precomputed once per option, so options that fp8stream.load does not
implement (MSE-chosen scales, layers kept in bf16 by sensitivity) can be measured before they are built.
`channel_token` is the default fp8_per_channel; `fp8stream eval` reproduces its numbers exactly.

    python bench/accuracy_options.py [--tokens 4096] [--text FILE] OPTION [OPTION ...]

Options: channel_token, w8a16 (weights only), a8_only (activations only), mse_clip_token, mse_noclip_token,
channel_group128, keep_layers:0,2,3, only_type:q_proj, only_layer:7 (the last two: every other Linear in bf16,
the per-type / per-layer sensitivity). Prints one JSON line per option: ppl, ref (bf16 ppl), d (relative
change), top1 (agreement with bf16), kl (mean KL(bf16 || option), nats).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import time
from pathlib import Path

import torch
from torch import nn

from fp8stream.demo import demo_checkpoint
from fp8stream.quantize import FP8_DTYPE, FP8_MAX, dequantize_activation, quantize_activation, quantize_rows, scale_from_amax


def wq_channel(w):
    q, s = quantize_rows(w.clone())
    return q.float() * s[:, None]


def _fq(x32, s):
    return (x32 / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s


def wq_mse(w, lo, hi, steps):
    """Per row, the scale c * amax/448 (c in linspace(lo, hi, steps)) with the least squared weight error.
    c < 1 clips the row's largest elements; c in [1, 2) keeps them and only moves the fp8 grid."""
    w32 = w.float()
    base = scale_from_amax(w32.abs().amax(-1, keepdim=True))
    best_s, best_e = base.clone(), torch.full_like(base, float("inf"))
    for c in torch.linspace(lo, hi, steps).tolist():
        s = base * c
        e = (_fq(w32, s) - w32).pow(2).sum(-1, keepdim=True)
        better = e < best_e
        best_e, best_s = torch.where(better, e, best_e), torch.where(better, s, best_s)
    return _fq(w32, best_s)


class FakeFP8Linear(nn.Module):
    def __init__(self, w_deq: torch.Tensor, act: str):
        super().__init__()
        self.w, self.act = w_deq, act

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        if self.act == "none":
            xd = x2.float()
        else:
            q, s = quantize_activation(x2, self.act)
            xd = dequantize_activation(q, s, self.act)
        return (xd @ self.w.t()).to(x.dtype).reshape(*x.shape[:-1], -1)


def option(name: str):
    """-> (weight quantizer or None for bf16 weights, activation scheme or 'none', keep regexes)."""
    kind, _, arg = name.partition(":")
    table = {
        "channel_token": (wq_channel, "fp8_per_channel", ()),
        "w8a16": (wq_channel, "none", ()),
        "a8_only": (None, "fp8_per_channel", ()),
        "mse_clip_token": (lambda w: wq_mse(w, 0.75, 2.0, 80), "fp8_per_channel", ()),
        "mse_noclip_token": (lambda w: wq_mse(w, 1.0, 2.0, 64), "fp8_per_channel", ()),
        "channel_group128": (wq_channel, "fp8_per_block", ()),
    }
    if kind in table:
        return table[kind]
    if kind == "keep_layers":
        return wq_channel, "fp8_per_channel", tuple(rf"^model\.layers\.{int(i)}\." for i in arg.split(","))
    if kind == "only_type":
        return wq_channel, "fp8_per_channel", (rf"^(?!.*\.{arg}$)",)
    if kind == "only_layer":
        return wq_channel, "fp8_per_channel", (rf"^(?!model\.layers\.{int(arg)}\.)",)
    raise SystemExit(f"unknown option {name}")


def apply(model, wq, act, keep) -> int:
    pats = [re.compile(p) for p in keep]
    n = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head" and not any(p.search(name) for p in pats):
            w = mod.weight.float() if wq is None else wq(mod.weight.data)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FakeFP8Linear(w, act))
            n += 1
    return n


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fp8stream.evaluate import default_text

    ap = argparse.ArgumentParser()
    ap.add_argument("options", nargs="+")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--text", default=None, help="default: the package's English text")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    ckpt = demo_checkpoint(args.cache_dir)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    text = Path(args.text).read_text() if args.text else default_text()
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    n = ids.shape[1]
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = model(ids).logits[0]

    def metrics(lg):
        tgt = ids[0, 1:]
        nll = rnll = kl = 0.0
        agree = 0
        for a in range(0, n - 1, 512):
            b = min(a + 512, n - 1)
            lq, lp = torch.log_softmax(lg[a:b].float(), -1), torch.log_softmax(ref[a:b].float(), -1)
            nll -= lq.gather(1, tgt[a:b, None]).sum().item()
            rnll -= lp.gather(1, tgt[a:b, None]).sum().item()
            kl += (lp.exp() * (lp - lq)).sum().item()
            agree += (lq.argmax(-1) == lp.argmax(-1)).sum().item()
        m = n - 1
        return dict(ppl=math.exp(nll / m), ref=math.exp(rnll / m), d=math.exp(nll / m) / math.exp(rnll / m) - 1,
                    top1=agree / m, kl=kl / m)

    for name in args.options:
        if name == "float32_model":  # the noise floor: the same weights, computed in float32
            m, n_fp8 = copy.deepcopy(model).float(), 0
        else:
            m = copy.deepcopy(model)
            n_fp8 = apply(m, *option(name))
        t0 = time.time()
        with torch.no_grad():
            r = metrics(m(ids).logits[0])
        r.update(option=name, n_fp8_linears=n_fp8, tokens=n, seconds=round(time.time() - t0, 1))
        print(json.dumps(r), flush=True)
        del m


if __name__ == "__main__":
    main()
