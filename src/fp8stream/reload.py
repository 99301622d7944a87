"""`reload()`: new full-precision weights into a live FP8 model, in place (RL weight sync, checkpoint swaps).

The model `load()` built keeps its load plan (`model._fp8stream_state`, loader._LoadState): which rows of which
on-disk tensor land in which rows of which parameter. A reload looks each given tensor up in that plan, restricts
the plan to the tensors given (and, under tp/ep, to this rank's rows and columns, parallel.local_plan), and streams
them through the load's own per-parameter fill functions (stream.py), told to write into the parameters' current
storage instead of allocating it (`_Target.live`). Same plan, same chunks, same quantize.py functions: the numbers
are those of a fresh `load()` of the same weights.

A source is a checkpoint directory (read through checkpoint.Checkpoint and the read-ahead pipeline, as load
reads it) or (name, tensor) pairs, served by `_Tensors`, a stand-in for Checkpoint whose rows are slices of the
given tensors: a tensor already on the model's device is used as the staging chunk itself (no copy; except
float32, which fp8_per_block quantization would divide in place), a CPU tensor is copied chunk by chunk.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from .checkpoint import DEFAULT_READ_THREADS, FLOAT_SOURCE_DTYPES, Checkpoint, TensorInfo
from .errors import CheckpointError, Fp8StreamError
from .load_plan import Piece, TargetPlan, build_plan
from .loader import _LoadState, _targets
from .memory import MemoryLedger
from .meta_model import build_meta_model
from .parallel import local_plan
from .quantize import BLOCK
from .report import LoadReport
from .source import Source
from .stream import (_Chunks, _kept_chunks, _quantized_chunks, _schedule, _stage_extra, _Target, _unique_bytes,
                     stream_weights)

_GIVEN = Path("<reload tensors>")  # the "file" error messages name for (name, tensor) sources


def reload(
    model: torch.nn.Module,
    source: str | os.PathLike | Iterable[tuple[str, torch.Tensor]],
    *,
    staging_mib: float = 256,
    check_finite: bool = True,
    progress: bool = False,
    read_threads: int = DEFAULT_READ_THREADS,
) -> LoadReport:
    """Requantize new full-precision weights into `model` (built by `fp8stream.load`) in place; returns a LoadReport.

    `source`: a checkpoint directory (safetensors, as for `load`; under tp/ep each rank reads only its bytes), or an
    iterable of (name, tensor) pairs (a trainer's `state_dict().items()`) named as on disk or as the model's own
    parameters (a fused `experts.gate_up_proj` is split back into its on-disk tensors through the load plan, as
    views), on the CPU or on the model's device, in any order; under tp/ep each rank takes its slice of each. A subset of the weights is a partial update: only the parameter
    rows fed by the given tensors change (a fused parameter, e.g. experts' gate_up from per-expert w1/w3, keeps the
    rows of the experts not given; under fp8_per_block a given tensor must not share a 128-row scale block with one
    not given). Tied weights (lm_head tied to the embedding) are skipped, as `load` skips them.

    Guarantees:
      * in place: every parameter, scale and buffer keeps its storage (`data_ptr`) and its Parameter object, so
        CUDA graphs, a torch.compile'd model and the fused gate/up storage stay valid; nothing is allocated on the
        device but staging chunks (the report's peak - final <= staging);
      * the same numbers as a fresh load: after `reload(model, B)` every FP8 code, scale and kept tensor equals
        `load(B)`'s (same scheme), bit for bit;
      * bad input (a name no parameter loads from, a wrong shape, a non-float dtype, a tensor on another device,
        NaN / Inf) raises an `Fp8StreamError` subclass whose one-line message names the tensor, and the model is
        unchanged: names, shapes and dtypes are checked before anything is read, and with `check_finite` (default)
        every given row is checked for NaN / Inf (and, for weights kept in the model dtype, for overflow) in a
        first pass before the first write. That pass reads a directory source twice; `check_finite=False` skips
        it: NaN / Inf is then still detected and raised, but after the writes (the model is partly updated).
        A read error of a directory source during the writes also leaves the model partly updated.

    Pre-quantized (FP8) source tensors are refused: reload quantizes full-precision weights.
    """
    state: _LoadState | None = getattr(model, "_fp8stream_state", None)
    if state is None:
        raise Fp8StreamError("reload: this model was not built by fp8stream.load (nothing to reload into)")
    if not staging_mib > 0:
        raise Fp8StreamError(f"reload: staging_mib must be positive, got {staging_mib}")
    if read_threads < 1:
        raise Fp8StreamError(f"reload: read_threads must be >= 1, got {read_threads}")
    if state.layout is not None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise Fp8StreamError("reload: the model was loaded with tp/ep; its process group is no longer initialised")
    dev, scheme = state.device, state.scheme
    t0 = time.perf_counter()
    if isinstance(source, (str, os.PathLike)):
        ckpt = Checkpoint(Path(source), read_threads=read_threads)
        from_dir = True
    elif isinstance(source, (torch.Tensor, bytes, dict)) or not isinstance(source, Iterable):
        raise Fp8StreamError(f"reload: source must be a checkpoint directory or (name, tensor) pairs, not a {type(source).__name__}"
                             + (" (pass state_dict.items())" if isinstance(source, dict) else ""))
    else:
        ckpt = _Tensors(source, dev)
        from_dir = False
    src = ledger = None
    pinned = 0
    try:
        if from_dir:
            ckpt.check_index()
        plans = state.plans if state.plans is not None else _first_plans(model, state, ckpt)
        if not from_dir:
            ckpt.split_model_names(plans, state.key_shapes)
        given = _validate(ckpt, state, plans)
        staging = int(staging_mib * 2**20)
        src = Source(ckpt, state.dtype, dev) if from_dir else _TensorSource(ckpt, state.dtype, dev)
        group = state.group.group if state.group is not None else None
        work = []
        for t in _targets(model, None):
            plan = plans.get(t.name)
            if plan is None or not any(k in given for k in plan.sources):
                continue
            if state.layout is not None:
                plan = local_plan(plan, state.layout.shards.get(t.name))
            if plan.zeros:  # a rowwise bias this rank holds as zeros: nothing to write
                continue
            t.plan, t.live, t.group = _given_part(plan, given), True, group
            c = _quantized_chunks(t, src, scheme, staging) if t.scale_attr is not None else _kept_chunks(t, src, staging)
            c.rows = _given_rows(t, plan, c, scheme)
            work.append((t, c))
        final_bytes = _unique_bytes(list(model.parameters()) + list(model.buffers()))
        ledger = MemoryLedger(dev, staging)
        ledger.final = final_bytes  # the model as it is: a reload adds staging only
        checks = _finite_reads(work, src) if check_finite else []
        if from_dir:  # read ahead along the finiteness pass, then the writes (CUDA: the pinned pipeline)
            src.start([(None, src._request(((k, a, b),), cols)) for _, _, k, a, b, cols in checks] + _schedule(src, work))
        ledger.mark_host_base()
        ledger.start()
        with torch.no_grad():
            if check_finite:  # also with nothing to check on this rank: every rank joins the verdict's all_reduce
                _check_finite(checks, work, src, ledger, state, sorted(given))
            try:
                n_quant, n_kept = stream_weights(work, src, ledger, scheme, state.dtype, dev, {}, None, progress)
            except CheckpointError as e:
                if check_finite:
                    raise
                raise CheckpointError(f"{e} (check_finite=False: the model is partly updated)") from None
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    finally:
        if src is not None:
            pinned = src.pinned_bytes
            src.close()
        ckpt.close()
        if ledger is not None:
            ledger.stop()
    seconds = time.perf_counter() - t0
    grown = ledger.peak() if dev.type == "cuda" else ledger.peak() - final_bytes  # CUDA: measured from the live model
    lay = state.layout
    return LoadReport(
        device=str(dev), scheme=scheme, peak_bytes=final_bytes + max(grown, 0), final_bytes=final_bytes,
        full_precision_bytes=sum(ckpt.tensors[k].nbytes for k in given), staging_bytes=staging, load_seconds=seconds,
        quantized_tensors=n_quant, kept_tensors=n_kept, peak_measured_by=ledger.measured_by,
        host_rss_anon_peak_delta_bytes=ledger.rss_peak, host_peak_bytes=ledger.host_peak_bytes, pinned_host_bytes=pinned,
        read_threads=read_threads if from_dir else 0, load_format="reload", read_bytes=ckpt.bytes_read,
        rank=lay.rank if lay else 0, world_size=lay.world if lay else 1, tp=lay.tp if lay else 1, ep=lay.ep if lay else 1,
    )


def _first_plans(model, state: _LoadState, ckpt) -> dict[str, TargetPlan]:
    """A dummy-loaded model has no plan yet: the first reload builds it, as load would, from a meta model of the
    same config and this (then complete) source."""
    plans = build_plan(build_meta_model(model.config, state.dtype), ckpt)
    state.plans = plans
    state.key_shapes = {k: ckpt.tensors[k].shape for p in plans.values() for k in p.sources}
    return plans


def _validate(ckpt, state: _LoadState, plans: dict[str, TargetPlan]) -> set[str]:
    """The given keys that feed a parameter; raises on a name, shape or dtype that does not fit (before any read)."""
    given = set()
    for key, info in ckpt.tensors.items():
        want = state.key_shapes.get(key)
        if want is None:
            if key in state.tied or "rotary_emb.inv_freq" in key:
                continue  # load skips these too (the tie wins; buffers are computed)
            raise CheckpointError(f"{info.file}: tensor '{key}' is not a weight of this model (no parameter loads from it)")
        if info.shape != want:
            raise CheckpointError(f"{info.file}: tensor '{key}' has shape {list(info.shape)} but the model loaded it as {list(want)}")
        if info.dtype not in FLOAT_SOURCE_DTYPES:
            raise CheckpointError(f"{info.file}: tensor '{key}' has dtype {str(info.dtype).removeprefix('torch.')}, expected a "
                                  "full-precision float weight (bf16/fp16/fp32)")
        given.add(key)
    if not given:
        raise CheckpointError(f"{ckpt.path}: no tensor of this model to reload")
    return given


def _given_part(plan: TargetPlan, given: set[str]) -> TargetPlan:
    """The plan restricted to the pieces of the given tensors (per-tensor shard indices renumbered to match)."""
    if all(k in given for k in plan.sources):
        return plan
    sources = [k for k in plan.sources if k in given]
    shard = {k: i for i, k in enumerate(sources)}
    pieces = [Piece(p.key, p.src_row, p.dst_row, p.rows, shard[p.key]) for p in plan.pieces if p.key in given]
    return TargetPlan(plan.name, plan.shape, pieces, sources, plan.cols, plan.sharded, plan.zeros, plan.transposed)


def _given_rows(t: _Target, plan: TargetPlan, c: _Chunks, scheme: str) -> list[tuple[int, int]]:
    """The row chunks of a target that the given tensors fill: load's own chunks when they fill all of it."""
    if t.plan.transposed:  # a Conv1D weight: one source tensor, given whole
        return c.rows
    shape = tuple(t.module._parameters[t.attr].shape)
    flat = math.prod(shape[:-1]) if len(shape) >= 2 else (shape[0] if shape else 1)
    runs = []
    for p in sorted(t.plan.pieces, key=lambda p: p.dst_row):
        if runs and runs[-1][1] == p.dst_row:
            runs[-1][1] += p.rows
        else:
            runs.append([p.dst_row, p.dst_row + p.rows])
    if runs == [[0, flat]]:
        return c.rows
    block = scheme == "fp8_per_block" and t.scale_attr is not None
    n = shape[-2] if block else flat
    out = []
    for a, b in runs:
        while a < b:
            base = a // n * n
            end = min(b, base + n)  # fp8_per_block: a chunk never crosses an expert (the slice its blocks tile)
            if block:
                if (a - base) % BLOCK:
                    _raise_block_split(t, plan, a - (a - base) % BLOCK)
                if (end - base) % BLOCK and end != base + n:
                    _raise_block_split(t, plan, end - (end - base) % BLOCK)
            out += [(r, min(r + c.step, end)) for r in range(a, end, c.step)]
            a = end
    return out


def _raise_block_split(t: _Target, plan: TargetPlan, block_row: int) -> None:
    """fp8_per_block: the 128 rows from `block_row` hold given and missing rows: name one of each."""
    inside = [p for p in plan.pieces if p.dst_row < block_row + BLOCK and p.dst_row + p.rows > block_row]
    mine = {p.key for p in t.plan.pieces}
    have = next(p.key for p in inside if p.key in mine)
    missing = next(p.key for p in inside if p.key not in mine)
    raise CheckpointError(f"reload: fp8_per_block: tensor '{have}' shares a {BLOCK}-row scale block of '{t.name}' with "
                          f"'{missing}', which is not given; reload them together")


def _finite_reads(work, src: Source) -> list[tuple]:
    """(target index, kept?, key, first row, end row, cols) of every chunk of given rows, for the finiteness pass."""
    out = []
    for i, (t, c) in enumerate(work):
        # source rows of a transposed (Conv1D) plan hold the destination's column count: fewer per chunk
        step = max(1, c.step * t.plan.shape[-2] // t.plan.shape[-1]) if t.plan.transposed else c.step
        for p in t.plan.pieces:
            for r0 in range(p.src_row, p.src_row + p.rows, step):
                out.append((i, t.scale_attr is None, p.key, r0, min(r0 + step, p.src_row + p.rows), t.plan.cols))
    return out


def _check_finite(checks, work, src: Source, ledger: MemoryLedger, state: _LoadState, names: list[str]) -> None:
    """Raise, naming the tensor, if any given row holds NaN / Inf (or a value a kept tensor's dtype cannot hold),
    before anything is written. Every rank sees the same verdict (the first bad name over all ranks)."""
    dev = src.device
    flags = torch.empty(len(checks), dtype=torch.bool, device=dev)
    limits = torch.tensor([_limit(work[i][0], kept, state.dtype) for i, kept, *_ in checks], device=dev)  # one copy
    batch: list[tuple[int, torch.Tensor]] = []  # (check index, rows)
    held = 0  # staged bytes of the batch

    def flush() -> None:
        nonlocal held
        if not batch:
            return
        xs = [x for _, x in batch]
        if dev.type == "cuda":
            # one multi-tensor launch for the whole batch: a chunk's inf-norm is NaN / Inf iff it holds NaN / Inf (a
            # launch per chunk made this pass host-bound: 0.37 s for Qwen1.5-MoE's 4659 tensors on the H100), then
            # one stack (promoted to float32) instead of a cast per chunk
            mags = torch.stack(torch._foreach_norm(xs, float("inf"))).float()
        else:  # CPU: aminmax in one pass, no temporary of the chunk's size (15x faster than an inf-norm there)
            mags = torch.stack([torch.stack(torch.aminmax(x)).float().abs().max() for x in xs])  # NaN propagates
        a, b = batch[0][0], batch[-1][0] + 1
        # the limits went to the device once, before the pass: a pageable host-to-device copy per batch here
        # would wait for the stream each time and keep the host from running ahead
        flags[a:b] = torch.isfinite(mags) & (mags <= limits[a:b])
        batch.clear()
        del xs
        ledger.unstage(held)
        held = 0

    for j, (i, kept, key, r0, r1, cols) in enumerate(checks):
        c = work[i][1]
        info = src.ckpt.tensors[key]
        width = (cols[1] - cols[0]) if cols is not None and len(info.shape) >= 2 else (info.shape[-1] if len(info.shape) >= 2 else 1)
        staged = (r1 - r0) * width * (info.dtype.itemsize + _stage_extra(c.kind, info.dtype.itemsize, dev))
        if batch and (held + staged > ledger.staging_bytes or len(batch) >= 512):
            flush()
        ledger.stage(staged)
        held += staged
        batch.append((j, src.key_rows(key, r0, r1, cols)))
    flush()
    index = {k: i for i, k in enumerate(names)}
    bad = [index[checks[j][2]] for j in (~flags).nonzero().flatten().tolist()]  # the one sync of the pass
    first = torch.tensor(min(bad, default=len(names)), device=dev)
    if state.layout is not None:
        import torch.distributed as dist

        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=state.group.group)
    if int(first) < len(names):
        key = names[int(first)]
        raise CheckpointError(f"{src.ckpt.tensors[key].file}: tensor '{key}' contains NaN or Inf (or values too large for "
                              f"{str(state.dtype).removeprefix('torch.')}); the model is unchanged")


def _limit(t: _Target, kept: bool, dtype: torch.dtype) -> float:
    """The largest magnitude a given value may have: a kept tensor's values must also fit the model dtype, a
    quantized one's only be finite."""
    own = t.module._parameters[t.attr].dtype
    out_dtype = dtype if own.is_floating_point else own
    return torch.finfo(out_dtype).max if kept and out_dtype.is_floating_point else float("inf")


class _Tensors:
    """A stand-in for checkpoint.Checkpoint over (name, tensor) pairs: the same TensorInfo headers (so build_plan,
    Source and the stream functions work unchanged), rows served as slices of the tensors themselves."""

    def __init__(self, pairs: Iterable, device: torch.device):
        self.path = _GIVEN
        self.data: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.bytes_read = 0
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise Fp8StreamError(f"reload: expected (name, tensor) pairs, got a {type(item).__name__}")
            name, t = item
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{_GIVEN}: '{name}' is a {type(t).__name__}, not a tensor")
            if name in self.data:
                raise CheckpointError(f"{_GIVEN}: tensor '{name}' is given twice")
            if t.device.type != "cpu" and t.device != device:
                raise CheckpointError(f"{_GIVEN}: tensor '{name}' is on {t.device}, but the model is on {device} (give it on the CPU or there)")
            t = t.detach()
            self.data[name] = t
            self.tensors[name] = TensorInfo(name, _GIVEN, t.dtype, tuple(t.shape), t.numel() * t.element_size(), 0)

    def split_model_names(self, plans: dict[str, TargetPlan], key_shapes: dict[str, tuple[int, ...]]) -> None:
        """A tensor named as the model's own parameter (transformers' in-memory layout, e.g. a trainer's fused
        `experts.gate_up_proj`) instead of an on-disk name: its rows, through the load plan, are the on-disk tensors
        it was fused from (the plan's pieces), registered as views under their on-disk names. The numbers are then a
        fresh load's, per-shard per-tensor scales included."""
        for name in [n for n in self.data if n not in key_shapes and n in plans]:
            plan, t = plans[name], self.data[name]
            if tuple(t.shape) != plan.shape:
                raise CheckpointError(f"{_GIVEN}: tensor '{name}' has shape {list(t.shape)} but the model's '{name}' is {list(plan.shape)}")
            if len(plan.pieces) == 1 and plan.sources == [name]:
                continue
            flat = t.reshape(-1, t.shape[-1]) if t.dim() >= 2 else t.reshape(-1)
            for key in plan.sources:
                pieces = [p for p in plan.pieces if p.key == key]
                shape = key_shapes[key]
                rows = shape[0] if len(shape) == 1 else math.prod(shape[:-1]) if shape else 1
                if len(pieces) != 1 or pieces[0].src_row != 0 or pieces[0].rows != rows or key in self.data:
                    raise CheckpointError(f"{_GIVEN}: tensor '{name}' cannot be split back into its checkpoint tensors "
                                          f"(e.g. '{key}'); give the checkpoint's own tensors")
                p = pieces[0]
                self.data[key] = flat[p.dst_row : p.dst_row + p.rows].reshape(shape)
                self.tensors[key] = TensorInfo(key, _GIVEN, t.dtype, shape, math.prod(shape) * t.element_size(), 0)
            del self.data[name], self.tensors[name]

    def rows(self, key: str, start: int, stop: int, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Flat rows [start, stop) (columns [c0, c1)) of a given tensor: a view where its memory allows one, else
        a copy of those rows only."""
        t = self.data[key]
        if t.dim() == 0:
            x = t
        elif t.dim() == 1:
            x = t[start:stop]
        elif t.is_contiguous():
            x = t.view(-1, t.shape[-1])[start:stop]
        else:  # gather only these rows (never a contiguous copy of the whole tensor)
            x = t[torch.unravel_index(torch.arange(start, stop, device=t.device), t.shape[:-1])]
        if cols is not None and t.dim() >= 2:
            x = x[:, cols[0] : cols[1]]
        self.bytes_read += x.numel() * x.element_size()
        return x

    def read_rows(self, key: str, start: int, stop: int, cols: tuple[int, int] | None = None) -> torch.Tensor:
        return self.rows(key, start, stop, cols)

    def close(self) -> None:
        pass


class _TensorSource(Source):
    """Source over `_Tensors`: a chunk is the given tensor's rows themselves when they are one slice already on the
    device (not float32: fp8_per_block divides a float32 chunk in place), else they are copied into one staging chunk."""

    def _fetch(self, req):
        self.loaded_bytes += req.nbytes
        parts = [self.ckpt.rows(k, a, b, req.cols) for k, a, b in req.reads]
        if len(parts) == 1:
            x = parts[0]
            if x.device == self.device and x.dtype != torch.float32:
                return x
            return x.to(self.device, copy=True)
        out = torch.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=req.dtype, device=self.device)
        at = 0
        for p in parts:
            out[at : at + p.shape[0]].copy_(p)
            at += p.shape[0]
        return out
