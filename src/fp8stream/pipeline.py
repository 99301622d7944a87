"""The reading pipeline: checkpoint byte ranges -> a bounded pool of pinned host buffers, ahead of the device.

The loader knows, before it starts, every chunk it will ask for (the schedule). A prefetch thread
walks the schedule, places each chunk at the next free bytes of a ring of pinned buffers and queues its
positional reads on the checkpoint's reader threads, several items in flight; the loader takes the chunks in
order, copies each to the device on a copy stream and hands it back with an event that says when that copy is
done. So reads, host-to-device copies and quantization all overlap, while host memory stays at
`buffers` x the largest chunk.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint

Reads = tuple[tuple[str, int, int], ...]  # (checkpoint key, first flat row, end flat row)
# Read-ahead part size: large enough that the Python work per part (which holds the GIL) is small next
# to the copy, small enough that the reader threads share every item (raw reads from the page cache on
# the H100 host, 16 threads: 2 MiB parts 22 GB/s, 8 MiB 34 GB/s, bench/profile_load.py; whole loads with
# 12 threads: 16 MiB parts streamed fastest, the loader thread then waits less for the GIL,
# bench/trace_load.py).
PART_BYTES = 16 << 20
# Page cache read-ahead requested (posix_fadvise WILLNEED) beyond the item being dispatched: file pages,
# not process memory (RssAnon is unaffected), and evictable.
ADVISE_BYTES = 1 << 30
# Where items start inside a ring buffer: typed views and vectorized copies need aligned rows.
ITEM_ALIGN = 256


@dataclass(frozen=True)
class Request:
    reads: Reads
    dtype: torch.dtype
    nbytes: int
    cols: tuple[int, int] | None = None  # only columns [c0, c1) of every row (tensor parallel)


class Prefetcher:
    """Fills a ring of `buffers` pinned host buffers ahead of the consumer, in schedule order.

    A dispatcher thread places each schedule item, in order, at the next free bytes of the ring (an item
    that does not fit in the rest of the current buffer starts the next one, once every item in that
    buffer has been copied out) and queues the item's parts (at most `part_size` bytes each) on the
    checkpoint's reader pool, so the reads of several items are in flight at once and no reader waits
    for the slowest part of one item. The last part of an item to land makes it ready. Items are placed
    by bytes, not one per buffer: a run of small tensors (biases, norms, routers) shares a buffer, and the
    rest of the pool keeps reading the big ones behind it.
    """

    def __init__(self, ckpt: Checkpoint, schedule: list[Request], buffers: int = 8, pinned: bool = True,
                 part_size: int = PART_BYTES, device: torch.device | None = None):
        self.ckpt, self.schedule, self.pinned, self.part_size, self.device = ckpt, schedule, pinned, part_size, device
        self._slot_bytes = max((r.nbytes for r in schedule), default=0)
        self._bufs: list[torch.Tensor | None] = [None] * buffers
        self._events: list = [None] * buffers  # per buffer: the copy-out of the last item released from it
        self._live = [0] * buffers  # per buffer: items placed in it and not yet released
        self._ready: dict[int, int] = {}
        self._rows: dict[int, torch.Tensor] = {}  # item -> its buffer viewed as rows of its dtype
        self._left: dict[int, int] = {}  # item -> parts still being read
        self._in_flight = 0  # parts submitted and not finished (close() waits for them)
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = False
        self.pinned_bytes = 0
        self._registered: list[torch.Tensor] = []
        self._thread = threading.Thread(target=self._run, name="fp8stream-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        advised, advised_bytes = 0, 0  # items [0, advised) have been advised to the kernel
        slot, at = -1, 0  # the ring buffer being filled, and its next free byte
        try:
            if self.pinned and self.device is not None:
                # this thread registers the pool and waits on copy events: on the load's device, else CUDA would use
                # (and first create) a context on device 0, also in a process that loads onto another GPU
                torch.cuda.set_device(self.device)
            for i, req in enumerate(self.schedule):
                # keep the kernel reading ADVISE_BYTES beyond what the pool holds (cold disks)
                while advised < len(self.schedule) and advised_bytes < ADVISE_BYTES:
                    if self.schedule[advised].cols is None:  # column slices: no whole-row advice (other ranks' bytes)
                        self.ckpt.advise(self.schedule[advised].reads)
                    advised_bytes += self.schedule[advised].nbytes
                    advised += 1
                advised_bytes -= req.nbytes
                if slot < 0 or at + req.nbytes > self._slot_bytes:  # start the next buffer of the ring
                    slot, at = (slot + 1) % len(self._bufs), 0
                    with self._cond:
                        while self._live[slot] and not self._stop and self._error is None:
                            self._cond.wait()  # the loader has not taken every item placed here yet
                    if self._stop or self._error is not None:
                        return
                    if self._events[slot] is not None:
                        self._events[slot].synchronize()  # the device has copied this buffer out
                        self._events[slot] = None
                    if self._bufs[slot] is None:  # every buffer fits the largest item: pinned once
                        self._bufs[slot] = self._new_buffer()
                        self.pinned_bytes = sum(b.numel() for b in self._bufs if b is not None)
                buf = self._bufs[slot][at : at + req.nbytes]
                at += -(-req.nbytes // ITEM_ALIGN) * ITEM_ALIGN
                jobs = self.ckpt.parts(_reads(self.ckpt, req, buf), self.part_size)
                self.ckpt.count_read(req.nbytes)
                rows = host_view(self.ckpt, req, buf)  # here, not on the loader thread's critical path
                with self._cond:
                    self._live[slot] += 1
                    self._rows[i] = rows
                    self._left[i] = len(jobs)
                    self._in_flight += len(jobs)
                    if not jobs:
                        self._ready[i] = slot
                        self._cond.notify_all()
                for job in jobs:
                    self.ckpt.submit(job, lambda error, i=i, slot=slot: self._landed(error, i, slot))
        except BaseException as e:  # surfaces in take(); the loader stops
            with self._cond:
                self._error = self._error or e
                self._cond.notify_all()

    def _new_buffer(self) -> torch.Tensor:
        """One pool buffer. Pinned by faulting its pages in first (torch's parallel zero_, all cores) and then
        registering exactly its bytes with CUDA: 8 x 49 MiB took 0.05 s this way vs 0.24 s with
        cudaHostAlloc (pin_memory=True), with the same host->device copy speed (bench/pin_cost.py, H100);
        and the memory goes back to the system after the load instead of into torch's pinned cache."""
        if not self.pinned:
            return torch.empty(self._slot_bytes, dtype=torch.uint8)
        buf = torch.empty(self._slot_bytes, dtype=torch.uint8).zero_()
        if int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)) != 0:
            return torch.empty(self._slot_bytes, dtype=torch.uint8, pin_memory=True)  # cudaHostAlloc instead
        self._registered.append(buf)
        return buf

    def _landed(self, error: BaseException | None, i: int, slot: int) -> None:
        with self._cond:
            self._in_flight -= 1
            wake = error is not None or self._in_flight == 0  # take() / close() have something to see
            if error is not None:
                self._error = self._error or error
            else:
                self._left[i] -= 1
                if self._left[i] == 0:
                    del self._left[i]
                    self._ready[i] = slot
                    wake = True
            if wake:  # not on every part: a woken loader thread only competes with the readers for the GIL
                self._cond.notify_all()

    def take(self, i: int) -> tuple[torch.Tensor, int]:
        """Schedule item i's rows (a view into its filled buffer; blocks until it is read), and that buffer's
        slot, to be released once the rows have been copied out."""
        with self._cond:
            while i not in self._ready and self._error is None:
                self._cond.wait()
            if self._error is not None and i not in self._ready:
                raise self._error
            slot = self._ready.pop(i)
            rows = self._rows.pop(i)
        return rows, slot

    def release(self, slot: int, event) -> None:
        """The item taken last from `slot` is copied out once `event` (None: already) is done. Items are
        released in schedule order and their copies run in order on one stream, so the last event of a
        buffer covers all of its items."""
        with self._cond:
            self._events[slot] = event
            self._live[slot] -= 1
            if not self._live[slot]:
                self._cond.notify_all()

    def close(self) -> None:
        """Stop reading ahead and drop the pinned buffers (also after a failed load), once no reader
        thread can still write into them."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        self.ckpt.cancel_pending()  # after an error or Ctrl-C: the reads not started yet are not waited for
        with self._cond:
            while self._in_flight:
                self._cond.wait()
        for event in self._events:
            if event is not None:
                event.synchronize()
        for buf in self._registered:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        self._registered = []
        self._bufs = [None] * len(self._bufs)
        self._events = [None] * len(self._events)


def _reads(ckpt: Checkpoint, req: Request, buf: torch.Tensor):
    reads, at = [], 0
    for key, a, b in req.reads:
        n = (b - a) * row_bytes(ckpt.tensors[key], req.cols)
        reads.append((key, a, b, buf[at : at + n]) + ((req.cols,) if req.cols else ()))
        at += n
    return reads


def row_bytes(info, cols: tuple[int, int] | None) -> int:
    """Bytes of one flat row as read: the whole row, or its columns [c0, c1)."""
    return info.row_bytes if cols is None else (cols[1] - cols[0]) * info.dtype.itemsize


def host_view(ckpt: Checkpoint, req: Request, buf: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a request as rows of its dtype ([rows, width], [rows] for 1-D, a scalar)."""
    info = ckpt.tensors[req.reads[0][0]]
    rows = sum(b - a for _, a, b in req.reads)
    width = (req.cols[1] - req.cols[0],) if req.cols else info.flat_shape[1:]
    return buf[: req.nbytes].view(req.dtype).reshape((rows, *width) if info.shape else ())


def read_now(ckpt: Checkpoint, req: Request) -> torch.Tensor:
    """Synchronous read into a fresh (pageable) buffer: the CPU path, and off-schedule re-reads."""
    buf = torch.empty(req.nbytes, dtype=torch.uint8)
    ckpt.read_into(_reads(ckpt, req, buf))
    return host_view(ckpt, req, buf)
