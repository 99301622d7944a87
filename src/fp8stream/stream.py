"""The streaming load: checkpoint rows -> staging -> quantize -> final FP8 storage, one bounded chunk at a time.

Every parameter's final storage is allocated once, at its final size, on the target device, right
before it is filled; a quantized parameter's full-precision rows only ever exist on the device as one
staging chunk (<= the staging budget, temporaries included). Hence
    peak device memory <= final footprint + staging budget,
whatever the model size or the largest tensor. The setup that decides what to stream is loader.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CheckpointError, Fp8StreamError
from .load_plan import TargetPlan
from .memory import MemoryLedger
from .modules import fuse_gate_up, fuse_shared_input, fused_storage, row_parts
from .pipeline import Request
from .quantize import BLOCK, FP8_DTYPE, quantize_blocks, quantize_rows_into, scale_from_amax, tensor_amax
from .report import progress_bar
from .source import Source, first_bad

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
    live: bool = False  # reload: write into the parameter's current storage (no allocation; the Parameter objects stay)


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


@dataclass
class _Chunks:
    """How one parameter is streamed: the row step, the per-tensor amax pass reads, the row chunks."""

    step: int
    amax_reads: list[tuple[str, int, int]]
    rows: list[tuple[int, int]]
    kind: str = "rows"  # staging kind (_STAGE_BYTES_PER_ELEM)
    extra: int = 0  # more staged bytes per element (a transposed source's copy)


def _stage_kind(scheme: str, cols_split: bool = False) -> str:
    """The staging kind (_STAGE_BYTES_PER_ELEM) of quantizing one chunk under `scheme`; rows split by columns
    over ranks get their scales from the whole row's amax (given scales)."""
    if scheme == "fp8_per_block":
        return "blocks"
    return "scaled_rows" if scheme == "fp8_per_tensor" or cols_split else "rows"


def _quantized_chunks(t: _Target, src: Source, scheme: str, staging: int) -> _Chunks:
    shape = tuple(t.module._parameters[t.attr].shape)
    n, k = shape[-2], shape[-1]
    block = scheme == "fp8_per_block"
    kind = _stage_kind(scheme, t.plan is not None and t.plan.cols is not None)
    itemsize = src.itemsize(t.plan)
    transposed = t.plan is not None and t.plan.transposed
    extra = _stage_extra(kind, itemsize, src.device) + (itemsize if transposed else 0)  # the transposed copy of the chunk
    step = _rows_per_chunk(k, itemsize, staging, BLOCK if block and n >= BLOCK else 1, t.name, extra)
    if block:
        step = min(step, math.ceil(n / BLOCK) * BLOCK)
    amax_reads = []
    # the amax pass reads source rows: of a transposed source, rows of the destination's column count
    amax_step = _rows_per_chunk(t.plan.shape[-1], itemsize, staging, 1, t.name, 2 * itemsize) if transposed else step
    if scheme == "fp8_per_tensor" and t.plan is not None and t.plan.sharded:  # this rank's rows of each source
        for p in t.plan.pieces:
            amax_reads += [(p.key, r0, min(r0 + step, p.src_row + p.rows)) for r0 in range(p.src_row, p.src_row + p.rows, step)]
    elif scheme == "fp8_per_tensor" and t.plan is not None:
        for key in t.plan.sources:
            info = src.ckpt.tensors[key]
            rows = info.flat_shape[0] if info.shape else 1
            amax_reads += [(key, r0, min(r0 + amax_step, rows)) for r0 in range(0, rows, amax_step)]
    return _Chunks(step, amax_reads, list(_chunks(math.prod(shape[:-1]), n, step, per_slice=block or transposed)), kind,
                   itemsize if transposed else 0)


def _kept_chunks(t: _Target, src: Source, staging: int) -> _Chunks:
    shape = tuple(t.module._parameters[t.attr].shape)
    width = shape[-1] if len(shape) >= 2 else None
    flat = math.prod(shape[:-1]) if width else (shape[0] if shape else 1)
    step = _rows_per_chunk(width or 1, src.itemsize(t.plan), staging, 1, t.name, _stage_extra("kept", src.itemsize(t.plan), src.device))
    return _Chunks(step, [], list(_chunks(flat, flat, step, per_slice=False)), "kept")


def _schedule(src: Source, work: list[tuple[_Target, _Chunks]]) -> list[tuple[tuple | None, Request | None]]:
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


class _FusedStorage:
    """Sibling FP8Linears that run as one GEMM share one storage, each part its rows (modules.fused_storage): the gate
    and up of each gated MLP (modules.gated_mlps), the q, k and v of each attention (modules.qkv_groups). Allocated
    when the first part is loaded (no copy, no extra bytes); after the load, fuse() makes them run as one GEMM."""

    def __init__(self, mlps: list[nn.Module], qkv: list[tuple[nn.Module, ...]]):
        groups = [(m, (m.gate_proj, m.up_proj)) for m in mlps] + [(None, parts) for parts in qkv]
        self._part_of = {id(p): (g, i) for g, (_, parts) in enumerate(groups) for i, p in enumerate(parts)}
        self._groups = groups
        self._storage: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def take(self, module: nn.Module, ledger: MemoryLedger, device: torch.device):
        hit = self._part_of.get(id(module))
        if hit is None:
            return None
        g, i = hit
        parts = self._groups[g][1]
        if g not in self._storage:
            w, s = fused_storage(parts, device)
            ledger.add_final(w.nbytes + s.nbytes)
            self._storage[g] = (w, s)
        w, s = self._storage[g]
        return row_parts(w, parts)[i], row_parts(s, parts)[i]

    def fuse(self) -> tuple[int, int]:
        """(gated MLPs, shared-input groups) fused."""
        mlps = qkv = 0
        for g, (mlp, parts) in enumerate(self._groups):
            if g in self._storage:
                if mlp is not None:
                    mlps += fuse_gate_up(mlp, *self._storage[g])
                else:
                    qkv += fuse_shared_input(parts, *self._storage[g])
        return mlps, qkv


def _alloc_fp8(t: _Target, ledger: MemoryLedger, device: torch.device, fused: _FusedStorage | None = None):
    """The final storage of an FP8 parameter and its scales, allocated once at full size (siblings that run as one
    GEMM, a gated MLP's gate and up or an attention's q, k and v: their rows of one storage, see _FusedStorage)."""
    shape = tuple(t.module._parameters[t.attr].shape)
    ws = fused.take(t.module, ledger, device) if fused is not None else None
    if t.live:  # reload: the loaded weight and scales themselves (a fused part is a view of its storage)
        w, s = t.module._parameters[t.attr], t.module._parameters[t.scale_attr]
    elif ws is not None:
        w, s = ws
    else:
        w = torch.empty(shape, dtype=FP8_DTYPE, device=device)
        s = torch.empty(tuple(t.module._parameters[t.scale_attr].shape), dtype=torch.float32, device=device)
        ledger.add_final(w.nbytes + s.nbytes)
    return w, s, shape[-2], shape[-1], math.prod(shape[:-1])


def _load_quantized(t: _Target, c: _Chunks, src: Source, ledger: MemoryLedger, scheme: str, device: torch.device,
                    fused: _FusedStorage | None = None):
    w, s, n, k, flat = _alloc_fp8(t, ledger, device, fused)
    w_flat = w.view(flat, k)
    itemsize = src.itemsize(t.plan)
    block = scheme == "fp8_per_block"

    shard_scales = None
    if scheme == "fp8_per_tensor":
        shard_scales = _shard_scales(t, c, src, ledger, device)

    for d0, d1 in c.rows:
        staged = (d1 - d0) * k * (itemsize + _stage_extra(c.kind, itemsize, device) + c.extra)
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
    if not t.live:
        t.module._parameters[t.attr] = nn.Parameter(w, requires_grad=False)
        t.module._parameters[t.scale_attr] = nn.Parameter(s, requires_grad=False)
    # NaN / Inf in a weight makes its scale non-finite: a device flag, read once at the end of the load
    # (reading it here would stall the pipeline once per parameter); the load fails before it returns.
    return torch.isfinite(s).all(), lambda: _raise_non_finite(t, src, s, block, flat, n, k)


def _raise_non_finite(t: _Target, src: Source, s: torch.Tensor, block: bool, flat: int, n: int, k: int) -> None:
    if not block:
        raise CheckpointError(first_bad(t.plan, ~torch.isfinite(s.view(-1)).cpu(), src.ckpt, t.name))
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
    raise CheckpointError(first_bad(t.plan, _shift(bad, d0, flat), src.ckpt, t.name))


def _shift(bad: torch.Tensor, d0: int, flat: int) -> torch.Tensor:
    full = torch.zeros(flat, dtype=torch.bool)
    full[d0 : d0 + bad.numel()] = bad.cpu()
    return full


def _shard_scales(t: _Target, c: _Chunks, src: Source, ledger: MemoryLedger, device) -> torch.Tensor:
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
    if plan is None or plan.transposed:  # one source (a transposed plan's pieces count source rows)
        return out.fill_(float(shard_scales[0]))
    for p in plan.pieces:
        lo, hi = max(d0, p.dst_row), min(d1, p.dst_row + p.rows)
        if lo < hi:
            out[lo - d0 : hi - d0] = shard_scales[p.shard]
    return out


def _load_kept(t: _Target, c: _Chunks, src: Source, ledger: MemoryLedger, dtype: torch.dtype, device: torch.device):
    p = t.module._parameters[t.attr]
    shape = tuple(p.shape)
    out_dtype = dtype if p.dtype.is_floating_point else p.dtype
    if t.live:  # reload: into the loaded tensor itself
        dst = p
    else:
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
        if not t.live:
            t.module._parameters[t.attr] = nn.Parameter(dst, requires_grad=False)
        return finite, lambda: _raise_kept_non_finite(t, src, dst_flat, flat, width, step, out_dtype)
    if not t.live:
        t.module._parameters[t.attr] = nn.Parameter(dst, requires_grad=False)
    return None


def _raise_kept_non_finite(t: _Target, src: Source, dst_flat, flat: int, width, step: int, out_dtype) -> None:
    for d0, d1 in _chunks(flat, flat, step, per_slice=False):
        chunk = dst_flat[d0:d1]
        bad = ~torch.isfinite(chunk.reshape(d1 - d0, -1)).all(dim=1)
        if bad.any():
            row = d0 + int(bad.nonzero()[0])
            msg = first_bad(t.plan, _shift(bad.cpu(), d0, flat), src.ckpt, t.name)
            if torch.isfinite(src.rows(t.plan, row, row + 1, width, t.name)).all():  # finite on disk: overflow
                msg = msg.replace("contains NaN or Inf", f"has values too large for {str(out_dtype).removeprefix('torch.')}")
            raise CheckpointError(msg)
    raise CheckpointError(f"'{t.name}' contains NaN or Inf")


def _load_prequantized(t: _Target, c: _Chunks, src: Source, ledger: MemoryLedger, scheme: str, device: torch.device, scales: list,
                       fused: _FusedStorage | None = None) -> None:
    """FP8 rows of a pre-quantized checkpoint copied as they are into the final storage; scales placed as planned."""
    w, s, n, k, flat = _alloc_fp8(t, ledger, device, fused)
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


def stream_weights(work: list[tuple[_Target, _Chunks]], src: Source, ledger: MemoryLedger, scheme: str, dtype: torch.dtype,
                   device: torch.device, scales: dict[str, list], fused: _FusedStorage | None, progress: bool) -> tuple[int, int]:
    """Fill every target, in order, from `src` (whose schedule was built from the same `work`). Returns the
    (quantized, kept) tensor counts. NaN / Inf anywhere raises, naming the checkpoint tensor, before it returns."""
    n_quant = n_kept = 0
    checks = []  # (device flag: all finite, raises the one-line error naming the tensor)
    for t, chunks in progress_bar(work, desc="fp8stream", unit="tensor", disable=not progress, leave=False):
        if t.name in scales:
            _load_prequantized(t, chunks, src, ledger, scheme, device, scales[t.name], fused)
            n_quant += 1
        elif t.scale_attr is not None:
            checks.append(_load_quantized(t, chunks, src, ledger, scheme, device, fused))
            n_quant += 1
        else:
            checks.append(_load_kept(t, chunks, src, ledger, dtype, device))
            n_kept += 1
    checks = [c for c in checks if c is not None]
    if checks and not torch.stack([flag for flag, _ in checks]).all():  # the one sync for all of them
        next(raise_ for flag, raise_ in checks if not flag)()
    return n_quant, n_kept
