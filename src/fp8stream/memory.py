"""The one place that owns device memory accounting during a load.

CUDA: the peak is torch.cuda.max_memory_allocated (reset before the load), minus what was allocated
before the load began. CPU: no allocator statistics exist, so the peak is a ledger of the bytes of
every tensor the loader allocates (final storage + staging), cross-checked against the process's
anonymous RSS (RssAnon, which excludes the page cache of memory-mapped checkpoint files), sampled at
every allocation point; the report carries both.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from .errors import OutOfMemoryError


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_anon_bytes() -> int | None:
    # /proc/self/statm: resident - shared pages = RssAnon (shared = RssFile + RssShmem). One short line:
    # cheap enough to read every few milliseconds, unlike /proc/self/status.
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _cuda_allocated(device: torch.device) -> int:
    # torch.cuda.memory_allocated flattens the allocator's whole statistics dict on every call; the
    # sampler asks every few milliseconds, so read the one counter from the nested dict instead.
    try:
        return torch._C._cuda_memoryStats(device.index)["allocated_bytes"]["all"]["current"]
    except (AttributeError, KeyError, TypeError):
        return torch.cuda.memory_allocated(device)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


class MemoryLedger:
    """Tracks final (kept forever) and staging (transient) bytes and measures the device peak."""

    def __init__(self, device: torch.device, staging_bytes: int):
        self.device = device
        self.staging_bytes = staging_bytes
        self.final = 0
        self.staging = 0
        self.ledger_peak = 0
        self.rss_base = None
        self.rss_peak = 0

    def check_fits(self, final_bytes: int) -> None:
        need = final_bytes + self.staging_bytes
        free = free_bytes(self.device)
        if need > free:
            raise OutOfMemoryError(
                f"{self.device}: the FP8 model needs {gib(final_bytes)} + {gib(self.staging_bytes)} staging = {gib(need)}, "
                f"but only {gib(free)} is free"
            )

    def mark_host_base(self) -> None:
        """Take the host RSS base now (before host buffers of the load exist), if start() comes later."""
        self.rss_base = _rss_anon_bytes()

    def start(self, sampler: Sampler | None = None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.rss_base is None:
            self.rss_base = _rss_anon_bytes()
        self.sample()
        self.sampler = sampler
        if sampler is not None:
            sampler.start(self)

    def stop(self) -> None:
        if getattr(self, "sampler", None) is not None:
            self.sampler.stop()
            self.rss_peak = max(self.rss_peak, self.sampler.rss_peak - (self.rss_base or 0))

    @property
    def host_peak_bytes(self) -> int:
        """The process's anonymous RSS at its highest during the load (absolute, not a delta)."""
        return (self.rss_base or 0) + self.rss_peak

    def add_final(self, nbytes: int) -> None:
        self.final += nbytes
        self._note()

    def stage(self, nbytes: int) -> None:
        self.staging += nbytes
        self._note()

    def unstage(self, nbytes: int) -> None:
        if self.device.type == "cpu":  # the ledger is the CPU peak: cross-check RSS at every chunk
            self.sample()
        self.staging -= nbytes

    def _note(self) -> None:
        self.ledger_peak = max(self.ledger_peak, self.final + self.staging)

    def sample(self) -> None:
        rss = _rss_anon_bytes()
        if rss is not None and self.rss_base is not None:
            self.rss_peak = max(self.rss_peak, rss - self.rss_base)

    @property
    def measured_by(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "ledger of loader tensor bytes (cross-checked with RssAnon)"

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.cuda_base
        return self.ledger_peak

    def current(self) -> int:
        if self.device.type == "cuda":
            return _cuda_allocated(self.device) - self.cuda_base
        return self.final + self.staging


class Sampler:
    """Samples device memory, host anonymous RSS and bytes loaded every few milliseconds during a load
    (the data behind `--timeline`, and the host peak between the loader's own sample points)."""

    def __init__(self, device: torch.device, progress, interval_s: float = 0.005):
        self.device, self.progress, self.interval_s = device, progress, interval_s
        self.samples: list[tuple[float, int, int, int]] = []  # (seconds, device bytes, host RssAnon, bytes loaded)
        self.rss_peak = 0
        self._stop = threading.Event()

    def start(self, ledger: MemoryLedger) -> None:
        self.ledger = ledger
        self.t0 = time.perf_counter()
        self._take()  # the starting point, however short the load
        self._thread = threading.Thread(target=self._run, name="fp8stream-sampler", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        rss = _rss_anon_bytes() or 0
        self.rss_peak = max(self.rss_peak, rss)
        self.samples.append((time.perf_counter() - self.t0, self.ledger.current(), rss, self.progress.loaded_bytes))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._take()
