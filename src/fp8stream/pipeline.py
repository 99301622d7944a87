"""The reading pipeline: checkpoint byte ranges -> a bounded pool of pinned host buffers, ahead of the device.

The loader knows, before it starts, every chunk it will ask for (the schedule). A prefetch thread
walks the schedule and queues positional reads into free pinned buffers on the checkpoint's reader
threads, several items in flight; the loader takes the buffers in order, copies each to the device on the current
stream and hands it back with an event that says when that copy is done. So reads, host-to-device
copies and quantization all overlap, while host memory stays at `buffers` x chunk size.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .errors import Fp8StreamError
from .readers import ReaderProcs

log = logging.getLogger("fp8stream")

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
_PAGE = 4096


@dataclass(frozen=True)
class Request:
    reads: Reads
    dtype: torch.dtype
    nbytes: int
    cols: tuple[int, int] | None = None  # only columns [c0, c1) of every row (tensor parallel)


class Prefetcher:
    """Fills up to `buffers` pinned host buffers ahead of the consumer, in schedule order.

    A dispatcher thread gives each schedule item, in order, the next free buffer and queues the item's
    parts (at most `part_size` bytes each) on the checkpoint's reader pool, so the reads of several
    items are in flight at once and no reader waits for the slowest part of one item. The last part
    of an item to land makes it ready.

    `read_procs` > 0: the buffers are slots of one shared-memory region and the whole-row parts are read
    by that many reader processes (readers.py), which never take this process's GIL; column slices
    (tensor parallel) still go to the reader threads. With `pinned`, each slot is page-locked
    (cudaHostRegister) the first time it is used, as the thread path pins each buffer once.
    """

    def __init__(self, ckpt: Checkpoint, schedule: list[Request], buffers: int = 8, pinned: bool = True,
                 part_size: int = PART_BYTES, read_procs: int = 0, device: torch.device | None = None):
        self.ckpt, self.schedule, self.pinned, self.part_size = ckpt, schedule, pinned, part_size
        self._slot_bytes = max((r.nbytes for r in schedule), default=0)
        self._bufs: list[torch.Tensor | None] = [None] * buffers
        self._events: list = [None] * buffers
        self._free: queue.Queue = queue.Queue()
        for slot in range(buffers):
            self._free.put(slot)
        self._ready: dict[int, int] = {}
        self._left: dict[int, int] = {}  # item -> parts still being read
        self._in_flight = 0  # parts submitted to the reader threads and not finished (close() waits for them)
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = False
        self.pinned_bytes = 0
        self.device = device
        self._procs: ReaderProcs | None = None
        self._used = [False] * buffers  # procs: slots handed out (and registered, when pinned)
        self._registered: list[int] = []  # procs: data_ptr of every slot registered with CUDA
        if read_procs > 0 and self._slot_bytes and any(r.cols is None for r in schedule):
            self._start_procs(read_procs, buffers)
        self._thread = threading.Thread(target=self._run, name="fp8stream-prefetch", daemon=True)
        self._thread.start()

    @property
    def read_procs(self) -> int:
        """Reader processes serving this pool (0: reader threads only)."""
        return len(self._procs.procs) if self._procs is not None else 0

    def _start_procs(self, procs: int, buffers: int) -> None:
        self._stride = -(-self._slot_bytes // _PAGE) * _PAGE  # slots page-aligned: registered one by one
        self._files = {f: n for n, f in enumerate(self.ckpt.files)}
        fds = [self.ckpt.fileno(f) for f in self.ckpt.files]
        try:
            self._procs = ReaderProcs(fds, buffers * self._stride, procs, self._part_done, name=str(self.ckpt.path))
        except OSError as e:
            raise Fp8StreamError(f"{self.ckpt.path}: cannot start {procs} reader processes ({e.strerror or e}); "
                                 "load with read_procs=0 (--read-procs 0) to read with threads") from None
        try:
            region = torch.frombuffer(self._procs.mm, dtype=torch.uint8)
        except BaseException:
            self._procs.close_readers()
            self._procs.unmap()
            raise
        self._bufs = [region[s * self._stride : s * self._stride + self._slot_bytes] for s in range(buffers)]

    def _run(self) -> None:
        advised, advised_bytes = 0, 0  # items [0, advised) have been advised to the kernel
        try:
            for i, req in enumerate(self.schedule):
                # keep the kernel reading ADVISE_BYTES beyond what the pool holds (cold disks)
                while advised < len(self.schedule) and advised_bytes < ADVISE_BYTES:
                    if self.schedule[advised].cols is None:  # column slices: no whole-row advice (other ranks' bytes)
                        self.ckpt.advise(self.schedule[advised].reads)
                    advised_bytes += self.schedule[advised].nbytes
                    advised += 1
                advised_bytes -= req.nbytes
                slot = self._free.get()
                if slot is None or self._stop or self._error is not None:
                    return
                if self._events[slot] is not None:
                    self._events[slot].synchronize()  # the device has copied this buffer out
                if self._procs is not None:
                    if not self._used[slot]:
                        self._first_use(slot)
                elif self._bufs[slot] is None:  # every buffer fits the largest item: pinned once
                    self._bufs[slot] = torch.empty(self._slot_bytes, dtype=torch.uint8, pin_memory=self.pinned)
                    self.pinned_bytes = sum(b.numel() for b in self._bufs if b is not None)
                if self._procs is not None and req.cols is None:
                    parts = self._proc_parts(req, i, slot)
                    self._begin(i, slot, req, len(parts), threads=False)
                    self._procs.submit(parts)
                else:
                    jobs = self.ckpt.parts(_reads(self.ckpt, req, self._bufs[slot]), self.part_size)
                    self._begin(i, slot, req, len(jobs), threads=True)
                    for job in jobs:
                        self.ckpt.submit(job).add_done_callback(lambda f, i=i, slot=slot: self._landed(f, i, slot))
        except BaseException as e:  # surfaces in take(); the loader stops
            with self._cond:
                self._error = self._error or e
                self._cond.notify_all()

    def _begin(self, i: int, slot: int, req: Request, parts: int, threads: bool) -> None:
        self.ckpt.count_read(req.nbytes)
        with self._cond:
            self._left[i] = parts
            if threads:
                self._in_flight += parts
            if not parts:
                self._ready[i] = slot
                self._cond.notify_all()

    def _first_use(self, slot: int) -> None:
        """procs: a region slot's first use; pinned, page-lock it for DMA (CUDA only)."""
        if self.pinned:
            ptr = self._bufs[slot].data_ptr()
            err = _cuda_call(self.device, "cudaHostRegister", ptr, self._stride, 1)  # 1: cudaHostRegisterPortable
            if err != 0:
                raise Fp8StreamError(f"{self.ckpt.path}: cudaHostRegister of a {self._stride / 2**20:.1f} MiB read-ahead buffer failed "
                                     f"(cudaError {err}); load with read_procs=0 (--read-procs 0) to use pinned buffers instead")
            self._registered.append(ptr)
        self._used[slot] = True
        self.pinned_bytes = self._stride * sum(self._used)

    def _proc_parts(self, req: Request, i: int, slot: int) -> list[tuple]:
        """The item's whole-row reads as reader-process parts (tag, info, file index, offset, bytes, region offset)."""
        parts, at = [], slot * self._stride
        for key, a, b in req.reads:
            info = self.ckpt.tensors[key]
            begin, nbytes = info.offset + a * info.row_bytes, (b - a) * info.row_bytes
            for part in range(0, nbytes, self.part_size):
                parts.append(((i, slot), info, self._files[info.file], begin + part, min(self.part_size, nbytes - part), at + part))
            at += nbytes
        return parts

    def _landed(self, future, i: int, slot: int) -> None:
        with self._cond:
            self._in_flight -= 1
        self._part_done((i, slot), future.exception())

    def _part_done(self, tag, error: BaseException | None) -> None:
        with self._cond:
            if error is not None:
                self._error = self._error or error
            else:
                i, slot = tag
                self._left[i] -= 1
                if self._left[i] == 0:
                    del self._left[i]
                    self._ready[i] = slot
            self._cond.notify_all()

    def take(self, i: int) -> tuple[torch.Tensor, int]:
        """The filled buffer of schedule item i (blocks until it is read), and its slot."""
        with self._cond:
            while i not in self._ready and self._error is None:
                self._cond.wait()
            if self._error is not None and i not in self._ready:
                raise self._error
            slot = self._ready.pop(i)
        return self._bufs[slot][: self.schedule[i].nbytes], slot

    def release(self, slot: int, event) -> None:
        self._events[slot] = event
        self._free.put(slot)

    def close(self) -> None:
        """Stop reading ahead and drop the pinned buffers (also after a failed load), once no reader
        thread or process can still write into them."""
        self._stop = True
        self._free.put(None)
        self._thread.join()
        with self._cond:
            while self._in_flight:
                self._cond.wait()
        if self._procs is not None:
            self._procs.close_readers()  # every reader process stopped and reaped: none writes any more
        for event in self._events:
            if event is not None:
                event.synchronize()  # no copy reads the buffers any more
        for ptr in self._registered:
            err = _cuda_call(self.device, "cudaHostUnregister", ptr)
            if err != 0:
                log.warning("cudaHostUnregister of a read-ahead buffer failed (cudaError %d)", err)
        self._registered = []
        self._bufs = [None] * len(self._bufs)
        self._events = [None] * len(self._events)
        if self._procs is not None:
            self._procs.unmap()
            self._procs = None


def _cuda_call(device: torch.device | None, name: str, *args) -> int:
    """A cudart call (torch.cuda.cudart()) on `device`, in a thread of its own: a failure sets CUDA's
    per-thread last error, which would otherwise make the loader thread's next kernel launch check
    raise it. Returns the cudaError code (0: success). Portable registration (flag 1), as torch's own
    shared-memory pinning, so the pages count as pinned for every context."""
    out = []

    def call():
        try:
            with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
                out.append(int(getattr(torch.cuda.cudart(), name)(*args)))
        except BaseException as e:  # raised again by the caller
            out.append(e)

    t = threading.Thread(target=call, name="fp8stream-cudart")
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


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
