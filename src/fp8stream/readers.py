"""Reader processes: contiguous checkpoint reads done outside this process, so they never take its GIL.

The read-ahead pool is one shared-memory region (memfd + mmap). Each reader process (_read_worker.py,
run by file path under `python -I -S`: no torch, no site-packages, started in milliseconds) maps it,
inherits the checkpoint's open files, and answers fixed-size jobs on its stdin ("read these bytes of
file k at offset o into the region at offset r") with fixed-size replies on its stdout. One thread of
this process waits on every reader's replies (select releases the GIL) and reports each finished job.
"""

from __future__ import annotations

import logging
import mmap
import os
import selectors
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from ._read_worker import JOB, REPLY
from .errors import CheckpointError

log = logging.getLogger("fp8stream")

WORKER = Path(__file__).with_name("_read_worker.py")


class ReaderProcs:
    """`procs` reader processes over one shared region of `region_bytes` bytes (`mm`).

    `submit` queues parts (tag, TensorInfo, file index into `fds`, file offset, bytes, region offset);
    `done(tag, error)` is called (on the reply thread) once per finished part with error None, or with
    a one-line CheckpointError naming the file and tensor when the read failed or its reader process
    died (then `tag` may be None: a reader died with no part in flight).
    """

    def __init__(self, fds: list[int], region_bytes: int, procs: int, done: Callable, name: str = "fp8stream"):
        self.done, self.name = done, name
        self.procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._jobs: dict[int, tuple] = {}  # job id -> (child, tag, info, nbytes)
        self._next_job = 0
        self._load: list[int] = []  # parts in flight per child
        self._turn = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        fd = os.memfd_create("fp8stream-read-ahead", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, region_bytes)
            self.mm = mmap.mmap(fd, region_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            argv = [sys.executable, "-I", "-S", str(WORKER), str(fd), str(region_bytes), *map(str, fds)]
            for _ in range(procs):
                self.procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                                   pass_fds=(fd, *fds)))
                self._load.append(0)
        except BaseException:
            self.close_readers()
            self.unmap()
            raise
        finally:
            os.close(fd)  # the mapping (and each child's) keeps the region
        self._thread = threading.Thread(target=self._replies, name="fp8stream-read-replies", daemon=True)
        self._thread.start()

    def submit(self, parts: list[tuple]) -> None:
        """Queue parts on the least busy readers (one write per reader)."""
        out: dict[int, list[bytes]] = {}
        with self._lock:
            for tag, info, file, offset, nbytes, at in parts:
                n = len(self.procs)
                child = min(range(n), key=lambda k: (self._load[k], (k - self._turn) % n))
                self._turn = (child + 1) % n
                job = self._next_job
                self._next_job += 1
                self._jobs[job] = (child, tag, info, nbytes)
                self._load[child] += 1
                out.setdefault(child, []).append(JOB.pack(job, file, offset, nbytes, at))
        for child, records in out.items():
            data = memoryview(b"".join(records))
            try:
                while data:
                    data = data[os.write(self.procs[child].stdin.fileno(), data):]
            except OSError:  # the reader is gone (its death is also reported by the reply thread)
                info = parts[0][1]
                raise CheckpointError(f"{info.file}: cannot read tensor '{info.key}' ({self._gone(child)})") from None

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._jobs)

    def _gone(self, child: int) -> str:
        p = self.procs[child]
        try:
            rc = p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return f"reader process {p.pid} stopped answering"
        if rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = f"signal {-rc}"
            return f"reader process {p.pid} was killed by {sig}"
        return f"reader process {p.pid} exited with status {rc}"

    def _replies(self) -> None:
        sel = selectors.DefaultSelector()
        pending = {}
        for child, p in enumerate(self.procs):
            sel.register(p.stdout.fileno(), selectors.EVENT_READ, child)
            pending[child] = b""
        try:
            while sel.get_map():
                for key, _ in sel.select():
                    child = key.data
                    data = os.read(key.fd, 4096 * REPLY.size)
                    if not data:
                        sel.unregister(key.fd)
                        if not self._closing:
                            self._died(child)
                        continue
                    data = pending[child] + data
                    whole = len(data) - len(data) % REPLY.size
                    pending[child] = data[whole:]
                    for job, err, got in REPLY.iter_unpack(data[:whole]):
                        self._finish(job, err, got)
        except BaseException as e:  # a bug here must not hang the loader: report it
            self.done(None, e)
        finally:
            sel.close()

    def _finish(self, job: int, err: int, got: int) -> None:
        with self._lock:
            child, tag, info, nbytes = self._jobs.pop(job)
            self._load[child] -= 1
        error = None
        if err:
            error = CheckpointError(f"{info.file}: cannot read tensor '{info.key}' ({os.strerror(err)})")
        elif got < nbytes:
            error = CheckpointError(f"{info.file}: ends inside tensor '{info.key}' (file truncated while loading?)")
        self.done(tag, error)

    def _died(self, child: int) -> None:
        how = self._gone(child)
        with self._lock:
            lost = [(job, rec) for job, rec in self._jobs.items() if rec[0] == child]
            for job, _ in lost:
                del self._jobs[job]
            self._load[child] = 0
        if not lost:
            self.done(None, CheckpointError(f"{self.name}: {how} during the load"))
        for _, (_, tag, info, _) in lost:
            self.done(tag, CheckpointError(f"{info.file}: cannot read tensor '{info.key}' ({how})"))

    def close_readers(self) -> None:
        """Stop every reader and reap it (killed if parts are still in flight: a failed load). Idempotent."""
        self._closing = True
        kill = self.in_flight > 0
        for p in self.procs:
            if kill and p.poll() is None:
                p.kill()
            p.stdin.close()  # EOF: an idle reader exits
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._thread is not None:
            self._thread.join()  # every reader's stdout has reached EOF
        for p in self.procs:
            p.stdout.close()

    def unmap(self) -> None:
        """Unmap this process's view of the region (after close_readers, once nothing here uses it)."""
        mm = getattr(self, "mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view of the region is still referenced: unmapped when it goes
                log.debug("read-ahead region still referenced at close; unmapped with its last view")
