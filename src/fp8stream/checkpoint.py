"""Checkpoint reading: validate a Hugging Face safetensors checkpoint and read row ranges of its tensors.

Headers are parsed and checked here (so every fault is reported as one line naming the file and the
tensor) before anything is read; tensor bytes are then read with positional reads of exactly the
byte ranges the header gives, straight into the caller's (pinned) staging buffer.
"""

from __future__ import annotations

import json
import queue
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

# safetensors dtype names -> torch dtypes; only floating dtypes can be weights.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
FLOAT_SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
# Raw page-cache reads scale to ~16 threads (peers.md), but during a load the readers share the GIL with
# the loader thread: 12 streamed Qwen1.5-MoE fastest on the H100 host (bench/trace_load.py: 1.2 s vs 1.4 s).
DEFAULT_READ_THREADS = min(12, os.cpu_count() or 4)
_PAGE = 4096  # page cache granularity
_MIN_READ_PART = 4 << 20  # smallest positional read worth a thread (H100 host, 16 threads: 2 MiB parts read the page cache at 22 GB/s, 8 MiB parts at 34 GB/s)


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute file offset of the tensor's first byte

    @property
    def row_bytes(self) -> int:
        """Bytes of one flat row (the last dim; one element of a 1-D tensor; all of a scalar).

        Flat rows of a contiguous tensor are contiguous in the file, so any range of them is one read.
        """
        if len(self.shape) >= 2:
            return self.shape[-1] * self.dtype.itemsize
        return self.dtype.itemsize if self.shape else self.nbytes

    @property
    def flat_shape(self) -> tuple[int, ...]:
        if len(self.shape) >= 2:
            return (self.nbytes // self.row_bytes if self.row_bytes else 0, self.shape[-1])
        return self.shape


class Checkpoint:
    """A checkpoint directory: config.json plus model.safetensors or sharded model-*.safetensors with an index."""

    def __init__(self, path: str | os.PathLike, read_threads: int = DEFAULT_READ_THREADS):
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
        self.read_threads = read_threads
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._pool: _ReaderPool | None = None
        self.bytes_read = 0  # tensor bytes read from the files so far

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

    def parts(self, reads: list[tuple], part_size: int) -> list[tuple]:
        """The positional reads that fill each `out` (a uint8 host tensor) with flat rows [start, stop) of
        `key`, as jobs (function, *args) for the reader pool.

        `reads` items are (key, start, stop, out) or (key, start, stop, out, (c0, c1)). A row range is one
        contiguous byte range of its file (the header gives the offsets), cut into parts of at most
        `part_size` bytes so that several threads share it. With a column range only those columns of
        each row are read (one positional read per row segment; a rank of a tensor-parallel load reads no
        byte of another rank's columns), packed row after row.
        """
        jobs, runs = [], []  # runs: (tensor infos, file offset, first `out`, bytes) of contiguous ranges
        for key, start, stop, out, *rest in reads:
            info = self.tensors[key]
            cols = rest[0] if rest else None
            if cols is not None:
                view = memoryview(out.numpy())
                seg = (cols[1] - cols[0]) * info.dtype.itemsize
                if out.numel() != (stop - start) * seg:
                    raise ValueError(f"buffer of {out.numel()} bytes for {(stop - start) * seg} bytes of '{key}'")
                first = info.offset + start * info.row_bytes + cols[0] * info.dtype.itemsize
                # Where the bytes skipped between two rows' segments are less than a page, the kernel
                # reads every page of the span anyway (page cache and disk work in pages): one read of
                # the span and a gather beats a system call per row (3M of them for a 2-way split of
                # Qwen1.5-MoE's experts). Wider gaps: one positional read per row segment.
                span = info.row_bytes - seg < _PAGE
                per_job = max(1, part_size // max(info.row_bytes if span else seg, 1))
                for r0 in range(0, stop - start, per_job):
                    r1 = min(r0 + per_job, stop - start)
                    jobs.append((self._pread_span if span else self._pread_rows, info, first + r0 * info.row_bytes,
                                 info.row_bytes, seg, view[r0 * seg : r1 * seg]))
                continue
            begin = info.offset + start * info.row_bytes
            nbytes = (stop - start) * info.row_bytes
            if out.numel() != nbytes:
                raise ValueError(f"buffer of {out.numel()} bytes for {nbytes} bytes of '{key}'")
            last = runs[-1] if runs else None
            if (last is not None and last[0][-1].file == info.file and last[1] + last[3] == begin
                    and last[2].untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
                    and last[2].data_ptr() + last[3] == out.data_ptr()):
                # the next bytes of the same file into the next bytes of the same buffer (e.g. an expert's
                # gate_proj then up_proj, fused into one gate_up parameter): one range, fewer reads
                runs[-1] = (last[0] + (info,), last[1], last[2], last[3] + nbytes)
            else:
                runs.append(((info,), begin, out, nbytes))
        pending, pending_bytes = [], 0  # consecutive small reads packed into one job, up to part_size
        for infos, begin, out, nbytes in runs:
            view = memoryview(out.as_strided((nbytes,), (1,)).numpy())  # the run's bytes of the buffer
            for part in range(0, nbytes, part_size):
                seg = (infos if len(infos) > 1 else infos[0], begin + part, view[part : part + part_size])
                if pending and pending_bytes + len(seg[2]) > part_size:
                    jobs.append(_job(self, pending))
                    pending, pending_bytes = [], 0
                pending.append(seg)
                pending_bytes += len(seg[2])
        if pending:
            jobs.append(_job(self, pending))
        return jobs

    def _pread_list(self, segments: list[tuple]) -> None:
        """Several positional reads (`_pread` arguments) as one job: every job costs the reader pool some
        Python under the GIL (queue, future, callbacks), which the loader thread then waits for."""
        for info, offset, view in segments:
            self._pread(info, offset, view)

    def submit(self, job: tuple, done: Callable[[BaseException | None], None]) -> None:
        """Run one job of `parts` on the reader pool; `done(error or None)` is called on the reader thread after it."""
        with self._lock:  # the prefetch thread and the loader may both read
            if self._pool is None:
                self._pool = _ReaderPool(self.read_threads)
        self._pool.put(job, done)

    def count_read(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes

    def read_into(self, reads: list[tuple]) -> None:
        """Fill each `out` with its rows now (see `parts`), the parts spread over the reader pool.

        Positional reads: the page cache is read by several cores and nothing is memory-mapped, so no
        file pages pile up in RSS.
        """
        total = sum(r[3].numel() for r in reads)
        # parts small enough to keep every reader thread busy, large enough that the per-part Python
        # overhead (which holds the GIL) stays small next to the copy itself
        jobs = self.parts(reads, max(_MIN_READ_PART, -(-total // (2 * self.read_threads))))
        self.count_read(total)
        if len(jobs) == 1:
            jobs[0][0](*jobs[0][1:])
            return
        left, errors, all_done = [len(jobs)], [], threading.Event()

        def done(error: BaseException | None) -> None:
            with self._lock:
                if error is not None:
                    errors.append(error)
                left[0] -= 1
                if left[0] == 0:
                    all_done.set()

        for job in jobs:
            self.submit(job, done)
        all_done.wait()
        if errors:
            raise errors[0]

    def _pread_span(self, info: TensorInfo, offset: int, stride: int, seg: int, view: memoryview) -> None:
        rows = len(view) // seg if seg else 0
        if rows == 0:
            return
        buf = np.empty((rows - 1) * stride + seg, dtype=np.uint8)
        self._pread(info, offset, memoryview(buf))
        src = np.lib.stride_tricks.as_strided(buf, shape=(rows, seg), strides=(stride, 1))
        np.copyto(np.ndarray((rows, seg), dtype=np.uint8, buffer=view), src)

    def _pread_rows(self, info: TensorInfo, offset: int, stride: int, seg: int, view: memoryview) -> None:
        for i in range(len(view) // seg if seg else 0):
            self._pread(info, offset + i * stride, view[i * seg : (i + 1) * seg])

    def _fd(self, info: TensorInfo) -> int:
        fd = self._fds.get(info.file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(info.file)
                if fd is None:
                    try:
                        fd = os.open(info.file, os.O_RDONLY)
                    except OSError as e:
                        raise CheckpointError(f"{info.file}: cannot open ({e.strerror or e})") from None
                    self._fds[info.file] = fd
        return fd

    def advise(self, reads) -> None:
        """Ask the kernel to start reading these (key, first row, end row) ranges into the page cache now
        (POSIX_FADV_WILLNEED): from a cold disk, the reads ahead of the pool then find their pages
        resident or in flight instead of each waiting for the device in turn."""
        if not hasattr(os, "posix_fadvise"):
            return
        for key, start, stop in reads:
            info = self.tensors[key]
            try:
                os.posix_fadvise(self._fd(info), info.offset + start * info.row_bytes, (stop - start) * info.row_bytes,
                                 os.POSIX_FADV_WILLNEED)
            except OSError:
                return  # advice only

    def _pread(self, info: TensorInfo | tuple[TensorInfo, ...], offset: int, view: memoryview) -> None:
        """Fill `view` from file offset `offset`; `info` is the tensor read, or the tensors of a range of
        several adjacent ones (the error then names the one the failing byte belongs to)."""
        first = info[0] if isinstance(info, tuple) else info
        fd = self._fd(first)
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise CheckpointError(f"{first.file}: cannot read tensor '{_key_at(info, offset + done)}' ({e.strerror or e})") from None
            if n == 0:
                raise CheckpointError(f"{first.file}: ends inside tensor '{_key_at(info, offset + done)}' (file truncated while loading?)")
            done += n

    def read_rows(self, key: str, start: int, stop: int, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Flat rows [start, stop) of a tensor ([rows, last dim]; elements of a 1-D tensor), as a fresh host
        tensor; with `cols`, only columns [c0, c1) of each row."""
        info = self.tensors[key]
        rows = (stop - start) if info.shape else 1
        if cols is not None and len(info.shape) >= 2:
            out = torch.empty(rows * (cols[1] - cols[0]) * info.dtype.itemsize, dtype=torch.uint8)
            self.read_into([(key, start, stop, out, cols)])
            return out.view(info.dtype).reshape(rows, cols[1] - cols[0])
        out = torch.empty(rows * info.row_bytes, dtype=torch.uint8)
        self.read_into([(key, start, stop if info.shape else 1, out)])
        return out.view(info.dtype).reshape((rows, *info.flat_shape[1:]) if info.shape else ())

    def cancel_pending(self) -> None:
        """Drop the reads queued and not yet started (their done() gets ReadCancelled): after an error or
        Ctrl-C nobody waits for them, and close() then returns as soon as the reads in progress end."""
        if self._pool is not None:
            self._pool.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.cancel()
            self._pool.shutdown()
            self._pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ReadCancelled(Exception):
    """A queued read dropped by Checkpoint.cancel_pending (never surfaces: nobody waits for it any more)."""


class _ReaderPool:
    """`threads` reader threads running (function, *args) jobs from one queue, each followed by its done(error)
    callback. Lighter than a ThreadPoolExecutor (no Future per job): each job's Python runs under the GIL,
    which the loader thread then waits for, and a load runs a few thousand jobs."""

    def __init__(self, threads: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"fp8stream-read_{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def put(self, job: tuple, done: Callable[[BaseException | None], None]) -> None:
        self._jobs.put((job, done))

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            (fn, *args), done = item
            try:
                fn(*args)
            except BaseException as e:  # handed to done(): the caller raises it on its own thread
                done(e)
            else:
                done(None)

    def cancel(self) -> None:
        """Take every queued job off the queue unrun, telling its done() so."""
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if item is None:  # a shutdown sentinel (not ours to drop)
                self._jobs.put(None)
                return
            item[1](ReadCancelled("read cancelled"))

    def shutdown(self) -> None:
        """Finish the queued jobs, then stop every thread."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()


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
        infos.append(TensorInfo(key, file, dtype, shape, nbytes, 8 + hlen + begin))
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{file}: tensors '{k0}' and '{k1}' overlap in the data section")
    covered = sum(e - b for b, e, _ in spans)
    if spans and (spans[-1][1] != data_size or covered != data_size):
        raise CheckpointError(f"{file}: data section is {data_size} bytes but tensors cover {covered} (truncated or padded file)")
    return infos


def _key_at(info: TensorInfo | tuple[TensorInfo, ...], pos: int) -> str:
    """The key of the tensor (of a range of adjacent ones) holding file byte `pos`."""
    infos = info if isinstance(info, tuple) else (info,)
    return next((i.key for i in infos if i.offset <= pos < i.offset + i.nbytes), infos[-1].key)


def _job(ckpt: Checkpoint, segments: list[tuple]) -> tuple:
    return (ckpt._pread, *segments[0]) if len(segments) == 1 else (ckpt._pread_list, segments)
