"""`fp8stream eval`: how close an FP8 load is to the bf16 model, on real text.

The text is tokenized once and cut into windows of `context` tokens (default: all the tokens in one
window, up to the model's max_position_embeddings). The bf16 model (transformers, loaded normally)
runs first; its logits are kept on the host (in the model's dtype, as it produced them). Then each
FP8 scheme is loaded with fp8stream.load, run over the same windows, and compared position by
position with the bf16 logits:

  perplexity        exp(mean next-token negative log-likelihood) over every predicted position
  ppl_change_pct    100 * (perplexity / bf16 perplexity - 1)
  top1_agreement    fraction of positions where the FP8 argmax equals the bf16 argmax
  kl_mean           mean over positions of KL(p_bf16 || p_fp8) in nats (softmax in float32)

Only one model is on the device at a time. The default text is `data/english.txt` shipped in the
package (the Apache License 2.0 followed by the history and license text of Python, about 6000
tokens of English; the same file as tests/data/english.txt).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .errors import CheckpointError, Fp8StreamError
from .quantize import SCHEMES

DEFAULT_TOKENS = 4096
DEFAULT_TEXT_NAME = "english.txt"
BF16 = "bf16"
# Positions per float32 log-softmax chunk (bounds the comparison's temporaries: 3 x chunk x vocab x 4 B).
_CHUNK = 256


def default_text() -> str:
    """The English text shipped inside the package (data/english.txt)."""
    return resources.files("fp8stream").joinpath("data", DEFAULT_TEXT_NAME).read_text(encoding="utf-8")


@dataclass
class SchemeResult:
    """One row of the table. `scheme` is "bf16" for the reference row."""

    scheme: str
    perplexity: float
    ppl_change_pct: float
    top1_agreement: float
    kl_mean: float
    weight_bytes: int  # bytes of the model's parameters and buffers on the device
    load_seconds: float
    eval_seconds: float
    kept_modules: list[str] = field(default_factory=list)  # Linear / experts modules left in bf16 (FP8 rows)


@dataclass
class EvalResult:
    model: str
    text: str
    tokens: int  # tokens fed to the model (predicted positions: tokens - windows)
    predicted: int
    context: int
    windows: int
    device: str
    results: list[SchemeResult]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def table(self) -> str:
        head = ("scheme", "perplexity", "vs bf16", "top-1 agree", "KL(bf16||fp8)", "weights")
        rows = [
            (r.scheme, f"{r.perplexity:.4f}", "" if r.scheme == BF16 else f"{r.ppl_change_pct:+.2f}%",
             f"{r.top1_agreement:.4f}", f"{r.kl_mean:.5f}", f"{r.weight_bytes / 2**20:,.1f} MiB")
            for r in self.results
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        lines = [f"{self.model}: {self.tokens} tokens of {self.text} ({self.windows} window(s) of <= {self.context}), "
                 f"{self.predicted} predicted positions, on {self.device}",
                 fmt(head), fmt(tuple("-" * w for w in widths))]
        lines += [fmt(r) for r in rows]
        for r in self.results:
            if r.kept_modules:
                lines.append(f"  {r.scheme}: {len(r.kept_modules)} module(s) kept in bf16: {', '.join(r.kept_modules)}")
        return "\n".join(lines)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"fp8stream eval: {msg}", file=sys.stderr, flush=True)


def _windows(ids: torch.Tensor, context: int) -> list[torch.Tensor]:
    return [ids[i : i + context] for i in range(0, ids.numel(), context) if ids[i : i + context].numel() >= 2]


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _logits(model, window: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        out = model(window.to(device)[None], use_cache=False)
    return out.logits[0, :-1]  # position i predicts token i + 1


class _Stats:
    """Running sums over windows: nll, KL, top-1 matches, positions."""

    def __init__(self):
        self.nll = self.kl = 0.0
        self.agree = self.n = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, ref: torch.Tensor | None) -> None:
        targets = targets.to(logits.device)
        for a in range(0, logits.shape[0], _CHUNK):
            lq = torch.log_softmax(logits[a : a + _CHUNK].float(), dim=-1)
            self.nll -= float(lq.gather(1, targets[a : a + _CHUNK, None]).double().sum())
            if ref is not None:
                lp = torch.log_softmax(ref[a : a + _CHUNK].to(lq.device).float(), dim=-1)
                self.kl += float((lp.exp() * (lp - lq)).sum(dim=-1).clamp_(min=0).double().sum())
                self.agree += int((lq.argmax(-1) == lp.argmax(-1)).sum())
                del lp
            else:
                self.agree += lq.shape[0]
            self.n += lq.shape[0]
            del lq

    def result(self, scheme: str, bf16_ppl: float | None, **kw) -> SchemeResult:
        ppl = math.exp(self.nll / self.n)
        change = 0.0 if bf16_ppl is None else 100.0 * (ppl / bf16_ppl - 1.0)
        return SchemeResult(scheme=scheme, perplexity=ppl, ppl_change_pct=change, top1_agreement=self.agree / self.n,
                            kl_mean=self.kl / self.n, **kw)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise Fp8StreamError(f"bad device '{device}': {e}") from None


def _token_ids(path: Path, text: str | None, token_ids, tokens: int) -> torch.Tensor:
    if token_ids is not None:
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: no usable tokenizer ({first})") from None
        ids = tok(default_text() if text is None else text, return_tensors="pt").input_ids.reshape(-1)
    if ids.numel() < 2:
        raise Fp8StreamError(f"the text has {ids.numel()} token(s); at least 2 are needed")
    return ids[:tokens]


def evaluate(
    path: str | os.PathLike | None = None,
    *,
    text: str | None = None,
    text_name: str | None = None,
    token_ids=None,
    schemes: list[str] | tuple[str, ...] | None = None,
    tokens: int = DEFAULT_TOKENS,
    context: int | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    load_kwargs: dict | None = None,
    exported: list[str | os.PathLike] | tuple = (),
) -> EvalResult:
    """Perplexity, top-1 agreement and KL of each FP8 scheme against the bf16 model on the same text.

    path: checkpoint directory (default: the demo's SmolLM2-135M-Instruct, converted once into
    `cache_dir`). text: the text to stream (default: the package's English text); or token_ids
    directly (then no tokenizer is needed). schemes: FP8 schemes to compare (default: all).
    tokens: how many tokens of the text to use (fewer if the text is shorter). context: window size
    (default: min(tokens, max_position_embeddings)). load_kwargs: passed to fp8stream.load.
    exported: FP8 checkpoint directories (e.g. `fp8stream export [--calibrate]` of `path`), each loaded
    as is with fp8stream.load and compared with `path`'s bf16 model; its row is named
    "DIR (scheme)". `path` itself must be the full-precision checkpoint.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar; restored on return
    try:
        return _evaluate(path, text, text_name, token_ids, schemes, tokens, context, device, cache_dir, progress, load_kwargs,
                         exported)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _evaluate(path, text, text_name, token_ids, schemes, tokens, context, device, cache_dir, progress, load_kwargs,
              exported=()) -> EvalResult:
    from transformers import AutoModelForCausalLM

    from .loader import load

    schemes = list(SCHEMES if schemes is None else schemes)
    bad = [s for s in schemes if s not in SCHEMES]
    if bad:
        raise Fp8StreamError(f"unknown scheme '{bad[0]}' (choose from {', '.join(SCHEMES)})")
    if tokens < 2:
        raise Fp8StreamError(f"--tokens must be >= 2, got {tokens}")
    for d in exported:
        if not (Path(d) / "config.json").is_file():
            raise CheckpointError(f"{d}: not a checkpoint directory (no config.json)")
    if path is None:
        from .demo import demo_checkpoint

        path = demo_checkpoint(cache_dir, verbose=progress)
        model_name = f"SmolLM2-135M-Instruct ({path})"
    else:
        model_name = str(path)
    path = Path(path)
    dev = _device(device)
    ids = _token_ids(path, text, token_ids, tokens)
    text_name = text_name or ("token ids" if token_ids is not None else f"fp8stream/data/{DEFAULT_TEXT_NAME}" if text is None else "text")

    t0 = time.perf_counter()
    try:
        ref_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, local_files_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: transformers cannot load the bf16 reference ({type(e).__name__}: {first})") from None
    ref_model = ref_model.to(dev).eval()
    max_pos = getattr(ref_model.config, "max_position_embeddings", None) or ids.numel()
    context = int(context or min(ids.numel(), max_pos))
    if context < 2:
        raise Fp8StreamError(f"--context must be >= 2, got {context}")
    windows = _windows(ids, context)
    load_s = time.perf_counter() - t0

    _say(progress, f"bf16 reference over {ids.numel()} tokens in {len(windows)} window(s)")
    t0 = time.perf_counter()
    refs, stats = [], _Stats()
    for w in windows:
        lg = _logits(ref_model, w, dev)
        stats.add(lg, w[1:], None)
        refs.append(lg.cpu())
        del lg
    bf16 = stats.result(BF16, None, weight_bytes=_model_bytes(ref_model), load_seconds=load_s,
                        eval_seconds=time.perf_counter() - t0)
    bf16.kl_mean, bf16.top1_agreement = 0.0, 1.0
    del ref_model
    _empty_cache(dev)

    results = [bf16]
    runs = [(scheme, path, scheme) for scheme in schemes] + [(None, Path(d), None) for d in exported]
    for scheme, load_path, label in runs:
        _say(progress, f"{label or load_path}: loading")
        kw = (load_kwargs or {}) if scheme is not None else {}  # an export is read as it was written
        model = load(load_path, device=dev, scheme=scheme, progress=progress, **kw).eval()
        rep = model.fp8stream_report
        label = label or f"{load_path} ({rep.scheme})"
        t0 = time.perf_counter()
        stats = _Stats()
        for w, ref in zip(windows, refs):
            lg = _logits(model, w, dev)
            stats.add(lg, w[1:], ref)
            del lg
        results.append(stats.result(label, bf16.perplexity, weight_bytes=rep.final_bytes, load_seconds=rep.load_seconds,
                                    eval_seconds=time.perf_counter() - t0, kept_modules=list(rep.kept_modules)))
        _say(progress, f"{label}: perplexity {results[-1].perplexity:.4f} ({results[-1].ppl_change_pct:+.2f}%)")
        del model
        _empty_cache(dev)
    return EvalResult(model=model_name, text=text_name, tokens=int(ids.numel()), predicted=stats.n, context=context,
                      windows=len(windows), device=str(dev), results=results)


def _empty_cache(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def run_eval(args) -> int:
    """The `fp8stream eval` command (arguments from cli.py)."""
    text, text_name = None, None
    if args.text is not None:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise Fp8StreamError(f"{args.text}: cannot read the text ({getattr(e, 'strerror', None) or e})") from None
        text_name = args.text
    load_kwargs = {"ignore": list(args.ignore)} if args.ignore else None
    res = evaluate(args.path, text=text, text_name=text_name, schemes=args.schemes, tokens=args.tokens, context=args.context,
                   device=args.device, cache_dir=args.cache_dir, progress=not args.json and sys.stderr.isatty(),
                   load_kwargs=load_kwargs, exported=args.exported or ())
    print(res.to_json() if args.json else res.table())
    return 0
