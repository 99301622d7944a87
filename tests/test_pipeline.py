"""The reading pipeline: positional byte-range reads, the read-ahead pool, errors in reader threads, the timeline."""

import itertools
import json
import os
import re
import signal
import threading

import pytest
import torch
from safetensors.torch import save_file

import fp8stream
from fp8stream import loader
from fp8stream.checkpoint import Checkpoint
from fp8stream.errors import CheckpointError
from fp8stream.pipeline import Prefetcher, Request, host_view
from tiny_models import make_checkpoint


def _fp8stream_threads():
    return [t for t in threading.enumerate() if t.name.startswith("fp8stream")]


@pytest.fixture()
def two_tensor_ckpt(tmp_path):
    a = torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48).to(torch.bfloat16)
    b = torch.randn(3, 40, 32, dtype=torch.float16)
    save_file({"a": a, "b": b, "c": torch.ones(7)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    return Checkpoint(tmp_path, read_threads=4), {"a": a, "b": b}


def test_byte_ranges_are_exact_rows(two_tensor_ckpt):
    ckpt, ref = two_tensor_ckpt
    assert torch.equal(ckpt.read_rows("a", 5, 17), ref["a"][5:17])
    # a 3-D tensor reads as flat rows [E * rows, width], across the expert boundary
    assert torch.equal(ckpt.read_rows("b", 35, 85), ref["b"].reshape(-1, 32)[35:85])
    assert torch.equal(ckpt.read_rows("c", 2, 5), torch.ones(3))
    ckpt.close()


def test_column_slices_narrow_and_wide(tmp_path, monkeypatch):
    """A tensor-parallel rank's column slice: narrow gaps are read as one span per job and gathered,
    wide gaps as one read per row segment; both give exactly the columns."""
    narrow = torch.randn(300, 48).to(torch.bfloat16)  # 96-byte rows: gap < a page
    wide = torch.randn(40, 4096)  # 16 KiB rows, 400-byte segment: gap > a page
    save_file({"n": narrow, "w": wide}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint(tmp_path, read_threads=3)
    used = []
    for name in ("_pread_span", "_pread_rows"):
        real = getattr(Checkpoint, name)
        monkeypatch.setattr(Checkpoint, name, lambda self, *a, _real=real, _name=name: used.append(_name) or _real(self, *a))
    assert torch.equal(ckpt.read_rows("n", 7, 299, cols=(10, 30)), narrow[7:299, 10:30])
    assert set(used) == {"_pread_span"}
    used.clear()
    assert torch.equal(ckpt.read_rows("w", 3, 40, cols=(100, 200)), wide[3:40, 100:200])
    assert set(used) == {"_pread_rows"}
    ckpt.close()


def test_large_read_is_split_across_threads_and_reassembled(tmp_path, monkeypatch):

    x = torch.randn(8192, 1024)  # 32 MiB: split into >= 4 MiB parts over the reader threads
    save_file({"x": x}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint(tmp_path, read_threads=4)
    parts, seen = [], set()
    real = Checkpoint._pread
    two_at_once = threading.Barrier(2, timeout=10)  # the first two parts must be in flight together
    calls = itertools.count()

    def spy(self, info, offset, view):
        nth = next(calls)  # atomic: exactly the first two calls wait
        parts.append((offset, len(view)))
        seen.add(threading.current_thread().name)
        if nth < 2:
            two_at_once.wait()
        return real(self, info, offset, view)

    monkeypatch.setattr(Checkpoint, "_pread", spy)
    assert torch.equal(ckpt.read_rows("x", 3, 8191), x[3:8191])
    assert len(parts) >= 4 and len(seen) > 1
    parts.sort()
    for (o1, n1), (o2, _) in zip(parts, parts[1:]):
        assert o1 + n1 == o2  # contiguous, no gaps or overlaps
    ckpt.close()
    assert not _fp8stream_threads()


def test_prefetcher_serves_requests_in_order_with_a_small_pool(two_tensor_ckpt):
    ckpt, ref = two_tensor_ckpt
    reqs = [Request((("a", i, i + 8),), torch.bfloat16, 8 * 48 * 2) for i in range(0, 64, 8)]
    reqs.append(Request((("a", 60, 64), ("b", 0, 4)), torch.bfloat16, 0))  # mixed dtypes never reach it; see below
    reqs.pop()
    reqs.append(Request((("b", 38, 42),), torch.float16, 4 * 32 * 2))  # crosses an expert boundary
    pf = Prefetcher(ckpt, reqs, buffers=2, pinned=False)
    for i, req in enumerate(reqs):
        buf, slot = pf.take(i)
        got = host_view(ckpt, req, buf).clone()
        pf.release(slot, None)
        want = ref["a"][i * 8 : i * 8 + 8] if i < 8 else ref["b"].reshape(-1, 32)[38:42]
        assert torch.equal(got, want), i
    pf.close()
    ckpt.close()
    assert not _fp8stream_threads()


def test_prefetcher_reads_several_items_at_once_in_small_parts(two_tensor_ckpt, monkeypatch):
    """Items are cut into parts on the reader pool, several items in flight; each is reassembled exactly,
    and closing drops every buffer only after the readers are done."""
    ckpt, ref = two_tensor_ckpt
    reqs = [Request((("a", i, i + 16),), torch.bfloat16, 16 * 48 * 2) for i in range(0, 64, 16)]
    real = Checkpoint._pread
    both = threading.Barrier(2, timeout=10)  # a part of item 0 and a part of item 1 must overlap
    calls, later_calls = itertools.count(), itertools.count()

    def spy(self, info, offset, view):
        # the first part of item 0 waits until a part of a later item is being read: that only happens
        # if items are in flight together (else the barrier times out and the load fails)
        if next(calls) == 0 or (offset >= ckpt.tensors["a"].offset + 16 * 96 and next(later_calls) == 0):
            both.wait()
        return real(self, info, offset, view)

    monkeypatch.setattr(Checkpoint, "_pread", spy)
    pf = Prefetcher(ckpt, reqs, buffers=3, pinned=False, part_size=500)  # 1536-byte items: 4 parts each
    for i, req in enumerate(reqs):
        buf, slot = pf.take(i)
        assert torch.equal(host_view(ckpt, req, buf), ref["a"][i * 16 : i * 16 + 16]), i
        pf.release(slot, None)
    pf.close()
    assert pf._bufs == [None] * 3 and pf._in_flight == 0
    ckpt.close()
    assert not _fp8stream_threads()


def test_prefetcher_advises_the_kernel_ahead_of_reading(two_tensor_ckpt, monkeypatch):
    """Cold disks: every whole-row item is advised (POSIX_FADV_WILLNEED) no later than it is read, in
    schedule order; column slices (another rank's bytes in between) are not."""
    ckpt, _ = two_tensor_ckpt
    events = []
    real_advise, real_pread = Checkpoint.advise, Checkpoint._pread
    monkeypatch.setattr(Checkpoint, "advise", lambda self, reads: events.append(("advise", tuple(reads))) or real_advise(self, reads))
    monkeypatch.setattr(Checkpoint, "_pread", lambda self, info, off, view: events.append(("read", info.key)) or real_pread(self, info, off, view))
    reqs = [Request((("a", i, i + 16),), torch.bfloat16, 16 * 48 * 2) for i in range(0, 64, 16)]
    reqs.append(Request((("a", 0, 8),), torch.bfloat16, 8 * 10 * 2, cols=(4, 14)))
    pf = Prefetcher(ckpt, reqs, buffers=2, pinned=False)
    for i in range(len(reqs)):
        _, slot = pf.take(i)
        pf.release(slot, None)
    pf.close()
    ckpt.close()
    advised = [e[1] for e in events if e[0] == "advise"]
    assert advised == [r.reads for r in reqs[:4]]  # whole rows, in order; the column slice is not advised
    first_read = next(i for i, e in enumerate(events) if e[0] == "read")
    assert all(e[0] == "advise" for e in events[:first_read]) and first_read >= 4  # 1 GiB window: all ahead


def test_host_memory_stays_at_the_pool_on_a_checkpoint_much_larger_than_it(tmp_path):
    """96 MiB read through a pool of 2 x 1 MiB buffers: the process's anonymous memory grows by about
    the pool, not the checkpoint (positional reads into the pool, nothing memory-mapped or kept)."""
    from fp8stream.memory import _rss_anon_bytes

    rows, width = 24 * 1024, 1024  # float32: 96 MiB, 4 KiB rows
    save_file({"x": torch.arange(rows, dtype=torch.float32).repeat_interleave(width).view(rows, width)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint(tmp_path, read_threads=4)
    step = 256  # 1 MiB requests
    reqs = [Request((("x", r, r + step),), torch.float32, step * width * 4) for r in range(0, rows, step)]
    base = _rss_anon_bytes()
    peak, seen = 0, 0
    pf = Prefetcher(ckpt, reqs, buffers=2, pinned=False, part_size=256 << 10)
    for i, req in enumerate(reqs):
        buf, slot = pf.take(i)
        got = host_view(ckpt, req, buf)
        assert got[0, 0] == i * step and got[-1, -1] == i * step + step - 1  # the right rows arrived
        seen += req.nbytes
        peak = max(peak, _rss_anon_bytes() - base)
        pf.release(slot, None)
    pf.close()
    ckpt.close()
    assert seen == rows * width * 4
    assert peak < 2 * (1 << 20) + (24 << 20), peak  # the pool (2 MiB) + slack for the interpreter, far below 96 MiB


def test_prefetch_path_gives_the_same_model(tmp_path, monkeypatch):
    """Forcing the read-ahead pipeline on the CPU (it normally runs for CUDA) changes nothing in the model."""
    path, _ = make_checkpoint("qwen2_moe", tmp_path / "m", max_shard_size="100KB")
    plain = fp8stream.load(path, device="cpu", staging_mib=0.3, progress=False)

    def start(self, schedule):
        self._schedule = [r for r in schedule if r is not None]
        self._prefetcher = Prefetcher(self.ckpt, self._schedule, 2, pinned=False)

    monkeypatch.setattr(loader._Source, "start", start)
    took = []
    real_take = Prefetcher.take
    monkeypatch.setattr(Prefetcher, "take", lambda self, i: took.append(i) or real_take(self, i))
    piped = fp8stream.load(path, device="cpu", staging_mib=0.3, progress=False)
    assert len(took) > 20 and took == sorted(took)  # every read came from the pipeline, in schedule order
    for (n, a), (_, b) in zip(plain.state_dict().items(), piped.state_dict().items()):
        a = a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a
        b = b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b
        assert torch.equal(a, b), n
    assert not _fp8stream_threads()


def test_error_in_a_reader_thread_is_clean_and_stops_everything(tmp_path, monkeypatch):
    path, _ = make_checkpoint("llama", tmp_path / "m", max_shard_size="100KB")

    def start(self, schedule):
        self._schedule = [r for r in schedule if r is not None]
        self._prefetcher = Prefetcher(self.ckpt, self._schedule, 2, pinned=False)

    monkeypatch.setattr(loader._Source, "start", start)
    real = Checkpoint._pread

    def failing(self, info, offset, view):
        if "layers.1.mlp.up_proj" in info.key:
            raise CheckpointError(f"{info.file}: cannot read tensor '{info.key}' (Input/output error)")
        return real(self, info, offset, view)

    monkeypatch.setattr(Checkpoint, "_pread", failing)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj.*Input/output error") as e:
        fp8stream.load(path, device="cpu", progress=False)
    assert "\n" not in str(e.value)
    assert not _fp8stream_threads()  # prefetch thread and reader pool are gone


def test_timeline_png_and_json(tmp_path):
    path, _ = make_checkpoint("llama", tmp_path / "m")
    png = tmp_path / "timeline.png"
    model = fp8stream.load(path, device="cpu", progress=False, timeline=png)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(png.with_suffix(".json").read_text())
    assert data["columns"] == ["seconds", "device_bytes", "host_rss_anon_bytes", "loaded_bytes"]
    rep = model.fp8stream_report
    assert data["lines"]["final_bytes"] == rep.final_bytes
    assert len(data["samples"]) >= 2
    loaded = [s[3] for s in data["samples"]]
    assert loaded == sorted(loaded) and loaded[-1] == sum(i.nbytes for i in Checkpoint(path).tensors.values())
    assert max(s[1] for s in data["samples"]) <= rep.final_bytes + rep.staging_bytes
    assert rep.host_peak_bytes >= max(s[2] for s in data["samples"])


# --- reader processes (read_procs): the same pool, whole-row reads done by child processes -------------


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def _gone(procs):
    """Every reader process exited and was reaped (a zombie still has its /proc entry)."""
    return all(p.returncode is not None and not os.path.exists(f"/proc/{p.pid}") for p in procs)


def _in_thread(fn, timeout=60):
    """fn() in a thread; (result or exception) — the test fails instead of hanging if it does not finish."""
    out = []

    def run():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: B902 — handed to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"did not finish in {timeout} s"
    return out[0]


@pytest.fixture()
def sharded_ckpt(tmp_path):
    """Two shard files, a 2-D, a 3-D and a 1-D tensor: parts cross tensor and file boundaries."""
    a = torch.randn(300, 40).to(torch.bfloat16)
    b = torch.randn(4, 50, 24, dtype=torch.float16)
    c = torch.randn(900)
    save_file({"a": a, "c": c}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": b}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text("{}")
    return tmp_path, {"a": a, "b": b.reshape(-1, 24), "c": c}


def test_reader_processes_deliver_exact_bytes_many_items_in_flight(sharded_ckpt, monkeypatch):
    """Whole-row items of both shards in small parts over 3 reader processes, 4 buffers: every item arrives
    exactly; the column slice goes to the reader threads (the only positional reads in this process),
    every reader process did reads, and closing reaps them all and leaves no descriptor open."""
    path, ref = sharded_ckpt
    fds = _fd_count()
    ckpt = Checkpoint(path, read_threads=2)
    local = []
    real = Checkpoint._pread
    monkeypatch.setattr(Checkpoint, "_pread", lambda self, info, off, view: local.append(info.key) or real(self, info, off, view))
    reqs, want = [], []
    for r in range(0, 300, 37):
        reqs.append(Request((("a", r, min(r + 37, 300)),), torch.bfloat16, (min(r + 37, 300) - r) * 80))
        want.append(ref["a"][r : r + 37])
    reqs.append(Request((("b", 30, 170),), torch.float16, 140 * 48))  # across expert boundaries, file 2
    want.append(ref["b"][30:170])
    reqs.append(Request((("a", 0, 64),), torch.bfloat16, 64 * 10 * 2, cols=(5, 15)))  # tensor parallel slice
    want.append(ref["a"][:64, 5:15])
    reqs.append(Request((("c", 0, 900),), torch.float32, 3600))
    want.append(ref["c"])
    reqs.append(Request((("b", 0, 0),), torch.float16, 0))  # empty: ready at once
    want.append(ref["b"][:0])
    pf = Prefetcher(ckpt, reqs, buffers=4, pinned=False, part_size=700, read_procs=3)
    assert pf.read_procs == 3
    procs = list(pf._procs.procs)
    for i, req in enumerate(reqs):
        buf, slot = pf.take(i)
        assert torch.equal(host_view(ckpt, req, buf), want[i]), i
        del buf
        pf.release(slot, None)
    rchar = [int(next(ln for ln in open(f"/proc/{p.pid}/io") if ln.startswith("rchar")).split()[1]) for p in procs]
    assert all(n > 2000 for n in rchar), rchar  # each reader read file bytes (job records alone are 32 bytes each)
    assert set(local) == {"a"} and len(local) >= 1  # only the column slice was read in this process
    assert pf.pinned_bytes == 4 * 8192  # 4 slots of the largest item (6720 bytes), each rounded up to whole pages
    pf.close()
    ckpt.close()
    assert _gone(procs) and [p.returncode for p in procs] == [0, 0, 0]  # stopped by EOF, not killed
    assert _fd_count() == fds
    assert not _fp8stream_threads()


def _prefetch_with_procs(monkeypatch, procs: int):
    """Run the read-ahead pipeline on the CPU too (it normally runs for CUDA only), as load() sets it up."""
    started = []

    def start(self, schedule):
        self._schedule = [r for r in schedule if r is not None]
        self._prefetcher = Prefetcher(self.ckpt, self._schedule, 2, pinned=False, read_procs=self.read_procs)
        self.read_procs_used = self._prefetcher.read_procs
        self._prefetcher._procs_seen = list(self._prefetcher._procs.procs) if self._prefetcher._procs else []
        started.append(self._prefetcher)

    monkeypatch.setattr(loader._Source, "start", start)
    return started


def test_load_with_reader_processes_is_bit_identical(tmp_path, monkeypatch):
    """$FP8STREAM_READ_PROCS selects reader processes when load() is not told; the model is bit-identical
    to the thread path's, and the report says how many processes read and counts the shared pool."""
    path, _ = make_checkpoint("qwen2_moe", tmp_path / "m", max_shard_size="100KB")
    started = _prefetch_with_procs(monkeypatch, 2)
    plain = fp8stream.load(path, device="cpu", staging_mib=0.3, progress=False, read_procs=0)
    assert plain.fp8stream_report.read_procs == 0 and started[-1]._procs is None
    monkeypatch.setenv("FP8STREAM_READ_PROCS", "2")
    fds = _fd_count()
    piped = fp8stream.load(path, device="cpu", staging_mib=0.3, progress=False)
    rep = piped.fp8stream_report
    assert rep.read_procs == 2 and len(started) == 2
    assert rep.pinned_host_bytes >= 2 * max(r.nbytes for r in started[-1].schedule)
    for (n, a), (_, b) in zip(plain.state_dict().items(), piped.state_dict().items()):
        a = a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a
        b = b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b
        assert torch.equal(a, b), n
    assert started[-1]._procs is None and _fd_count() == fds and not _fp8stream_threads()
    monkeypatch.setenv("FP8STREAM_READ_PROCS", "two")
    with pytest.raises(fp8stream.Fp8StreamError, match=r"FP8STREAM_READ_PROCS='two' is not an integer"):
        fp8stream.load(path, device="cpu", progress=False)
    with pytest.raises(fp8stream.Fp8StreamError, match=r"read_procs must be an integer >= 0"):
        fp8stream.load(path, device="cpu", progress=False, read_procs=-1)


@pytest.mark.parametrize("fault", ["truncated", "unreadable"])
def test_reader_process_read_errors_are_the_thread_paths_one_line_errors(tmp_path, fault):
    """A short read (file truncated after its header was checked) or a failing read (EISDIR: the shard
    was replaced by a directory) in a reader process surfaces in take() as exactly the error the reader
    threads raise; every process is reaped (killed: reads were still in flight) and no fd is left."""
    x = torch.randn(512, 256)
    save_file({"x": x}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    file = tmp_path / "model.safetensors"
    messages = []
    for procs in (0, 2):
        ckpt = Checkpoint(tmp_path, read_threads=2)
        if fault == "truncated":
            os.truncate(file, ckpt.tensors["x"].offset + 300 * 1024)  # rows >= 300 are gone
        else:
            file.rename(tmp_path / "moved")
            file.mkdir()
        fds = _fd_count()
        reqs = [Request((("x", r, r + 64),), torch.float32, 64 * 1024) for r in range(0, 512, 64)]
        pf = Prefetcher(ckpt, reqs, buffers=3, pinned=False, part_size=16 << 10, read_procs=procs)
        children = list(pf._procs.procs) if procs else []

        def take_all():
            for i in range(len(reqs)):
                _, slot = pf.take(i)
                pf.release(slot, None)

        err = _in_thread(take_all)
        assert isinstance(err, CheckpointError), err
        messages.append(str(err))
        pf.close()
        ckpt.close()
        assert _gone(children) and _fd_count() == fds
        if fault == "unreadable":
            file.rmdir()
            (tmp_path / "moved").rename(file)
        else:
            save_file({"x": x}, file)
    want = (rf"^{re.escape(str(file))}: ends inside tensor 'x' \(file truncated while loading\?\)$" if fault == "truncated"
            else rf"^{re.escape(str(file))}: cannot read tensor 'x' \(Is a directory\)$")
    assert re.match(want, messages[0]) and messages[1] == messages[0], messages
    assert not _fp8stream_threads()


def test_killed_reader_process_fails_the_load_cleanly(tmp_path, monkeypatch):
    """A reader process killed mid-load: the load fails with one line naming the process and how it died
    (no hang), and leaves no reader process, thread or descriptor behind."""
    path, _ = make_checkpoint("llama", tmp_path / "m", max_shard_size="100KB")
    started = _prefetch_with_procs(monkeypatch, 2)
    real_take = Prefetcher.take
    taken = itertools.count()

    def take(self, i):
        if next(taken) == 5:
            os.kill(self._procs.procs[0].pid, signal.SIGKILL)
            self._procs.procs[0].wait()  # dead before the next read is queued
        return real_take(self, i)

    monkeypatch.setattr(Prefetcher, "take", take)
    fds = _fd_count()
    err = _in_thread(lambda: fp8stream.load(path, device="cpu", staging_mib=0.05, progress=False, read_procs=2))
    assert isinstance(err, CheckpointError), err
    assert re.search(r"reader process \d+ was killed by SIGKILL", str(err)) and "\n" not in str(err), err
    children = started[0]._procs_seen
    assert len(children) == 2 and _gone(children)
    assert _fd_count() == fds and not _fp8stream_threads()


def test_host_anon_memory_stays_flat_with_reader_processes(tmp_path):
    """96 MiB through 2 x 1 MiB slots of the shared region: this process's anonymous RSS grows by far less
    than the checkpoint (the pool is shared memory: it shows as RssShmem, and in pinned_bytes)."""
    from fp8stream.memory import _rss_anon_bytes

    def shmem():
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssShmem:"))

    rows, width = 24 * 1024, 1024
    save_file({"x": torch.arange(rows, dtype=torch.float32).repeat_interleave(width).view(rows, width)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint(tmp_path, read_threads=2)
    step = 256
    reqs = [Request((("x", r, r + step),), torch.float32, step * width * 4) for r in range(0, rows, step)]
    base, shm_base = _rss_anon_bytes(), shmem()
    peak = shm_peak = 0
    pf = Prefetcher(ckpt, reqs, buffers=2, pinned=False, part_size=256 << 10, read_procs=2)
    for i, req in enumerate(reqs):
        buf, slot = pf.take(i)
        got = host_view(ckpt, req, buf)
        assert got[0, 0] == i * step and got[-1, -1] == i * step + step - 1
        assert got.double().sum() == width * (i * step * step + step * (step - 1) // 2)  # every page of the slot
        del got, buf
        peak = max(peak, _rss_anon_bytes() - base)
        shm_peak = max(shm_peak, shmem() - shm_base)
        pf.release(slot, None)
    assert pf.pinned_bytes == 2 << 20
    pf.close()
    ckpt.close()
    assert peak < 16 << 20, peak  # interpreter slack only: the 2 MiB pool is not anonymous memory, 96 MiB never
    assert (1 << 20) <= shm_peak <= (2 << 20) + (1 << 20), shm_peak  # the pool, as shared memory


def test_cli_read_procs_reaches_load_and_the_report(tmp_path, monkeypatch, capsys):
    """`--read-procs N` is load(read_procs=N); omitted, load() decides ($FP8STREAM_READ_PROCS, else 0).
    The JSON report says how many reader processes read (0 here: the CPU path reads synchronously)."""
    from fp8stream.cli import main

    path, _ = make_checkpoint("llama", tmp_path / "m")
    seen = []
    real = loader.load
    monkeypatch.setattr(loader, "load", lambda *a, **kw: seen.append(kw["read_procs"]) or real(*a, **kw))
    assert main(["load", str(path), "--device", "cpu", "--read-procs", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["read_procs"] == 0
    assert main(["load", str(path), "--device", "cpu", "--json"]) == 0
    assert seen == [3, None]
