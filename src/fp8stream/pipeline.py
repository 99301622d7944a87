"""The reading pipeline: checkpoint byte ranges -> a bounded pool of pinned host buffers, ahead of the device.

The loader knows, before it starts, every chunk it will ask for (the schedule). A prefetch thread
walks the schedule and fills free pinned buffers with positional reads (split over the checkpoint's
reader threads); the loader takes the buffers in order, copies each to the device on the current
stream and hands it back with an event that says when that copy is done. So reads, host-to-device
copies and quantization all overlap, while host memory stays at `buffers` x chunk size.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint

Reads = tuple[tuple[str, int, int], ...]  # (checkpoint key, first flat row, end flat row)


@dataclass(frozen=True)
class Request:
    reads: Reads
    dtype: torch.dtype
    nbytes: int
    cols: tuple[int, int] | None = None  # only columns [c0, c1) of every row (tensor parallel)


class Prefetcher:
    """Fills up to `buffers` pinned host buffers ahead of the consumer, in schedule order."""

    def __init__(self, ckpt: Checkpoint, schedule: list[Request], buffers: int = 4, pinned: bool = True):
        self.ckpt, self.schedule, self.pinned = ckpt, schedule, pinned
        self._bufs: list[torch.Tensor | None] = [None] * buffers
        self._events: list = [None] * buffers
        self._free: queue.Queue = queue.Queue()
        for slot in range(buffers):
            self._free.put(slot)
        self._ready: dict[int, int] = {}
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = False
        self.pinned_bytes = 0
        self._thread = threading.Thread(target=self._run, name="fp8stream-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for i, req in enumerate(self.schedule):
                slot = self._free.get()
                if slot is None or self._stop:
                    return
                if self._events[slot] is not None:
                    self._events[slot].synchronize()  # the device has copied this buffer out
                buf = self._bufs[slot]
                if buf is None or buf.numel() < req.nbytes:
                    self._bufs[slot] = None
                    buf = self._bufs[slot] = torch.empty(req.nbytes, dtype=torch.uint8, pin_memory=self.pinned)
                    self.pinned_bytes = sum(b.numel() for b in self._bufs if b is not None)
                self.ckpt.read_into(_jobs(self.ckpt, req, buf))
                with self._cond:
                    self._ready[i] = slot
                    self._cond.notify_all()
        except BaseException as e:  # surfaces in take(); the loader stops
            with self._cond:
                self._error = e
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
        """Stop reading ahead and drop the pinned buffers (also after a failed load)."""
        self._stop = True
        self._free.put(None)
        self._thread.join()
        for event in self._events:
            if event is not None:
                event.synchronize()
        self._bufs = [None] * len(self._bufs)
        self._events = [None] * len(self._events)


def _jobs(ckpt: Checkpoint, req: Request, buf: torch.Tensor):
    jobs, at = [], 0
    for key, a, b in req.reads:
        n = (b - a) * row_bytes(ckpt.tensors[key], req.cols)
        jobs.append((key, a, b, buf[at : at + n]) + ((req.cols,) if req.cols else ()))
        at += n
    return jobs


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
    ckpt.read_into(_jobs(ckpt, req, buf))
    return host_view(ckpt, req, buf)
