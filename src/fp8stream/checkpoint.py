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
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
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
            if info is None or info.file.name != name:
                raise CheckpointError(f"{self.path / name}: tensor '{key}' listed in the index is not in this shard")

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
            return sl[start:stop] if info.shape else sl[...]
        except Exception as e:
            raise CheckpointError(f"{info.file}: cannot read tensor '{key}' ({e})") from None

    def close(self) -> None:
        self._handles.clear()


def _read_header(file: Path) -> list[TensorInfo]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes, shorter than the 8-byte header length)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise CheckpointError(f"{file}: header length {hlen} is out of range for a file of {size} bytes")
        raw = f.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header is not a JSON object")
    data_size = size - 8 - hlen
    infos, spans = [], []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor '{key}' has a malformed header entry") from None
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
