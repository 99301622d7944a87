"""Checkpoint reading: validate a Hugging Face safetensors checkpoint and read row ranges of its tensors.

Headers are parsed and checked here (so every fault is reported as one line naming the file and the
tensor) before anything is read; tensor bytes are then read through safetensors' own `safe_open`
slices, which copy only the requested rows.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError

# safetensors dtype names -> torch dtypes; only floating dtypes can be weights.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
FLOAT_SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class Checkpoint:
    """A checkpoint directory: config.json plus model.safetensors or sharded model-*.safetensors with an index."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a checkpoint directory with config.json)")
        self.config_path = self.path / "config.json"
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.config_path}: missing (every checkpoint directory needs a config.json)")
        self.files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for info in _read_header(file):
                if info.key in self.tensors:
                    raise CheckpointError(f"{file}: tensor '{info.key}' also stored in {self.tensors[info.key].file.name}")
                self.tensors[info.key] = info
        self._handles: dict[Path, object] = {}

    def _shard_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError(f"'weight_map' is a {type(weight_map).__name__}, not an object")
                bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
                if bad is not None:
                    raise TypeError(f"tensor '{bad[0]}' maps to {bad[1]!r}, not a shard file name")
                names = sorted(set(weight_map.values()))
            except OSError as e:
                raise CheckpointError(f"{index}: cannot read ({e.strerror or e})") from None
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
            files = []
            for name in names:
                file = self.path / name
                if not file.is_file():
                    raise CheckpointError(f"{index}: names shard '{name}', which does not exist in {self.path}")
                files.append(file)
            self._index_map = weight_map
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            self._index_map = None
            return [single]
        raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    def check_index(self) -> None:
        """Keys the index promises must be in the shard it names."""
        if self._index_map is None:
            return
        for key, name in self._index_map.items():
            info = self.tensors.get(key)
            if info is None:
                raise CheckpointError(f"{self.path / name}: tensor '{key}' listed in the index is not in this shard")
            if info.file.name != name:
                raise CheckpointError(f"{self.path / name}: tensor '{key}' listed in the index is not in this shard (it is in {info.file.name})")

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (dim 0), as a fresh host tensor in the checkpoint's dtype."""
        info = self.tensors[key]
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = safe_open(str(info.file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types; keep the message, name the file
                raise CheckpointError(f"{info.file}: cannot open ({e})") from None
            self._handles[info.file] = handle
        try:
            sl = handle.get_slice(key)
            rows = sl[start:stop] if info.shape else sl[...]
        except Exception as e:
            raise CheckpointError(f"{info.file}: cannot read tensor '{key}' ({e})") from None
        # safetensors parsed the header itself; never hand on rows that disagree with the header we validated
        want = (min(stop, info.shape[0]) - min(start, info.shape[0]), *info.shape[1:]) if info.shape else ()
        if rows.dtype != info.dtype or tuple(rows.shape) != want:
            raise CheckpointError(f"{info.file}: tensor '{key}' read as {str(rows.dtype).removeprefix('torch.')}{list(rows.shape)}, header says {str(info.dtype).removeprefix('torch.')}{list(want)} (file changed while loading?)")
        return rows

    def close(self) -> None:
        self._handles.clear()


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(ValueError):
    pass


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_header(file: Path) -> list[TensorInfo]:
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated ({size} bytes, shorter than the 8-byte header length)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise CheckpointError(f"{file}: header length {hlen} is out of range for a file of {size} bytes")
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror or e})") from None
    if len(raw) != hlen:
        raise CheckpointError(f"{file}: truncated while reading its {hlen}-byte header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CheckpointError(f"{file}: header lists '{e.args[0]}' more than once") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header is not a JSON object")
    file_meta = header.get("__metadata__")
    if file_meta is not None and not (isinstance(file_meta, dict) and all(isinstance(v, str) for v in file_meta.values())):
        raise CheckpointError(f"{file}: header '__metadata__' is not a map of strings")
    data_size = size - 8 - hlen
    infos, spans = [], []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        # exact JSON types only (no 1.0 for 1, no "3" for 3): what we validate must be what safetensors reads
        ok = isinstance(meta, dict) and {"dtype", "shape", "data_offsets"} <= set(meta)
        dtype_name, shape, offsets = (meta["dtype"], meta["shape"], meta["data_offsets"]) if ok else (None, None, None)
        if not (ok and isinstance(dtype_name, str) and isinstance(shape, list) and all(_is_int(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointError(f"{file}: tensor '{key}' has a malformed header entry {json.dumps(meta)[:200]}")
        shape, (begin, end) = tuple(shape), offsets
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"{file}: tensor '{key}' has unknown dtype '{dtype_name}'")
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{file}: tensor '{key}' has a negative dimension {shape}")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if not 0 <= begin <= end or end > data_size:
            raise CheckpointError(
                f"{file}: tensor '{key}' data offsets [{begin}, {end}) out of range (data section is {data_size} bytes; truncated file?)"
            )
        if end - begin != nbytes:
            raise CheckpointError(f"{file}: tensor '{key}' occupies {end - begin} bytes but {dtype_name}{list(shape)} needs {nbytes}")
        spans.append((begin, end, key))
        infos.append(TensorInfo(key, file, dtype, shape, nbytes))
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{file}: tensors '{k0}' and '{k1}' overlap in the data section")
    covered = sum(e - b for b, e, _ in spans)
    if spans and (spans[-1][1] != data_size or covered != data_size):
        raise CheckpointError(f"{file}: data section is {data_size} bytes but tensors cover {covered} (truncated or padded file)")
    return infos
