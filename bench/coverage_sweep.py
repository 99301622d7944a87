"""Architecture coverage: every model_type in transformers' causal-LM auto mapping, tiny, through fp8stream.load.

For each type: the config class's defaults scaled down (hidden 64, 2 layers, 4 heads, vocab 256, few experts),
a random bf16 model written with save_pretrained, then `fp8stream.load(dir, device="cpu")`. Each type ends as
  fp8      FP8 (quantized_fraction >= 0.5), logits within LOGIT_REL_BOUND of the bf16 model, peak <= final + staging
  refused  fp8stream raised its one-line error (Fp8StreamError)
  FAIL     loaded but unquantized, wrong logits, peak bound broken, or a non-fp8stream exception
  skipped  the tiny model cannot be built or run offline in bf16 on the CPU (the reason is kept)

    PYTHONPATH=src python bench/coverage_sweep.py --json bench/results/coverage.json --markdown
    PYTHONPATH=src python bench/coverage_sweep.py --types gpt2,llama,mixtral     # a subset
    PYTHONPATH=src python bench/coverage_sweep.py --decode --json /tmp/decode.json   # + the default decode loop

--decode: for every fp8 row of a model class transformers marks compilable (the ones fp8stream gives a static cache
on CUDA), the default decode path (decode.install, run eagerly on the CPU: the same loop and buffers as CUDA, no
capture) against transformers' own static-cache generate, greedy, 8 new tokens, batch 2: the row's "decode" says
"same", "differs" (the first step that differs), "transformers (reason)" when the call went to transformers' loop,
or the error.

tests/test_coverage.py runs the same `check_type` over a fixed fast subset in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

LOGIT_REL_BOUND = 0.3  # the bound tests/test_load.py holds every tiny model's FP8 logits to
STAGING_MIB = 64

# config attribute -> tiny value (set only where the config has the attribute, through attribute_map too)
_TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 256,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "ffn_dim": 128, "n_inner": 128,
    "word_embed_proj_dim": 64, "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
    "v_head_dim": 16, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "num_local_experts_per_tok": 2,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "rotary_dim": 16, "decoder_layers": 2, "encoder_layers": 2, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128,
    "decoder_attention_heads": 4, "encoder_attention_heads": 4, "d_model": 64, "n_positions": 256,
    "sliding_window": 64, "attention_chunk_size": 64, "global_attn_every_n_layers": 2,
}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")


def _shrink(cfg, seen=None) -> None:
    """Scale a config (and its sub-configs) down in place."""
    from transformers import PretrainedConfig

    seen = seen if seen is not None else set()
    if id(cfg) in seen:
        return
    seen.add(id(cfg))
    names = set(cfg.to_dict()) | set(getattr(cfg, "attribute_map", {}) or {})
    for key, value in _TINY.items():
        if key in names:
            try:
                setattr(cfg, key, value)
            except Exception:
                pass
    for key in _TOKEN_IDS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v >= 256:
            setattr(cfg, key, 1)
        elif isinstance(v, list):
            setattr(cfg, key, [i if i < 256 else 1 for i in v])
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and layer_types:
        kinds = list(dict.fromkeys(layer_types))  # one layer of each kind (a hybrid needs its attention layer too)
        kinds = (kinds * 2)[: max(2, len(kinds))]
        try:
            cfg.layer_types = kinds
            if "num_hidden_layers" in names:
                cfg.num_hidden_layers = len(kinds)
        except AttributeError:  # a derived property on some configs
            pass
    if getattr(cfg, "kv_lora_rank", None) and "num_key_value_heads" in names:
        cfg.num_key_value_heads = cfg.num_attention_heads  # multi-head latent attention: one kv head per head
    for key in list(cfg.to_dict()):
        sub = getattr(cfg, key, None)
        if isinstance(sub, PretrainedConfig):
            _shrink(sub, seen)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _build(model_type: str, out: Path):
    """(bf16 model, input ids) written to `out`, or raises _Skip with the reason."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        cfg = CONFIG_MAPPING[model_type]()
        _shrink(cfg)
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False  # the head is kept in bf16 either way; untied keeps the count honest
    except Exception as e:
        raise _Skip(f"config: {type(e).__name__}: {_first(e)}") from None
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    except ImportError as e:
        raise _Skip(f"needs an extra package ({_first(e)})") from None
    except Exception as e:
        raise _Skip(f"tiny model: {type(e).__name__}: {_first(e)}") from None
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", 256) or 256
    ids = torch.randint(3, min(vocab, 256), (1, 12), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            ref = model(input_ids=ids).logits.float()
    except Exception as e:
        raise _Skip(f"bf16 forward: {type(e).__name__}: {_first(e)}") from None
    try:
        model.save_pretrained(out)
    except Exception as e:
        raise _Skip(f"save_pretrained: {type(e).__name__}: {_first(e)}") from None
    return ids, ref


class _Skip(Exception):
    pass


def _first(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [""])[0])[:160]


def check_decode(model, ids: torch.Tensor, path: Path) -> str:
    """fp8stream's decode loop against transformers' static-cache generate on one model (see --decode). Tokens that
    differ in bf16 are checked again on the model loaded in float32: the same there means bf16 rounding (a masked
    attention over the static cache's slots rounds differently from transformers' own mask preparation)."""
    import fp8stream
    from fp8stream import decode

    if not getattr(type(model), "_can_compile_fullgraph", False):
        return "not compilable (dynamic cache: transformers' loop)"
    ids = torch.cat([ids, ids.flip(1)])  # batch 2
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)

    def compare(m):
        decode.install(m, capture=False)
        with torch.no_grad():
            mine = m.generate(ids, **kw)
            stats = decode.graph_stats(m)
            if not stats.get("loop_calls"):
                return None, f"transformers ({stats.get('fallback')})"
            ref = m.generate(ids, disable_compile=True, **kw)
        if torch.equal(mine, ref):
            return True, "same"
        if mine.shape != ref.shape:
            return False, f"differs (shape {tuple(mine.shape)} vs {tuple(ref.shape)})"
        return False, f"differs from new token {int((mine != ref).any(0).nonzero()[0, 0]) - ids.shape[1]}"

    try:
        ok, what = compare(model)
        if ok is False:
            ok32, what32 = compare(fp8stream.load(path, device="cpu", progress=False, dtype=torch.float32))
            what = f"{'same' if ok32 else what32} in float32; bf16 {what}"
    except Exception as e:
        return f"error: {type(e).__name__}: {_first(e)}"
    return what


def check_type(model_type: str, workdir: Path, timeout_s: int = 120, decode: bool = False) -> dict:
    """One row of the sweep: {"type", "result": fp8|refused|FAIL|skipped, "detail", ...}."""
    import fp8stream

    row = {"type": model_type}
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout_s)
    t0 = time.perf_counter()
    try:
        out = workdir / model_type
        try:
            ids, ref = _build(model_type, out)
        except _Skip as e:
            return {**row, "result": "skipped", "detail": str(e)}
        try:
            model = fp8stream.load(out, device="cpu", progress=False, staging_mib=STAGING_MIB)
        except fp8stream.Fp8StreamError as e:
            msg = str(e)
            return {**row, "result": "refused" if "\n" not in msg else "FAIL", "detail": msg}
        rep = model.fp8stream_report
        row.update(quantized_fraction=round(rep.quantized_fraction, 3), quantized_tensors=rep.quantized_tensors)
        with torch.no_grad():
            got = model(input_ids=ids).logits.float()
        rel = _rel(got, ref)
        row["logits_rel"] = round(rel, 4)
        if rep.quantized_fraction < 0.5:
            return {**row, "result": "FAIL", "detail": f"loaded but unquantized (quantized_fraction {rep.quantized_fraction:.2f})"}
        if not math.isfinite(rel) or rel > LOGIT_REL_BOUND:
            return {**row, "result": "FAIL", "detail": f"logits off: relative error {rel:.3f} > {LOGIT_REL_BOUND}"}
        if rep.peak_bytes > rep.final_bytes + rep.staging_bytes:
            return {**row, "result": "FAIL", "detail": f"peak {rep.peak_bytes} > final {rep.final_bytes} + staging {rep.staging_bytes}"}
        if decode:
            row["decode"] = check_decode(model, ids, out)
        return {**row, "result": "fp8", "detail": ""}
    except _Timeout:
        return {**row, "result": "FAIL", "detail": f"timed out after {timeout_s} s"}
    except Exception as e:
        return {**row, "result": "FAIL", "detail": f"{type(e).__name__}: {_first(e)}"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        row["seconds"] = round(time.perf_counter() - t0, 2)


def all_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def markdown(rows: list[dict]) -> str:
    import transformers

    by = {k: [r for r in rows if r["result"] == k] for k in ("fp8", "refused", "FAIL", "skipped")}
    lines = [f"transformers {transformers.__version__}, torch {torch.__version__}, CPU: {len(rows)} causal-LM types; "
             f"{len(by['fp8'])} FP8, {len(by['refused'])} refused, {len(by['FAIL'])} failed, {len(by['skipped'])} skipped.", "",
             "| result | types | why |", "|---|---|---|"]
    lines.append(f"| FP8 | {len(by['fp8'])} | {', '.join(r['type'] for r in by['fp8'])} |")
    for kind in ("refused", "FAIL", "skipped"):
        groups: dict[str, list[str]] = {}
        for r in by[kind]:
            why = re.sub(r"\S*/(config\.json|model\.safetensors): ", "", r["detail"])  # the sweep's temporary paths
            groups.setdefault(why.split(":")[0] if kind == "skipped" else why, []).append(r["type"])
        for why, types in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"| {kind} | {len(types)} | {', '.join(types)}: {why.replace('|', '/')[:200]} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", help="comma-separated model types (default: all in the causal-LM mapping)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--markdown", action="store_true", help="print the README table")
    ap.add_argument("--timeout-s", type=int, default=120)
    ap.add_argument("--decode", action="store_true", help="also check the default decode loop on each FP8 model")
    args = ap.parse_args()
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("fp8stream").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    types = args.types.split(",") if args.types else all_types()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in types:
            row = check_type(t, Path(tmp), args.timeout_s, args.decode)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(rows, indent=1))
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
