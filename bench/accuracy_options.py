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

Calibrated options (GPTQ rounding of the same per-channel fp8 weights, fp8stream.calibrate, layer by layer on
--calib-text, default the GPL-3 text, which does not overlap the eval text; --calib-tokens in windows of
--calib-context, defaults those of export --calibrate): gptq_token (W8A8 per token, the default's activations,
damping gptq.DAMP = 0.1), gptq_w8a16, gptq_noorder_token (no act-order), gptq_damp0.1_token,
gptq_damp0.01_token (the damping before 2026-11-26 session 5), gptq_fp8x2 (activations as fp8 hi +
fp8 residual), gptq_group128 (1x128 activation groups), gptq_smooth0.5_token (SmoothQuant alpha 0.5 + GPTQ),
smooth0.5_token, fp8x2 (no GPTQ); any of them + "+keep_layers:0,29" keeps those decoder layers in bf16.
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

from fp8stream.calibrate import CALIB_CONTEXT, CALIB_TOKENS
from fp8stream.demo import demo_checkpoint
from fp8stream.quantize import FP8_DTYPE, FP8_MAX, dequantize_activation, quantize_activation, quantize_rows, round_fp8, scale_from_amax


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


def fq_act(x2, act):
    """Fake-quantized activation [M, K] -> float32: per token / 1x128 groups, or fp8x2 (fp8 hi + fp8 residual)."""
    if act == "none":
        return x2.float()
    if act == "fp8x2":
        hi = fq_act(x2, "fp8_per_channel")
        return hi + fq_act(x2.float() - hi, "fp8_per_channel")
    q, s = quantize_activation(x2, act)
    return dequantize_activation(q, s, act)


class FakeFP8Linear(nn.Module):
    """smooth: per-input-channel divisor of x (SmoothQuant; w_deq is then the quantized W * smooth), which
    fp8stream would fold into the preceding RMSNorm weight / Linear."""

    def __init__(self, w_deq: torch.Tensor, act: str, smooth: torch.Tensor | None = None):
        super().__init__()
        self.w, self.act, self.smooth = w_deq, act, smooth

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        if self.smooth is not None:
            x2 = x2.float() / self.smooth
        return (fq_act(x2, self.act) @ self.w.t()).to(x.dtype).reshape(*x.shape[:-1], -1)


# GPTQ (calibrated rounding) options: name -> settings; "keep_layers:..." may follow after "+".
GPTQ = {
    "gptq_token": dict(act="fp8_per_channel"),
    "gptq_w8a16": dict(act="none"),
    "gptq_noorder_token": dict(act="fp8_per_channel", act_order=False),
    "gptq_damp0.1_token": dict(act="fp8_per_channel", damp=0.1),
    "gptq_damp0.01_token": dict(act="fp8_per_channel", damp=0.01),
    "gptq_fp8x2": dict(act="fp8x2"),
    "gptq_group128": dict(act="fp8_per_block"),
    "gptq_smooth0.5_token": dict(act="fp8_per_channel", smooth=0.5),
    "smooth0.5_token": dict(act="fp8_per_channel", smooth=0.5, gptq=False),
    "fp8x2": dict(act="fp8x2", gptq=False),
}


def calibrated(model, name, calib_windows):
    """Replace the decoder Linears of `model` (in place) by GPTQ-rounded fake-quant ones; returns their count."""
    from fp8stream.calibrate import calibrate_decoder, capture_layer_inputs
    from fp8stream.gptq import gptq_fp8

    base, _, extra = name.partition("+")
    cfg = dict(GPTQ[base])
    act, use_gptq, alpha = cfg.pop("act"), cfg.pop("gptq", True), cfg.pop("smooth", None)
    keep = set()
    if extra:
        kind, _, arg = extra.partition(":")
        if kind != "keep_layers":
            raise SystemExit(f"unknown option {name}")
        keep = {int(i) for i in arg.split(",")}
    layers = model.model.layers
    inputs = capture_layer_inputs(model, layers[0], calib_windows)
    count = 0

    def targets_of(i, layer):
        if i in keep:
            return {}
        return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}

    def quantize(i, lname, mod, st):
        nonlocal count
        count += 1
        w, h, sm = mod.weight.float(), st.h, None
        if alpha is not None:
            sm = (st.amax.clamp(min=1e-5) ** alpha / w.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            w, h = w * sm[None, :], h / sm[:, None] / sm[None, :]
        s = scale_from_amax(w.abs().amax(-1, keepdim=True))
        codes = gptq_fp8(w, h, s, **cfg) if use_gptq else round_fp8(w, s)
        return FakeFP8Linear(codes.float() * s, act, sm)

    calibrate_decoder(layers, inputs, targets_of, quantize)
    return count


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
    ap.add_argument("--calib-text", default="/usr/share/common-licenses/GPL-3",
                    help="calibration text of the gptq_* options (must not overlap the eval text; default: the GPL-3)")
    ap.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS)
    ap.add_argument("--calib-context", type=int, default=CALIB_CONTEXT, help="calibration window length")
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

    calib = None
    for name in args.options:
        cal_info = {}
        if name == "float32_model":  # the noise floor: the same weights, computed in float32
            m, n_fp8 = copy.deepcopy(model).float(), 0
        elif name.partition("+")[0] in GPTQ:
            m = copy.deepcopy(model)
            if calib is None:
                calib = tok(Path(args.calib_text).read_text(), return_tensors="pt").input_ids[:, : args.calib_tokens]
            t_cal = time.time()
            with torch.no_grad():
                n_fp8 = calibrated(m, name, list(calib.split(args.calib_context, dim=1)))
            cal_info = dict(calib_text=args.calib_text, calib_tokens=calib.shape[1], calib_context=args.calib_context,
                            calib_seconds=round(time.time() - t_cal, 1))
        else:
            m = copy.deepcopy(model)
            n_fp8 = apply(m, *option(name))
        t0 = time.time()
        with torch.no_grad():
            r = metrics(m(ids).logits[0])
        r.update(option=name, n_fp8_linears=n_fp8, tokens=n, seconds=round(time.time() - t0, 1), **cal_info)
        print(json.dumps(r), flush=True)
        del m


if __name__ == "__main__":
    main()
