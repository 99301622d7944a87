"""The streaming load: checkpoint rows -> staging -> quantize -> final FP8 storage, one bounded chunk at a time.

Every parameter's final storage is allocated once, at its final size, on the target device, right
before it is filled; a quantized parameter's full-precision rows only ever exist on the device as one
staging chunk (<= the staging budget, temporaries included). Hence
    peak device memory <= final footprint + staging budget,
whatever the model size or the largest tensor.
"""

from __future__ import annotations

import bisect
import functools
import gc
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import DEFAULT_READ_THREADS, Checkpoint
from .errors import CheckpointError, Fp8StreamError, UnsupportedModelError
from .load_plan import TargetPlan, build_meta_model, build_plan, prequantized_scheme, scale_pieces
from .memory import MemoryLedger, Sampler
from .parallel import current_group, install_hooks, local_plan, plan_layout, shard_meta
from .pipeline import Prefetcher, Request, read_now, row_bytes
from .modules import (SENSITIVE_RULE, FP8Experts, FP8Linear, fuse_gate_up, gate_up_storage, gated_mlps, halves,
                      replace_with_fp8, sensitive_modules)
from .quantize import BLOCK, FP8_DTYPE, SCHEMES, quantize_blocks, quantize_rows_into, scale_from_amax, tensor_amax
from .report import LoadReport, progress_bar

log = logging.getLogger("fp8stream")

# Kept in full precision unless the user asks otherwise: MoE routers and shared-expert gates (tiny,
# and routing decisions are sensitive); the output embedding is added by name at load time.
DEFAULT_IGNORE = (r"(^|\.)gate$", r"(^|\.)shared_expert_gate$")
# Bytes per staged element besides the source chunk itself, per device type, measured with
# bench/stage_bytes.py (CUDA allocator peaks on an H100) and RSS peaks on the CPU:
# - rows: quantizing rows with their own amax. CUDA: nothing the size of the chunk (quantize_rows_into
#   casts as it stores); 1 stays budgeted for the fp8 result where it is a temporary (export). CPU: a float32
#   copy + that byte.
# - scaled_rows: rows with given scales (per-tensor, or rows split over ranks by columns): a float32 copy,
#   clamped in place, + 1.
# - blocks: 128x128 blocks: float32 copy + per-element float32 scale + fp8 result.
# - kept: the copy into the final tensor, then an inf-norm (NaN / Inf propagate through it): no temporary;
#   1 budgeted on CUDA. CPU: 5, to keep the chunks as small as before: glibc holds on to freed read buffers of
#   a few MiB in its heaps, and with chunks twice as large RssAnon exceeded the ledger by 107 MiB instead of
#   17-40 (tests/test_load.py::test_host_rss_cross_checks_cpu_ledger).
_STAGE_BYTES_PER_ELEM = {
    "cuda": {"rows": 1, "scaled_rows": 4 + 1, "blocks": 4 + 4 + 1, "kept": 1},
    "cpu": {"rows": 4 + 1, "scaled_rows": 4 + 1, "blocks": 4 + 4 + 1, "kept": 2 + 3},
}
# Budgeted on top: 2 bytes per element for the allocator's 2 MiB rounding of the final tensors, which
# torch.cuda.max_memory_allocated counts and the report's tensor bytes do not (27 MiB on Qwen1.5-MoE).
_ROUNDING_MARGIN = 2


def _stage_extra(kind: str, src_itemsize: int, device: torch.device) -> int:
    """Budgeted device bytes per staged element besides the source chunk. On CUDA the next chunk's
    source is copied in (on the copy stream) while this one is quantized: one more source chunk."""
    cuda = device.type == "cuda"
    return _STAGE_BYTES_PER_ELEM["cuda" if cuda else "cpu"][kind] + _ROUNDING_MARGIN + (src_itemsize if cuda else 0)


@dataclass
class _Target:
    name: str
    module: nn.Module
    attr: str
    scale_attr: str | None  # set when the parameter is stored in fp8
    plan: TargetPlan | None
    group: object = None  # tensor/expert parallel: the process group whose ranks hold the other parts


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise Fp8StreamError(f"unknown device '{device}' (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Fp8StreamError(f"device '{device}' requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise Fp8StreamError(f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise Fp8StreamError(f"unsupported device '{device}' (use cpu, cuda or cuda:N)")
    return dev


def _load_config(path: Path):
    from transformers import AutoConfig

    cfg = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory" if path.exists() else f"{path}: no such file or directory")
    if not cfg.is_file():
        raise CheckpointError(f"{cfg}: missing (every checkpoint directory needs a config.json)")
    try:  # our own parse first: transformers' message for bad JSON does not say where
        doc = json.loads(cfg.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{cfg}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{cfg}: not a JSON object")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError with multi-line text
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        n = next((i for i, ln in enumerate(lines) if not ln.endswith(":")), len(lines) - 1)
        raise CheckpointError(f"{cfg}: {' '.join(lines[: n + 1])}") from None  # "field 'x':" needs its next line


def _targets(model: nn.Module, plans: dict[str, TargetPlan] | None) -> list[_Target]:
    out, seen = [], set()
    for mod_name, module in model.named_modules():
        for attr, p in list(module._parameters.items()):
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{attr}" if mod_name else attr
            if isinstance(module, FP8Linear) and attr == "weight":
                scale = "weight_scale"
            elif isinstance(module, FP8Experts) and attr in ("gate_up_proj", "down_proj"):
                scale = f"{attr}_scale"
            elif isinstance(module, (FP8Linear, FP8Experts)) and attr.endswith("_scale"):
                continue  # filled together with its weight
            else:
                scale = None
            out.append(_Target(name, module, attr, scale, plans.get(name) if plans is not None else None))
    return out


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _rows_per_chunk(width: int, src_itemsize: int, staging: int, align: int, name: str, extra: int) -> int:
    per_row = width * (src_itemsize + extra)
    rows = staging // max(per_row, 1)
    rows = rows // align * align
    if rows < 1:
        need = per_row * align
        raise Fp8StreamError(f"staging budget {staging / 2**20:.1f} MiB is too small for '{name}' (one chunk of {align} row(s) needs {need / 2**20:.1f} MiB); raise --staging-mib")
    return rows


def _chunks(flat_rows: int, rows_per_slice: int, step: int, per_slice: bool):
    """Flat row ranges [d0, d1); with per_slice, chunks never cross a lead (expert) boundary."""
    if not per_slice:
        for d0 in range(0, flat_rows, step):
            yield d0, min(d0 + step, flat_rows)
        return
    for base in range(0, flat_rows, rows_per_slice):
        for r0 in range(0, rows_per_slice, step):
            yield base + r0, base + min(r0 + step, rows_per_slice)


class _Source:
    """Destination rows of a parameter on the device: checkpoint rows gathered through the plan's
    pieces (random rows for dummy loads).

    On CUDA the loader first declares its whole schedule of chunk reads (`start`); a Prefetcher then
    reads ahead into a bounded pool of pinned buffers, and `rows` takes them in order, so reads, copies
    and quantization overlap. A request off the schedule (re-reads on an error path) and everything on
    the CPU is read synchronously into a fresh buffer, which is then the staging itself.
    """

    PREFETCH_DEVICES = ("cuda",)  # tests add "cpu" to run the read-ahead pipeline (unpinned) without a GPU

    def __init__(self, ckpt: Checkpoint | None, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 prefetch_buffers: int = 8):
        self.ckpt, self.dtype, self.device = ckpt, dtype, device
        self.gen = torch.Generator(device=device).manual_seed(seed) if ckpt is None else None
        self.prefetch_buffers = prefetch_buffers
        self._prefetcher: Prefetcher | None = None
        self._schedule: list[Request] = []
        self._keys: list[tuple] = []  # (parameter name, d0, d1) of each scheduled row chunk (None: amax reads)
        self._pos = 0
        self._copy_stream = self._compute_stream = None
        self._consumed: list = []  # compute-stream events, one per chunk handed out (CUDA)
        self.loaded_bytes = 0  # bytes of checkpoint data handed to the device so far (for the timeline)
        self._sorted: dict[int, tuple] = {}  # id(plan) -> (plan, pieces by destination row, their first rows)

    def itemsize(self, plan: TargetPlan | None) -> int:
        if plan is None:
            return self.dtype.itemsize
        return max(self.ckpt.tensors[k].dtype.itemsize for k in plan.sources)

    def request(self, plan: TargetPlan, d0: int, d1: int, name: str) -> Request | None:
        """The reads behind destination rows [d0, d1), in destination order (the buffer's row order); None when
        the sources differ in dtype (rare)."""
        pieces, starts = self._pieces_of(plan)
        reads = []
        for p in pieces[max(bisect.bisect_right(starts, d0) - 1, 0) :]:  # a chunk spans few of an expert param's 120
            if p.dst_row >= d1:
                break
            lo, hi = max(d0, p.dst_row), min(d1, p.dst_row + p.rows)
            if lo < hi:
                reads.append((p.key, p.src_row + lo - p.dst_row, p.src_row + hi - p.dst_row))
        if sum(b - a for _, a, b in reads) != d1 - d0:
            raise CheckpointError(f"{self.ckpt.path}: checkpoint rows for '{name}' do not cover rows [{d0}, {d1})")
        return self._request(tuple(reads), plan.cols)

    def _pieces_of(self, plan: TargetPlan) -> tuple[list, list[int]]:
        """The plan's pieces sorted by destination row, and their first rows (cached per plan)."""
        cached = self._sorted.get(id(plan))
        if cached is None or cached[0] is not plan:
            pieces = sorted(plan.pieces, key=lambda p: p.dst_row)
            cached = self._sorted[id(plan)] = (plan, pieces, [p.dst_row for p in pieces])
        return cached[1], cached[2]

    def _request(self, reads, cols: tuple[int, int] | None = None) -> Request | None:
        infos = [self.ckpt.tensors[k] for k, _, _ in reads]
        if len({i.dtype for i in infos}) != 1:
            return None
        cols = cols if cols is not None and len(infos[0].shape) >= 2 else None
        return Request(reads, infos[0].dtype, sum((b - a) * row_bytes(i, cols) for (_, a, b), i in zip(reads, infos)), cols)

    def start(self, schedule: list[tuple[tuple | None, Request | None]]) -> None:
        """Declare every read the load will make, in order, with the (name, d0, d1) of each row chunk, and
        start reading ahead (CUDA only)."""
        schedule = [(k, r) for k, r in schedule if r is not None]
        self._schedule = [r for _, r in schedule]
        self._keys = [k for k, _ in schedule]
        if self.ckpt is not None and self.device.type in self.PREFETCH_DEVICES and self._schedule:
            self._prefetcher = Prefetcher(self.ckpt, self._schedule, self.prefetch_buffers, pinned=self.device.type == "cuda",
                                          device=self.device)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    @property
    def pinned_bytes(self) -> int:
        return self._prefetcher.pinned_bytes if self._prefetcher is not None else 0

    def key_rows(self, key: str, start: int, stop: int, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Flat rows [start, stop) of one checkpoint tensor (columns [c0, c1) only, if given), on the device."""
        return self._fetch(self._request(((key, start, stop),), cols))

    def rows(self, plan: TargetPlan | None, d0: int, d1: int, width: int | None, name: str) -> torch.Tensor:
        """Destination rows [d0, d1) on the device, in the checkpoint's dtype."""
        if plan is None:  # dummy: random rows generated straight on the device
            shape = (d1 - d0, width) if width else (d1 - d0,)
            return torch.randn(shape, generator=self.gen, device=self.device, dtype=self.dtype).mul_(0.02)
        if self._pos < len(self._keys) and self._keys[self._pos] == (name, d0, d1):
            return self._fetch(self._schedule[self._pos])  # the next scheduled chunk: its request is known
        req = self.request(plan, d0, d1, name)
        if req is None:  # sources of one parameter in different dtypes: convert each on the host
            reads = [(p.key, p.src_row + max(d0, p.dst_row) - p.dst_row, p.src_row + min(d1, p.dst_row + p.rows) - p.dst_row)
                     for p in plan.pieces if max(d0, p.dst_row) < min(d1, p.dst_row + p.rows)]
            return torch.cat([self.ckpt.read_rows(k, a, b, plan.cols).to(self.dtype) for k, a, b in reads]).to(self.device)
        return self._fetch(req)

    def _fetch(self, req: Request) -> torch.Tensor:
        self.loaded_bytes += req.nbytes
        nxt = self._schedule[self._pos] if self._pos < len(self._schedule) else None
        on_schedule = nxt is not None and (nxt is req or nxt == req)
        if on_schedule:
            self._pos += 1
        if self._prefetcher is None or not on_schedule:
            return read_now(self.ckpt, req).to(self.device)  # a no-op on the CPU
        host, slot = self._prefetcher.take(self._pos - 1)
        if self.device.type == "cuda":
            x, event = self._copy_in(host)
        else:  # the buffer goes back to the pool at once: copy out of it
            x, event = host.clone(), None
        self._prefetcher.release(slot, event)
        return x

    def _copy_in(self, host: torch.Tensor):
        """Host chunk -> device on the copy stream, so it overlaps the quantization of the chunk before.

        At most two source chunks live on the device (the staging budget counts both): before a new one
        is allocated, the loader thread waits until the device has finished the chunk before the last
        one, whose memory the allocator can then hand out again (it was freed, with record_stream, on
        the compute stream)."""
        if self._copy_stream is None:  # the load runs on the caller's current stream: looked up once
            self._compute_stream = torch.cuda.current_stream(self.device)
            self._copy_stream = torch.cuda.Stream(self.device)
        compute, copy = self._compute_stream, self._copy_stream
        # Few torch calls here: each one releases the GIL, and getting it back means waiting for the
        # reader threads' Python (set_stream twice instead of a `torch.cuda.stream` context).
        self._consumed.append(compute.record_event())  # everything issued so far: the previous chunk's quantization
        if len(self._consumed) >= 2:  # [after chunk i-2's quantization, after chunk i-1's]: wait for the first
            self._consumed.pop(0).synchronize()
        torch.cuda.set_stream(copy)
        try:
            x = host.to(self.device, non_blocking=True)
            copied = copy.record_event()  # also: the pinned buffer may be refilled
        finally:
            torch.cuda.set_stream(compute)
        compute.wait_event(copied)
        x.record_stream(compute)
        return x, copied


def _first_bad(plan: TargetPlan | None, bad_rows: torch.Tensor, ckpt: Checkpoint | None, name: str) -> str:
    row = int(bad_rows.nonzero()[0, 0]) if bad_rows.any() else 0
    if plan is not None:
        for p in plan.pieces:
            if p.dst_row <= row < p.dst_row + p.rows:
                return f"{ckpt.tensors[p.key].file}: tensor '{p.key}' contains NaN or Inf (row {p.src_row + row - p.dst_row})"
    return f"'{name}' contains NaN or Inf"


@dataclass
class _Chunks:
    """How one parameter is streamed: the row step, the per-tensor amax pass reads, the row chunks."""

    step: int
    amax_reads: list[tuple[str, int, int]]
    rows: list[tuple[int, int]]
    kind: str = "rows"  # staging kind (_STAGE_BYTES_PER_ELEM)


def _stage_kind(scheme: str, cols_split: bool = False) -> str:
    """The staging kind (_STAGE_BYTES_PER_ELEM) of quantizing one chunk under `scheme`; rows split by columns
    over ranks get their scales from the whole row's amax (given scales)."""
    if scheme == "fp8_per_block":
        return "blocks"
    return "scaled_rows" if scheme == "fp8_per_tensor" or cols_split else "rows"


def _quantized_chunks(t: _Target, src: _Source, scheme: str, staging: int) -> _Chunks:
    shape = tuple(t.module._parameters[t.attr].shape)
    n, k = shape[-2], shape[-1]
    block = scheme == "fp8_per_block"
    kind = _stage_kind(scheme, t.plan is not None and t.plan.cols is not None)
    step = _rows_per_chunk(k, src.itemsize(t.plan), staging, BLOCK if block and n >= BLOCK else 1, t.name,
                           _stage_extra(kind, src.itemsize(t.plan), src.device))
    if block:
        step = min(step, math.ceil(n / BLOCK) * BLOCK)
    amax_reads = []
    if scheme == "fp8_per_tensor" and t.plan is not None and t.plan.sharded:  # this rank's rows of each source
        for p in t.plan.pieces:
            amax_reads += [(p.key, r0, min(r0 + step, p.src_row + p.rows)) for r0 in range(p.src_row, p.src_row + p.rows, step)]
    elif scheme == "fp8_per_tensor" and t.plan is not None:
        for key in t.plan.sources:
            info = src.ckpt.tensors[key]
            rows = info.flat_shape[0] if info.shape else 1
            amax_reads += [(key, r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]
    return _Chunks(step, amax_reads, list(_chunks(math.prod(shape[:-1]), n, step, per_slice=block)), kind)


def _kept_chunks(t: _Target, src: _Source, staging: int) -> _Chunks:
    shape = tuple(t.module._parameters[t.attr].shape)
    width = shape[-1] if len(shape) >= 2 else None
    flat = math.prod(shape[:-1]) if width else (shape[0] if shape else 1)
    step = _rows_per_chunk(width or 1, src.itemsize(t.plan), staging, 1, t.name, _stage_extra("kept", src.itemsize(t.plan), src.device))
    return _Chunks(step, [], list(_chunks(flat, flat, step, per_slice=False)), "kept")


def _schedule(src: _Source, work: list[tuple[_Target, _Chunks]]) -> list[tuple[tuple | None, Request | None]]:
    """Every read the load will make, in the order it makes them (the prefetcher reads ahead along it),
    each with the (parameter name, d0, d1) of its row chunk (None for the per-tensor amax reads), so that
    the loader takes its requests from here instead of building them twice (0.2 s per load in Python)."""
    out = []
    for t, c in work:
        if t.plan is None or t.plan.zeros:
            continue
        out += [(None, src._request((r,), t.plan.cols)) for r in c.amax_reads]
        out += [((t.name, d0, d1), src.request(t.plan, d0, d1, t.name)) for d0, d1 in c.rows]
    return out


class _GateUpStorage:
    """The gate and up weights of each gated MLP (modules.gated_mlps) go into the two halves of one storage,
    allocated when the first of them is loaded (no copy, no extra bytes); after the load, fuse() makes each MLP
    run them as one GEMM."""

    def __init__(self, mlps: list[nn.Module]):
        self._half_of = {id(m.gate_proj): (m, 0) for m in mlps} | {id(m.up_proj): (m, 1) for m in mlps}
        self._whole: dict[int, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}

    def take(self, module: nn.Module, ledger: MemoryLedger, device: torch.device):
        hit = self._half_of.get(id(module))
        if hit is None:
            return None
        mlp, i = hit
        if id(mlp) not in self._whole:
            w, s = gate_up_storage(mlp, device)
            ledger.add_final(w.nbytes + s.nbytes)
            self._whole[id(mlp)] = (mlp, w, s)
        _, w, s = self._whole[id(mlp)]
        return halves(w)[i], halves(s)[i]

    def fuse(self) -> int:
        return sum(fuse_gate_up(mlp, w, s) for mlp, w, s in self._whole.values())


def _alloc_fp8(t: _Target, ledger: MemoryLedger, device: torch.device, gate_up: _GateUpStorage | None = None):
    """The final storage of an FP8 parameter and its scales, allocated once at full size (a gated MLP's gate and
    up: the halves of one storage, see _GateUpStorage)."""
    shape = tuple(t.module._parameters[t.attr].shape)
    ws = gate_up.take(t.module, ledger, device) if gate_up is not None else None
    if ws is not None:
        w, s = ws
    else:
        w = torch.empty(shape, dtype=FP8_DTYPE, device=device)
        s = torch.empty(tuple(t.module._parameters[t.scale_attr].shape), dtype=torch.float32, device=device)
        ledger.add_final(w.nbytes + s.nbytes)
    return w, s, shape[-2], shape[-1], math.prod(shape[:-1])


def _load_quantized(t: _Target, c: _Chunks, src: _Source, ledger: MemoryLedger, scheme: str, device: torch.device,
                    gate_up: _GateUpStorage | None = None):
    w, s, n, k, flat = _alloc_fp8(t, ledger, device, gate_up)
    w_flat = w.view(flat, k)
    itemsize = src.itemsize(t.plan)
    block = scheme == "fp8_per_block"

    shard_scales = None
    if scheme == "fp8_per_tensor":
        shard_scales = _shard_scales(t, c, src, ledger, device)

    for d0, d1 in c.rows:
        staged = (d1 - d0) * k * (itemsize + _stage_extra(c.kind, itemsize, device))
        ledger.stage(staged)
        x = src.rows(t.plan, d0, d1, k, t.name)
        if block:
            q, bs = quantize_blocks(x)
            lead, r0 = divmod(d0, n)
            s.view(-1, *s.shape[-2:])[lead, r0 // BLOCK : r0 // BLOCK + bs.shape[0]] = bs
            w_flat[d0:d1] = q
            del q
        else:
            row_scale = _row_scales(t.plan, shard_scales, d0, d1, device) if shard_scales is not None else None
            if row_scale is None and t.plan is not None and t.plan.cols is not None:
                # columns split over ranks: a row's scale is the amax over the whole row, as on one device
                row_scale = scale_from_amax(_all_max(x.abs().amax(dim=-1).float(), t.group))
            quantize_rows_into(x, w_flat[d0:d1], s.view(-1)[d0:d1], row_scale)
        del x
        ledger.unstage(staged)
    t.module._parameters[t.attr] = nn.Parameter(w, requires_grad=False)
    t.module._parameters[t.scale_attr] = nn.Parameter(s, requires_grad=False)
    # NaN / Inf in a weight makes its scale non-finite: a device flag, read once at the end of the load
    # (reading it here would stall the pipeline once per parameter); the load fails before it returns.
    return torch.isfinite(s).all(), lambda: _raise_non_finite(t, src, s, block, flat, n, k)


def _raise_non_finite(t: _Target, src: _Source, s: torch.Tensor, block: bool, flat: int, n: int, k: int) -> None:
    if not block:
        raise CheckpointError(_first_bad(t.plan, ~torch.isfinite(s.view(-1)).cpu(), src.ckpt, t.name))
    # a block's 128 rows may come from several checkpoint tensors: re-read them to find the row itself
    bad_block = ~torch.isfinite(s.view(-1, *s.shape[-2:])).all(dim=-1)  # [lead, block rows]
    lead, br = (int(i) for i in bad_block.nonzero()[0])
    d0 = lead * n + br * BLOCK
    d1 = min(d0 + BLOCK, (lead + 1) * n)
    bad = torch.ones(d1 - d0, dtype=torch.bool)
    if src.ckpt is not None:
        rows = src.rows(t.plan, d0, d1, k, t.name)
        exact = ~torch.isfinite(rows.reshape(rows.shape[0], -1)).all(dim=1).cpu()
        bad = exact if exact.any() else bad
    raise CheckpointError(_first_bad(t.plan, _shift(bad, d0, flat), src.ckpt, t.name))


def _shift(bad: torch.Tensor, d0: int, flat: int) -> torch.Tensor:
    full = torch.zeros(flat, dtype=torch.bool)
    full[d0 : d0 + bad.numel()] = bad.cpu()
    return full


def _shard_scales(t: _Target, c: _Chunks, src: _Source, ledger: MemoryLedger, device) -> torch.Tensor:
    """fp8_per_tensor: first pass, one amax per checkpoint tensor (shard) feeding this parameter."""
    if t.plan is None:  # dummy: one shard, scale from the distribution's bound
        return torch.full((1,), 0.02 * 6 / 448, device=device)
    amax = torch.zeros(len(t.plan.sources), device=device)
    shard = {key: i for i, key in enumerate(t.plan.sources)}
    k = t.plan.shape[-1]
    for key, r0, r1 in c.amax_reads:
        # the source chunk, abs() of it and (CUDA) the next chunk in flight, all in the source dtype
        staged = (r1 - r0) * k * src.ckpt.tensors[key].dtype.itemsize * (3 if device.type == "cuda" else 2)
        ledger.stage(staged)
        i = shard[key]
        amax[i] = torch.maximum(amax[i], tensor_amax(src.key_rows(key, r0, r1, t.plan.cols)))
        ledger.unstage(staged)
    if t.plan.sharded:  # each rank saw its part of every source: the max over ranks is the whole tensor's
        amax = _all_max(amax, t.group)
    bad = ~torch.isfinite(amax)
    if bad.any():
        key = t.plan.sources[int(bad.nonzero()[0])]
        raise CheckpointError(f"{src.ckpt.tensors[key].file}: tensor '{key}' contains NaN or Inf")
    return scale_from_amax(amax)


def _all_max(x: torch.Tensor, group) -> torch.Tensor:
    """Elementwise max over the ranks of `group` (NaN becomes +Inf first, so every rank sees a bad value)."""
    import torch.distributed as dist

    x = torch.nan_to_num(x, nan=float("inf"))
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def _row_scales(plan: TargetPlan | None, shard_scales: torch.Tensor, d0: int, d1: int, device) -> torch.Tensor:
    out = torch.empty(d1 - d0, device=device)
    if plan is None:
        return out.fill_(float(shard_scales[0]))
    for p in plan.pieces:
        lo, hi = max(d0, p.dst_row), min(d1, p.dst_row + p.rows)
        if lo < hi:
            out[lo - d0 : hi - d0] = shard_scales[p.shard]
    return out


def _load_kept(t: _Target, c: _Chunks, src: _Source, ledger: MemoryLedger, dtype: torch.dtype, device: torch.device):
    p = t.module._parameters[t.attr]
    shape = tuple(p.shape)
    out_dtype = dtype if p.dtype.is_floating_point else p.dtype
    dst = torch.empty(shape, dtype=out_dtype, device=device)
    ledger.add_final(dst.nbytes)
    if t.plan is not None and t.plan.zeros:  # a rowwise bias on ranks other than 0 (added once, by rank 0)
        dst.zero_()
    elif src.ckpt is None:  # dummy: norms start at 1, biases at 0, the rest small random
        leaf = t.attr
        if dst.dim() == 1 and leaf == "weight":
            dst.fill_(1.0)
        elif leaf == "bias":
            dst.zero_()
        else:
            dst.normal_(0.0, 0.02, generator=src.gen)
    else:
        width = shape[-1] if len(shape) >= 2 else None
        flat = math.prod(shape[:-1]) if width else (shape[0] if shape else 1)
        dst_flat = dst.view(flat, width) if width else dst.view(-1)
        itemsize = src.itemsize(t.plan)
        step = c.step
        # NaN/Inf in the checkpoint, or values that overflow the model dtype: each chunk's inf-norm (NaN and Inf
        # propagate through it), into a device vector checked once per load: no sync per chunk, no temporaries.
        norms = torch.zeros(len(c.rows), dtype=dst.dtype, device=device) if dst.is_floating_point() else None
        for i, (d0, d1) in enumerate(c.rows):
            staged = (d1 - d0) * (width or 1) * (itemsize + _stage_extra("kept", itemsize, device))
            ledger.stage(staged)
            x = src.rows(t.plan, d0, d1, width, t.name)
            out = dst_flat[d0:d1]
            out.copy_(x.reshape(out.shape))  # dtype conversion on the device, in place
            if norms is not None:
                torch.linalg.vector_norm(out, float("inf"), out=norms[i])  # in the model dtype: max is exact
            del x, out
            ledger.unstage(staged)
        finite = torch.isfinite(norms).all() if norms is not None else torch.ones((), dtype=torch.bool, device=device)
        t.module._parameters[t.attr] = nn.Parameter(dst, requires_grad=False)
        return finite, lambda: _raise_kept_non_finite(t, src, dst_flat, flat, width, step, out_dtype)
    t.module._parameters[t.attr] = nn.Parameter(dst, requires_grad=False)
    return None


def _raise_kept_non_finite(t: _Target, src: _Source, dst_flat, flat: int, width, step: int, out_dtype) -> None:
    for d0, d1 in _chunks(flat, flat, step, per_slice=False):
        chunk = dst_flat[d0:d1]
        bad = ~torch.isfinite(chunk.reshape(d1 - d0, -1)).all(dim=1)
        if bad.any():
            row = d0 + int(bad.nonzero()[0])
            msg = _first_bad(t.plan, _shift(bad.cpu(), d0, flat), src.ckpt, t.name)
            if torch.isfinite(src.rows(t.plan, row, row + 1, width, t.name)).all():  # finite on disk: overflow
                msg = msg.replace("contains NaN or Inf", f"has values too large for {str(out_dtype).removeprefix('torch.')}")
            raise CheckpointError(msg)
    raise CheckpointError(f"'{t.name}' contains NaN or Inf")


def _fp8_sources(plan: TargetPlan | None, ckpt: Checkpoint | None) -> bool:
    return plan is not None and any(ckpt.tensors[k].dtype == FP8_DTYPE for k in plan.sources)


def _full_precision_modules(model: nn.Module, plans: dict[str, TargetPlan], ckpt: Checkpoint) -> list[str]:
    """Pre-quantized checkpoint: modules whose weights are stored in full precision stay so (as vLLM does),
    as ignore patterns; a module is quantized only when its checkpoint weights are FP8."""
    out = []
    for name, module in model.named_modules():
        attrs = ["weight"] if isinstance(module, nn.Linear) else [a for a in ("gate_up_proj", "down_proj") if isinstance(getattr(module, a, None), nn.Parameter)]
        if attrs and not all(_fp8_sources(plans.get(f"{name}.{a}"), ckpt) for a in attrs):
            out.append(rf"^{re.escape(name)}$")
    return out


def _check_prequantized(targets: list[_Target], ckpt: Checkpoint, scheme: str, suffix: str) -> dict[str, list]:
    """Every FP8 checkpoint tensor must land in an FP8 parameter (no dequantization), whole; its scales are planned."""
    scales = {}
    for t in targets:
        if t.plan is None or not _fp8_sources(t.plan, ckpt):
            continue
        key = next(k for k in t.plan.sources if ckpt.tensors[k].dtype == FP8_DTYPE)
        if t.scale_attr is None:
            raise CheckpointError(f"{ckpt.tensors[key].file}: tensor '{key}' is stored in FP8 but the model's '{t.name}' is kept in "
                                  "full precision (--ignore, or a Linear whose dims are not multiples of 16); fp8stream does not dequantize")
        other = next((k for k in t.plan.sources if ckpt.tensors[k].dtype != FP8_DTYPE), None)
        if other is not None:
            raise CheckpointError(f"{ckpt.tensors[other].file}: tensor '{other}' is {str(ckpt.tensors[other].dtype).removeprefix('torch.')} "
                                  f"but '{key}', fused with it into '{t.name}', is FP8")
        scales[t.name] = scale_pieces(t.plan, ckpt, scheme, suffix)
    return scales


def _load_prequantized(t: _Target, c: _Chunks, src: _Source, ledger: MemoryLedger, scheme: str, device: torch.device, scales: list,
                       gate_up: _GateUpStorage | None = None) -> None:
    """FP8 rows of a pre-quantized checkpoint copied as they are into the final storage; scales placed as planned."""
    w, s, n, k, flat = _alloc_fp8(t, ledger, device, gate_up)
    w_flat = w.view(flat, k)
    for d0, d1 in c.rows:
        ledger.stage((d1 - d0) * k)
        w_flat[d0:d1] = src.rows(t.plan, d0, d1, k, t.name)
        ledger.unstage((d1 - d0) * k)
    s_rows = s.view(-1, *s.shape[-2:]) if scheme == "fp8_per_block" else s.view(-1)
    for skey, p in scales:
        info = src.ckpt.tensors[skey]
        x = src.key_rows(skey, 0, info.flat_shape[0] if info.shape else 1).float()
        if not torch.isfinite(x).all() or not (x > 0).all():
            raise CheckpointError(f"{info.file}: scale tensor '{skey}' has a value that is not a positive finite number")
        if scheme == "fp8_per_block":
            lead, r0 = divmod(p.dst_row, n)
            b0, nb = p.src_row // BLOCK, -(-p.rows // BLOCK)
            s_rows[lead, r0 // BLOCK : r0 // BLOCK + nb] = x[b0 : b0 + nb]
        elif scheme == "fp8_per_tensor":
            s_rows[p.dst_row : p.dst_row + p.rows] = x.reshape(())
        else:
            s_rows[p.dst_row : p.dst_row + p.rows] = x.reshape(-1)[p.src_row : p.src_row + p.rows]
    t.module._parameters[t.attr] = nn.Parameter(w, requires_grad=False)
    t.module._parameters[t.scale_attr] = nn.Parameter(s, requires_grad=False)


class _KernelWarmup:
    """Runs, on a side thread and on tiny tensors, the device work the load does per chunk (a pinned
    host-to-device copy on a side stream, the quantization or full-precision kernels for this source dtype),
    while the loader thread builds the model and the plan.

    Why: the first launch of each of these kernels in a process loads its module into the CUDA context
    (lazy module loading): the first row quantization of a process took 0.07-0.31 s on the H100, the next
    0.2-0.8 ms, and 0.009-0.12 s with CUDA_MODULE_LOADING=EAGER (bench/first_use_cost.py). On this thread that
    wait overlaps the Python-bound setup instead of stalling the first chunks of the stream (fresh-process
    A/B: streaming 1.20 s with it, 1.36 s without; BENCHMARKS.md). Best effort: any error here is left for
    the real load to meet and report."""

    def __init__(self, device: torch.device, src_dtype: torch.dtype, dtype: torch.dtype, scheme: str):
        self._args = (device, src_dtype, dtype, scheme)
        self._thread = threading.Thread(target=self._run, name="fp8stream-warmup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        device, src_dtype, dtype, scheme = self._args
        try:
            torch.cuda.set_device(device)
            host = torch.ones(64, 2048, dtype=src_dtype, pin_memory=True)  # a real width: the same kernel variants
            side, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)
            with torch.cuda.stream(side):
                x = host.to(device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            compute.wait_event(copied)
            x.record_stream(compute)
            q, s = torch.empty(64, 2048, dtype=FP8_DTYPE, device=device), torch.empty(64, device=device)
            if scheme == "fp8_per_block":
                quantize_blocks(x)
            else:
                quantize_rows_into(x, q, s)
                quantize_rows_into(x, q, s, scale_from_amax(tensor_amax(x)).expand(64))
            kept = torch.empty(64, 2048, dtype=dtype, device=device)
            kept.copy_(x)
            norms = torch.zeros(2, dtype=dtype, device=device)
            torch.linalg.vector_norm(kept, float("inf"), out=norms[0])
            torch.stack([torch.isfinite(norms).all(), torch.isfinite(s).all()]).all().item()
        except Exception as e:  # pragma: no cover - best effort, see the docstring
            log.debug("kernel warm-up: %s", e)

    def join(self) -> None:
        self._thread.join()


def _without_gc(fn):
    """Run fn with the cyclic garbage collector paused: a full collection walks every Python object (about
    0.2 s once a 19k-tensor checkpoint's headers and plan exist) and lands at random inside the load; a
    load makes no cyclic garbage that must go before it returns."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()
    return wrapped


@_without_gc
def load(
    path: str | Path,
    device: str | torch.device = "cuda",
    scheme: str | None = None,
    *,
    load_format: str = "auto",
    staging_mib: float = 256,
    ignore: tuple[str, ...] | list[str] = (),
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    read_threads: int = DEFAULT_READ_THREADS,
    prefetch_buffers: int = 8,
    timeline: str | Path | None = None,
    tp: int = 1,
    ep: bool = False,
    keep_sensitive: bool = False,
    fuse_gate_up: bool = True,
):
    """Stream a Hugging Face checkpoint directory into an FP8 transformers model on `device`.

    Returns a transformers PreTrainedModel whose Linear layers / fused MoE experts are FP8; its
    `fp8stream_report` attribute is a LoadReport. Raises Fp8StreamError (one-line message) on bad input.
    `read_threads` positional reads run in parallel into a ring of `prefetch_buffers` pinned host buffers,
    each the size of the largest staging chunk (CUDA); `timeline` names a PNG to draw memory and progress
    against time (its data goes next to it as JSON). `scheme` defaults to the checkpoint's own for a pre-quantized FP8
    checkpoint (config.json quantization_config: its FP8 bytes are copied, never requantized; another
    scheme is an error), else fp8_per_channel.

    `tp=N` (N = world size) / `ep=True`: inside an initialised torch.distributed process group (torchrun),
    this rank loads, and reads, only its part of the model: tensor parallel along transformers'
    `base_model_tp_plan`, MoE experts expert-parallel with `ep` (see parallel.py); device "cuda" means
    cuda:LOCAL_RANK. The report is this rank's.

    `keep_sensitive`: also keep the first and the last decoder layer's Linear / experts modules in the
    model dtype (chosen by name, no calibration data; the report's `kept_sensitive` lists them).

    `fuse_gate_up` (single device): the gate_proj and up_proj weights of every MLP whose forward is the canonical
    `down_proj(act_fn(gate_proj(x)) * up_proj(x))` are loaded into the two halves of one storage, and at prefill sizes
    the MLP runs them as one GEMM, with silu(gate) * up fused into the down projection's input quantization (decode
    sizes keep the two projections). The parameters keep their names and shapes (views); the report's
    `gate_up_fused` counts the MLPs. H100, Llama-8B prefill 1 x 4096 compiled: 1.42x -> 1.48x bf16.
    """
    if scheme is not None and scheme not in SCHEMES:
        raise Fp8StreamError(f"unknown scheme '{scheme}' (choose from {', '.join(SCHEMES)})")
    if load_format not in ("auto", "dummy"):
        raise Fp8StreamError(f"unknown load format '{load_format}' (auto or dummy)")
    if not staging_mib > 0:
        raise Fp8StreamError(f"--staging-mib must be positive, got {staging_mib}")
    path = Path(path)
    group = current_group(tp, ep)
    if group is not None and str(device) == "cuda":
        device = f"cuda:{group.local_rank}"
    dev = _device(device)
    if group is not None and dev.type == "cuda":
        torch.cuda.set_device(dev)
    config = _load_config(path)
    pre = prequantized_scheme(json.loads((path / "config.json").read_bytes()).get("quantization_config"), path / "config.json")
    if pre is not None and scheme is not None and scheme != pre[0]:
        raise Fp8StreamError(f"{path / 'config.json'}: checkpoint is already quantized as {pre[0]}; loading it as {scheme} would "
                             "need requantization (omit --scheme)")
    scheme = pre[0] if pre is not None else scheme or "fp8_per_channel"
    if read_threads < 1 or prefetch_buffers < 1:
        raise Fp8StreamError(f"read threads and prefetch buffers must be >= 1 (got {read_threads}, {prefetch_buffers})")
    ckpt = Checkpoint(path, read_threads=read_threads) if load_format == "auto" else None
    if ckpt is not None:
        ckpt.check_index()
    src_dtype = dtype
    if ckpt is not None:
        float_dtypes = [i.dtype for i in ckpt.tensors.values() if i.dtype.is_floating_point and i.dtype.itemsize > 1]
        src_dtype = max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else dtype
    warmup = _KernelWarmup(dev, src_dtype, dtype, scheme) if dev.type == "cuda" else None
    src = None
    try:
        try:
            model = build_meta_model(config, dtype)
        except Fp8StreamError:
            raise
        except Exception as e:  # config values transformers' validation lets through (negative sizes, unknown rope type...)
            first = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{path / 'config.json'}: cannot build the {config.model_type} model it describes ({type(e).__name__}: {first})") from None
        full_precision = sum(p.numel() for p in model.parameters()) * src_dtype.itemsize
        plans = build_plan(model, ckpt, scale_suffix=pre[1] if pre else None) if ckpt is not None else None

        ignore = list(DEFAULT_IGNORE) + list(ignore)
        out_emb = model.get_output_embeddings()
        if out_emb is not None:
            out_name = next(n for n, m in model.named_modules() if m is out_emb)
            ignore.append(rf"^{out_name}$")
        if pre is not None and plans is not None:
            ignore += _full_precision_modules(model, plans, ckpt)
        sensitive = sensitive_modules(model) if keep_sensitive else []
        ignore += [rf"^{re.escape(n)}$" for n in sensitive]
        try:
            quantized, kept_modules = replace_with_fp8(model, scheme, ignore, dtype)
        except Exception as e:
            if isinstance(e, Fp8StreamError):
                raise
            raise Fp8StreamError(f"--ignore: {e}") from None
        layout = None
        if group is not None:
            if pre is not None:
                raise UnsupportedModelError(f"{path / 'config.json'}: tp/ep loads of pre-quantized FP8 checkpoints are not supported yet; load the full-precision checkpoint")
            tied = set(getattr(model, "all_tied_weights_keys", None) or {})
            layout = plan_layout(model, tp, ep, group.rank, group.world, tied)
            shard_meta(model, layout)
            if plans is not None:
                plans = {name: local_plan(plan, layout.shards.get(name)) for name, plan in plans.items()}
        targets = _targets(model, plans)
        # tensor parallel leaves the MLPs as they are: its forward hooks sit on the projections the fused forward skips
        gate_up = _GateUpStorage(gated_mlps(model)) if fuse_gate_up and layout is None else None
        if layout is not None:
            for t in targets:
                t.group = group.group
        scales = _check_prequantized(targets, ckpt, scheme, pre[1]) if pre is not None and ckpt is not None else {}
        final_bytes = _unique_bytes(list(model.parameters()) + list(model.buffers()))
        staging = int(staging_mib * 2**20)
        ledger = MemoryLedger(dev, staging)
        ledger.check_fits(final_bytes)

        src = _Source(ckpt, dtype, dev, prefetch_buffers=prefetch_buffers)
        work = [(t, _quantized_chunks(t, src, scheme, staging) if t.scale_attr is not None else _kept_chunks(t, src, staging))
                for t in targets]
        for t, c in work:
            if t.name in scales:
                c.amax_reads = []  # stored FP8: no amax pass
        schedule = _schedule(src, work)
        t0 = time.perf_counter()
        ledger.mark_host_base()  # before the pinned pool: the host peak counts it
        # Reading ahead (and pinning the pool) starts now, on the prefetcher's threads, while the warm-up thread
        # may still be loading kernels: host work only, no device memory before the ledger starts.
        src.start(schedule)
    except BaseException:
        if warmup is not None:
            warmup.join()  # no thread outlives a failed load
        if src is not None:
            src.close()
        if ckpt is not None:
            ckpt.close()
        raise
    n_quant = n_kept = 0
    try:
        if warmup is not None:
            warmup.join()  # before the ledger starts: its tiny tensors are no part of the load's peak
        sampler = Sampler(dev, src, interval_s=0.005)
        ledger.start(sampler)
        bar = progress_bar(work, desc="fp8stream", unit="tensor", disable=not progress, leave=False)
        checks = []  # (device flag: all finite, raises the one-line error naming the tensor)
        with torch.no_grad():
            for t, chunks in bar:
                if t.name in scales:
                    _load_prequantized(t, chunks, src, ledger, scheme, dev, scales[t.name], gate_up)
                    n_quant += 1
                elif t.scale_attr is not None:
                    checks.append(_load_quantized(t, chunks, src, ledger, scheme, dev, gate_up))
                    n_quant += 1
                else:
                    checks.append(_load_kept(t, chunks, src, ledger, dtype, dev))
                    n_kept += 1
            checks = [c for c in checks if c is not None]
            if checks and not torch.stack([flag for flag, _ in checks]).all():  # the one sync for all of them
                next(raise_ for flag, raise_ in checks if not flag)()
            for module in model.modules():
                for name, buf in list(module._buffers.items()):
                    if buf is not None:  # constructed buffers (rotary inv_freq, ...) are part of the final footprint
                        module._buffers[name] = buf.to(dev)
                        ledger.add_final(buf.nbytes)
        model.tie_weights()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    finally:
        pinned = src.pinned_bytes
        src.close()
        if ckpt is not None:
            ckpt.close()
        ledger.stop()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise Fp8StreamError(f"internal: parameter '{left[0]}' was not loaded")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    ledger.sample()
    if layout is not None:
        install_hooks(model, layout, group.group)
    fused = gate_up.fuse() if gate_up is not None else 0
    report = LoadReport(
        device=str(dev), scheme=scheme, peak_bytes=ledger.peak(), final_bytes=final_bytes,
        full_precision_bytes=full_precision, staging_bytes=staging, load_seconds=seconds,
        quantized_tensors=n_quant, kept_tensors=n_kept, peak_measured_by=ledger.measured_by,
        host_rss_anon_peak_delta_bytes=ledger.rss_peak, host_peak_bytes=ledger.host_peak_bytes,
        pinned_host_bytes=pinned, read_threads=read_threads if ckpt is not None else 0, load_format=load_format,
        quantized_modules=quantized, kept_modules=kept_modules, kept_sensitive=sensitive,
        kept_sensitive_rule=SENSITIVE_RULE if keep_sensitive else "", read_bytes=ckpt.bytes_read if ckpt is not None else 0,
        rank=group.rank if group else 0, world_size=group.world if group else 1, tp=tp, ep=layout.ep if layout else 1,
        gate_up_fused=fused,
    )
    if group is None:
        log.debug("Peak device memory while loading weights: %.2f GiB", report.peak_bytes / 2**30)
    else:
        log.debug("[rank %d/%d] Peak device memory while loading weights: %.2f GiB", group.rank, group.world, report.peak_bytes / 2**30)
    log.info(report.summary())
    model.config.dtype = dtype
    _attach_generation_config(model, path)
    model.fp8stream_report = report
    if timeline is not None:
        from .timeline import write_timeline

        write_timeline(Path(timeline), sampler.samples, report)
    return model


def _attach_generation_config(model, path: Path) -> None:
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            log.warning("%s: ignored (%s)", path / "generation_config.json", str(e).splitlines()[0])
