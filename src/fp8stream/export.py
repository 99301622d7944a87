"""Export: write a full-precision checkpoint as an FP8 checkpoint that vLLM / SGLang / transformers load as is.

    fp8stream.export("path/to/bf16", "path/to/out", format="compressed-tensors", scheme="fp8_per_channel")

The decision of what is quantized is exactly `load`'s (same meta model, same load plan, same ignore
rules), and each tensor is quantized with the same functions (quantize.py) in the same row / block
groups, so the exported fp8 bytes and scales are the ones `load` of the original puts in memory.
Tensors are written in the checkpoint's own on-disk naming (per-expert keys stay per-expert), one
output shard per input shard, each quantized tensor streamed in row chunks bounded by the staging
budget: host memory stays bounded whatever the model size; no GPU is needed.

Layouts (all weights F8_E4M3 [N, K], scales float32):
  compressed-tensors (format "float-quantized"): `<module>.weight` + `<module>.weight_scale`
      fp8_per_channel: weight_scale [N, 1]                  (strategy "channel", activations "token")
      fp8_per_tensor:  weight_scale [1], one per tensor      (strategy "tensor", activations "tensor" dynamic)
      fp8_per_block:   weight_scale [ceil(N/128), ceil(K/128)] (strategy "block" [128, 128], activations "group" 128)
  fp8 (transformers FineGrainedFP8 / DeepSeek-V3 / Qwen3-FP8): `<module>.weight` + `<module>.weight_scale_inv`
      [ceil(N/128), ceil(K/128)], w ~= q * scale_inv; fp8_per_block only.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .calibrate import CALIB_CONTEXT, CALIB_TOKENS
from .checkpoint import Checkpoint, TensorInfo
from .errors import CheckpointError, Fp8StreamError, UnsupportedModelError
from .load_plan import build_plan
from .meta_model import build_meta_model
from .modules import replace_with_fp8
from .quantize import BLOCK, SCHEMES, quantize_blocks, quantize_rows, scale_from_amax, tensor_amax
from .report import progress_bar

FORMATS = ("compressed-tensors", "fp8")
# Files copied next to the weights (tokenizer, generation defaults, chat template).
COPY_PATTERNS = ("tokenizer*.json", "tokenizer*.model", "special_tokens_map.json", "generation_config.json", "*.model",
                 "chat_template*", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt")
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
              torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_CT_STRATEGY = {"fp8_per_channel": "channel", "fp8_per_tensor": "tensor", "fp8_per_block": "block"}


@dataclass
class _Entry:
    """One tensor of an output shard: its name, dtype, shape, and how to produce its bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    key: str  # the source checkpoint tensor
    role: str  # "copy", "weight" (fp8, produced with its scale) or "scale"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def default_scheme(format: str) -> str:
    return "fp8_per_block" if format == "fp8" else "fp8_per_channel"


def quantization_config(format: str, scheme: str, ignore: list[str]) -> dict:
    """The config.json `quantization_config` an exported checkpoint carries."""
    if format == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK], "fmt": "e4m3",
                "modules_to_not_convert": ignore}
    strategy = _CT_STRATEGY[scheme]
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
               "group_size": None, "block_structure": [BLOCK, BLOCK] if strategy == "block" else None, "actorder": None,
               "observer": "minmax"}
    act_strategy = {"channel": "token", "tensor": "tensor", "block": "group"}[strategy]
    acts = {"num_bits": 8, "type": "float", "strategy": act_strategy, "symmetric": True, "dynamic": True,
            "group_size": BLOCK if strategy == "block" else None, "block_structure": None, "actorder": None, "observer": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                      "output_activations": None, "format": "float-quantized"}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def _check_out_dir(src: Path, out: Path, overwrite: bool) -> None:
    s, o = src.resolve(), out.resolve()
    if o == s:
        raise Fp8StreamError(f"{out}: is the source checkpoint directory; export writes a new directory")
    if s in o.parents:
        raise Fp8StreamError(f"{out}: is inside the source checkpoint directory {src}; export never writes there")
    if o in s.parents:
        raise Fp8StreamError(f"{out}: contains the source checkpoint directory {src}; choose another output directory")
    if out.exists():
        if not out.is_dir():
            raise Fp8StreamError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise Fp8StreamError(f"{out}: exists and is not empty (pass --overwrite to replace the checkpoint in it)")


def _clear_checkpoint_files(out: Path) -> None:
    """--overwrite: stale shards and index of an earlier checkpoint in `out` would be read with the new ones."""
    for f in list(out.glob("*.safetensors")) + [out / "model.safetensors.index.json"]:
        if f.is_file() or f.is_symlink():
            f.unlink()


def _rows_per_chunk(width: int, src_itemsize: int, staging: int, align: int, name: str, scheme: str) -> int:
    from .stream import _rows_per_chunk as rows_per_chunk, _stage_extra, _stage_kind  # the loader's chunking and budget

    return rows_per_chunk(width, src_itemsize, staging, align, name, _stage_extra(_stage_kind(scheme), src_itemsize, torch.device("cpu")))


def _module_of(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _plan_export(model, plans, ckpt: Checkpoint, scheme: str) -> tuple[dict[str, str], list[str]]:
    """Which checkpoint tensors are quantized ("q") or copied ("k"), and the modules kept in full precision.

    A tensor is quantized when the model parameter(s) it feeds are FP8 weights after the same
    replacement `load` makes; kept modules (in the checkpoint's naming, and the model's where it
    differs) go to the config's ignore list.
    """
    from .loader import _targets

    role: dict[str, str] = {}
    kept_modules: list[str] = []
    for t in _targets(model, plans):
        if t.plan is None:
            continue
        r = "q" if t.scale_attr is not None else "k"
        for key in t.plan.sources:
            if role.setdefault(key, r) != r:
                raise UnsupportedModelError(f"{ckpt.tensors[key].file}: tensor '{key}' feeds both an FP8 and a full-precision parameter; cannot export it")
        if r == "q":
            n = t.plan.shape[-2]
            for key in t.plan.sources:
                info = ckpt.tensors[key]
                if len(info.shape) != 2 or not key.endswith(".weight"):
                    raise UnsupportedModelError(f"{info.file}: tensor '{key}' (shape {list(info.shape)}) feeds FP8 '{t.name}' but is not a 2-D '<module>.weight'; cannot export it")
            if scheme == "fp8_per_block" and len(t.plan.sources) > 1:
                for p in t.plan.pieces:
                    rows = ckpt.tensors[p.key].shape[0]
                    start = p.dst_row % n
                    aligned = p.src_row % BLOCK == 0 and start % BLOCK == 0 and (
                        p.rows % BLOCK == 0 or (p.src_row + p.rows == rows and start + p.rows == n))
                    if not aligned:
                        raise UnsupportedModelError(
                            f"{ckpt.tensors[p.key].file}: tensor '{p.key}' lands at row {start} of the fused '{t.name}' "
                            f"({n} rows per slice), not on a {BLOCK}-row block boundary: its {BLOCK}x{BLOCK} scales would not "
                            "be those of the fused parameter (vLLM / transformers require aligned blocks); export with "
                            "fp8_per_channel or fp8_per_tensor")
        elif (t.attr == "weight" and len(t.plan.shape) == 2 and not isinstance(t.module, torch.nn.Embedding)) or t.attr in ("gate_up_proj", "down_proj"):
            # a Linear-like module left in full precision (routers, lm_head, --ignore): in the checkpoint's
            # naming (what vLLM matches) and the model's (what transformers matches)
            kept_modules += [_module_of(k) for k in t.plan.sources] + [t.name.rpartition(".")[0]]
    # a tied output embedding has no checkpoint tensor: list the module itself
    out_emb = model.get_output_embeddings()
    if out_emb is not None:
        out_name = next(n for n, m in model.named_modules() if m is out_emb)
        if isinstance(out_emb, torch.nn.Linear):
            kept_modules.append(out_name)
    return role, sorted(set(kept_modules), key=_natural)


def _natural(s: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in s.split(".")]


def _shard_entries(ckpt: Checkpoint, role: dict[str, str], scheme: str, scale_suffix: str) -> dict[Path, list[_Entry]]:
    shards: dict[Path, list[_Entry]] = {f: [] for f in ckpt.files}
    names = set(ckpt.tensors)
    for key, info in sorted(ckpt.tensors.items(), key=lambda kv: (ckpt.files.index(kv[1].file), kv[1].offset)):
        entries = shards[info.file]
        if role.get(key) != "q":
            entries.append(_Entry(key, info.dtype, info.shape, key, "copy"))
            continue
        n, k = info.shape
        scale_name = key[: -len("weight")] + scale_suffix
        if scale_name in names:
            raise CheckpointError(f"{info.file}: tensor '{scale_name}' already exists next to '{key}' (is this checkpoint already quantized?)")
        if scheme == "fp8_per_block":
            sshape = (math.ceil(n / BLOCK), math.ceil(k / BLOCK))
        elif scheme == "fp8_per_channel":
            sshape = (n, 1)
        else:
            sshape = (1,)
        entries.append(_Entry(key, torch.float8_e4m3fn, info.shape, key, "weight"))
        entries.append(_Entry(scale_name, torch.float32, sshape, key, "scale"))
    return shards


def _header(entries: list[_Entry]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for e in entries:
        header[e.name] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _write(f, t: torch.Tensor) -> None:
    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


class _Exporter:
    def __init__(self, ckpt: Checkpoint, scheme: str, staging: int):
        self.ckpt, self.scheme, self.staging = ckpt, scheme, staging
        self.n_quant = self.n_kept = 0

    def copy(self, f, info: TensorInfo) -> None:
        """A kept tensor, byte for byte, in row chunks; NaN / Inf is an error as in `load`."""
        self.n_kept += 1
        if not info.shape or info.nbytes == 0:
            if info.nbytes:
                x = self.ckpt.read_rows(info.key, 0, 1)
                self._check_finite(info, x.reshape(1, -1), 0)
                _write(f, x)
            return
        flat = info.flat_shape[0]
        per_row = max(info.row_bytes * 2, 1)  # the rows and isfinite's mask
        step = max(1, self.staging // per_row)
        for r0 in range(0, flat, step):
            x = self.ckpt.read_rows(info.key, r0, min(r0 + step, flat))
            self._check_finite(info, x.reshape(x.shape[0], -1), r0)
            _write(f, x)

    def _check_finite(self, info: TensorInfo, rows: torch.Tensor, r0: int) -> None:
        if not rows.is_floating_point():
            return
        bad = ~torch.isfinite(rows).all(dim=1)
        if bad.any():
            row = r0 + int(bad.nonzero()[0])
            raise CheckpointError(f"{info.file}: tensor '{info.key}' contains NaN or Inf (row {row})")

    def quantize(self, f, info: TensorInfo) -> torch.Tensor:
        """Write the fp8 rows of one checkpoint tensor; return its float32 scales (written after it)."""
        self.n_quant += 1
        n, k = info.shape
        block = self.scheme == "fp8_per_block"
        itemsize = info.dtype.itemsize
        step = _rows_per_chunk(k, itemsize, self.staging, BLOCK if block and n >= BLOCK else 1, info.key, self.scheme)
        if block:
            step = min(step, math.ceil(n / BLOCK) * BLOCK)
            scales = torch.empty(math.ceil(n / BLOCK), math.ceil(k / BLOCK))
        else:
            scales = torch.empty(n)
        tensor_scale = None
        if self.scheme == "fp8_per_tensor":  # first pass: the tensor's amax, as load's shard scales
            amax = torch.zeros(())
            for r0 in range(0, n, step):
                amax = torch.maximum(amax, tensor_amax(self.ckpt.read_rows(info.key, r0, min(r0 + step, n))))
            if not torch.isfinite(amax):
                raise CheckpointError(f"{info.file}: tensor '{info.key}' contains NaN or Inf")
            tensor_scale = scale_from_amax(amax.reshape(1))
        for r0 in range(0, n, step):
            r1 = min(r0 + step, n)
            x = self.ckpt.read_rows(info.key, r0, r1)
            if block:
                q, bs = quantize_blocks(x)
                scales[r0 // BLOCK : r0 // BLOCK + bs.shape[0]] = bs
            elif tensor_scale is not None:
                q, _ = quantize_rows(x, tensor_scale.expand(r1 - r0))
            else:
                q, rs = quantize_rows(x)
                scales[r0:r1] = rs
            _write(f, q)
            del x, q
        if tensor_scale is not None:
            return tensor_scale
        if not torch.isfinite(scales).all():
            self._raise_non_finite(info, scales, block)
        return scales

    def _raise_non_finite(self, info: TensorInfo, scales: torch.Tensor, block: bool) -> None:
        if not block:
            row = int((~torch.isfinite(scales)).nonzero()[0])
        else:
            br = int((~torch.isfinite(scales).all(dim=1)).nonzero()[0])
            rows = self.ckpt.read_rows(info.key, br * BLOCK, min((br + 1) * BLOCK, info.shape[0]))
            bad = ~torch.isfinite(rows).all(dim=1)
            row = br * BLOCK + (int(bad.nonzero()[0]) if bad.any() else 0)
        raise CheckpointError(f"{info.file}: tensor '{info.key}' contains NaN or Inf (row {row})")


def _copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for pattern in COPY_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and f.name not in copied:
                shutil.copyfile(f, out / f.name)
                copied.append(f.name)
    return copied


def export(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    format: str = "compressed-tensors",
    scheme: str | None = None,
    *,
    ignore: tuple[str, ...] | list[str] = (),
    staging_mib: float = 256,
    overwrite: bool = False,
    progress: bool = False,
    calibrate: str | os.PathLike | None = None,
    calib_tokens: int = CALIB_TOKENS,
    calib_ids=None,
) -> dict:
    """Write the full-precision checkpoint `src_dir` as an FP8 checkpoint in `out_dir` (see the module doc).

    `scheme` defaults to fp8_per_channel for compressed-tensors and fp8_per_block for fp8 (the only
    one that format stores). `out_dir` must not exist or be empty, unless `overwrite` (then its
    *.safetensors and index are replaced and other files it has are kept). `src_dir` is only read.
    `calibrate`: a UTF-8 text file; the FP8 Linears and fused MoE experts of the decoder layers are then rounded
    with GPTQ (fp8stream.calibrate) on its first `calib_tokens` tokens (windows of calibrate.CALIB_CONTEXT) instead
    of to the nearest fp8 value (an expert projection routed fewer tokens than its input width stays plain). The
    scales and every layout stay those of the plain export; only the fp8 values change. `calib_ids`
    (API only): token ids instead of a text (no tokenizer needed). Use a text other than the one you
    evaluate on.
    Returns a summary dict. Raises Fp8StreamError (one line) on bad input, before writing anything
    when the fault is visible in the headers; a NaN / Inf found while streaming removes what was written.
    """
    from .loader import DEFAULT_IGNORE, _load_config

    if format not in FORMATS:
        raise Fp8StreamError(f"unknown export format '{format}' (choose from {', '.join(FORMATS)})")
    scheme = scheme or default_scheme(format)
    if scheme not in SCHEMES:
        raise Fp8StreamError(f"unknown scheme '{scheme}' (choose from {', '.join(SCHEMES)})")
    if format == "fp8" and scheme != "fp8_per_block":
        raise Fp8StreamError(f"format 'fp8' stores 128x128 block scales (weight_scale_inv) only: use --scheme fp8_per_block, "
                             f"or --format compressed-tensors for {scheme}")
    if not staging_mib > 0:
        raise Fp8StreamError(f"--staging-mib must be positive, got {staging_mib}")
    src, out = Path(src_dir), Path(out_dir)
    config = _load_config(src)
    _check_out_dir(src, out, overwrite)
    doc = json.loads((src / "config.json").read_bytes().decode("utf-8"))
    if doc.get("quantization_config"):
        qm = doc["quantization_config"].get("quant_method", "?") if isinstance(doc["quantization_config"], dict) else "?"
        raise CheckpointError(f"{src / 'config.json'}: checkpoint is already quantized (quant_method '{qm}'); export needs a full-precision checkpoint")
    ids = None
    if calib_ids is not None:
        ids = torch.as_tensor(calib_ids, dtype=torch.long).reshape(-1)[:calib_tokens]
        if ids.numel() < 2:
            raise Fp8StreamError(f"calibration needs at least 2 token ids, got {ids.numel()}")
    elif calibrate is not None:
        from .calibrate_export import calibration_ids

        ids = calibration_ids(src, calibrate, calib_tokens)
    ckpt = Checkpoint(src)
    t0 = time.perf_counter()
    written: list[Path] = []
    created = not out.exists()
    try:
        ckpt.check_index()
        dtype = torch.bfloat16
        try:
            model = build_meta_model(config, dtype)
        except Fp8StreamError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{src / 'config.json'}: cannot build the {config.model_type} model it describes ({type(e).__name__}: {first})") from None
        plans = build_plan(model, ckpt)
        patterns = list(DEFAULT_IGNORE) + list(ignore)
        out_emb = model.get_output_embeddings()
        if out_emb is not None:
            out_name = next(n for n, m in model.named_modules() if m is out_emb)
            patterns.append(rf"^{re.escape(out_name)}$")
        try:
            fp8_modules, _ = replace_with_fp8(model, scheme, patterns, dtype)
        except Fp8StreamError:
            raise
        except Exception as e:
            raise Fp8StreamError(f"--ignore: {e}") from None
        conv1d = [n for n, m in model.named_modules() if getattr(m, "transposed_source", False)]
        if conv1d:  # engines read these [in, out] weights with their own transposes; no FP8 layout for them is agreed
            raise UnsupportedModelError(f"{src / 'config.json'}: export of Conv1D models ({config.model_type}: '{conv1d[0]}') is not supported; "
                                        "use `fp8stream load` instead")
        role, kept_modules = _plan_export(model, plans, ckpt, scheme)
        shards = _shard_entries(ckpt, role, scheme, "weight_scale_inv" if format == "fp8" else "weight_scale")

        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _clear_checkpoint_files(out)
        exporter = _Exporter(ckpt, scheme, int(staging_mib * 2**20))
        weight_map, total = {}, 0
        where: dict[str, tuple[Path, int, tuple]] = {}  # fp8 weight key -> (output file, byte offset, shape)
        scale_where: dict[str, tuple[Path, int, tuple]] = {}  # fp8 weight key -> where its scales are
        bar = progress_bar(total=sum(len(v) for v in shards.values()), desc="fp8stream export", unit="tensor", disable=not progress, leave=False)
        for file, entries in shards.items():
            path = out / file.name
            written.append(path)
            with open(path, "wb") as f:
                head = _header(entries)
                f.write(head)
                offset = len(head)
                for e in entries:
                    if e.role == "weight":
                        where[e.name] = (path, offset, e.shape)
                    elif e.role == "scale":
                        scale_where[e.key] = (path, offset, e.shape)
                    offset += e.nbytes
                pending: torch.Tensor | None = None
                for e in entries:
                    info = ckpt.tensors[e.key]
                    if e.role == "copy":
                        exporter.copy(f, info)
                    elif e.role == "weight":
                        pending = exporter.quantize(f, info)
                    else:
                        _write(f, pending.reshape(e.shape))
                        pending = None
                    weight_map[e.name] = file.name
                    total += e.nbytes
                    bar.update(1)
        bar.close()
        calibrated = None
        if ids is not None:
            calibrated = _calibrate(ckpt, config, scheme, set(fp8_modules), ids, _WrittenCodes(where, scale_where), dtype, progress)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items(), key=lambda kv: _natural(kv[0])))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append(out / "model.safetensors.index.json")
        doc["quantization_config"] = quantization_config(format, scheme, kept_modules)
        (out / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
        copied = _copy_side_files(src, out)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        ckpt.close()
    return {
        "out_dir": str(out), "format": format, "scheme": scheme, "quantized_tensors": exporter.n_quant,
        "kept_tensors": exporter.n_kept, "bytes_written": total, "shards": len(shards), "ignore": kept_modules,
        "copied_files": copied, "seconds": time.perf_counter() - t0,
        # calibration: calibrated_modules counts Linears and fused-experts modules (one each); gptq_expert_weights /
        # plain_expert_weights count expert projections (one expert's gate_up or down) GPTQ-rounded / left plain
        **({} if ids is None else {"calibration": {"text": None if calibrate is None else str(calibrate), "tokens": int(ids.numel()),
                                                   "calibrated_modules": len(calibrated.modules),
                                                   "gptq_expert_weights": calibrated.expert_weights,
                                                   "plain_expert_weights": calibrated.plain_expert_weights}}),
    }


class _WrittenCodes:
    """calibrate_export.CodeStore over the output shards just written: each fp8 weight's codes and scales, by source key."""

    def __init__(self, weights: dict[str, tuple[Path, int, tuple]], scales: dict[str, tuple[Path, int, tuple]]):
        self.weights, self.scales = weights, scales

    def scale(self, key: str) -> torch.Tensor:
        path, offset, shape = self.scales[key]
        return _read(path, offset, torch.float32, shape)

    def codes(self, key: str, row: int, rows: int) -> torch.Tensor:
        path, offset, (n, k) = self.weights[key]
        return _read(path, offset + row * k, torch.float8_e4m3fn, (rows, k))

    def write(self, key: str, row: int, codes: torch.Tensor) -> None:
        path, offset, (n, k) = self.weights[key]
        if codes.dtype != torch.float8_e4m3fn or codes.shape[-1] != k or not 0 <= row <= row + codes.shape[0] <= n:
            raise Fp8StreamError(f"calibration: codes {list(codes.shape)} ({codes.dtype}) do not fit rows {row}.. of '{key}' {[n, k]}")
        with open(path, "r+b") as f:
            f.seek(offset + row * k)
            _write(f, codes)


def _read(path: Path, offset: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(math.prod(shape) * dtype.itemsize)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _calibrate(ckpt: Checkpoint, config, scheme: str, fp8_modules: set[str], ids: torch.Tensor,
               store: _WrittenCodes, dtype: torch.dtype, progress: bool):
    """GPTQ rounding (calibrate_export.py) of the decoder Linears and experts, overwriting their plainly rounded fp8 bytes in place."""
    from .calibrate_export import calibrate_checkpoint

    context = min(int(ids.numel()), getattr(config, "max_position_embeddings", None) or int(ids.numel()), CALIB_CONTEXT)
    return calibrate_checkpoint(ckpt, config, scheme, fp8_modules, ids, context, store, dtype, progress)
