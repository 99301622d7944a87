"""Where a parameter's destination rows come from: checkpoint rows gathered through the load plan's pieces
(random rows for dummy loads), read ahead by the Prefetcher and copied to the device on a side stream."""

from __future__ import annotations

import bisect

import torch

from .checkpoint import Checkpoint
from .errors import CheckpointError
from .load_plan import TargetPlan
from .pipeline import Prefetcher, Request, read_now, row_bytes


class Source:
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
        the sources differ in dtype (rare). A transposed plan reads columns [d0, d1) of every source row."""
        if plan.transposed:  # destination rows of slice e (an expert; 0 for 2-D) = columns of source rows [e K, (e + 1) K)
            p, n, k = plan.pieces[0], plan.shape[-1], (plan.shape[-2] if len(plan.shape) >= 3 else plan.pieces[0].rows)
            e, c0 = divmod(d0, n)
            if d1 - e * n > n:
                raise CheckpointError(f"{self.ckpt.path}: internal: chunk [{d0}, {d1}) of '{name}' crosses a slice")
            return self._request(((p.key, p.src_row + e * k, p.src_row + (e + 1) * k),), (c0, d1 - e * n))
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
        if cols is not None and cols == (0, infos[0].flat_shape[1]):
            cols = None  # whole rows: one contiguous read
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
            x = self._fetch(self._schedule[self._pos])  # the next scheduled chunk: its request is known
        else:
            req = self.request(plan, d0, d1, name)
            if req is None:  # sources of one parameter in different dtypes: convert each on the host
                reads = [(p.key, p.src_row + max(d0, p.dst_row) - p.dst_row, p.src_row + min(d1, p.dst_row + p.rows) - p.dst_row)
                         for p in plan.pieces if max(d0, p.dst_row) < min(d1, p.dst_row + p.rows)]
                return torch.cat([self.ckpt.read_rows(k, a, b, plan.cols).to(self.dtype) for k, a, b in reads]).to(self.device)
            x = self._fetch(req)
        # [in rows, d1 - d0 columns] -> destination rows; the copy is staged (stream._TRANSPOSE_EXTRA)
        return x.reshape(-1, d1 - d0).t().contiguous() if plan.transposed else x

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


def first_bad(plan: TargetPlan | None, bad_rows: torch.Tensor, ckpt: Checkpoint | None, name: str) -> str:
    row = int(bad_rows.nonzero()[0, 0]) if bad_rows.any() else 0
    if plan is not None and plan.transposed:
        key = plan.pieces[0].key
        e, col = divmod(row, plan.shape[-1])
        where = f"column {col}" if len(plan.shape) < 3 else f"[{e}], column {col}"
        return f"{ckpt.tensors[key].file}: tensor '{key}' contains NaN or Inf ({where})"
    if plan is not None:
        for p in plan.pieces:
            if p.dst_row <= row < p.dst_row + p.rows:
                return f"{ckpt.tensors[p.key].file}: tensor '{p.key}' contains NaN or Inf (row {p.src_row + row - p.dst_row})"
    return f"'{name}' contains NaN or Inf"
