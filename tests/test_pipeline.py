"""The reading pipeline: positional byte-range reads, the read-ahead pool, errors in reader threads, the timeline."""

import itertools
import json
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

import fp8stream
from fp8stream import loader, source
from fp8stream.checkpoint import Checkpoint
from fp8stream.errors import CheckpointError
from fp8stream.pipeline import Prefetcher, Request
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


def test_adjacent_tensors_into_adjacent_bytes_are_one_read(tmp_path, monkeypatch):
    """An expert's gate_proj then up_proj (adjacent in the file) into consecutive bytes of one buffer, as a fused
    gate_up chunk reads them: one positional read for both; a gap in the file or in the buffer keeps two, packed
    into one job of the reader pool while they fit in a part. A file truncated inside the second tensor names
    that tensor."""
    g, u, d = (torch.randn(16, 32).to(torch.bfloat16) for _ in range(3))
    save_file({"e.0.gate_proj": g, "e.0.up_proj": u, "e.1.down_proj": d}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint(tmp_path, read_threads=2)
    order = sorted(ckpt.tensors, key=lambda k: ckpt.tensors[k].offset)
    assert order == ["e.0.gate_proj", "e.0.up_proj", "e.1.down_proj"]
    preads = []
    real = Checkpoint._pread
    monkeypatch.setattr(Checkpoint, "_pread", lambda self, info, offset, view: preads.append(len(view)) or real(self, info, offset, view))

    def reads_of(reads, part=1 << 20):
        preads.clear()
        jobs = ckpt.parts(reads, part)
        for fn, *args in jobs:
            fn(*args)
        return len(jobs), sorted(preads)

    buf = torch.zeros(3 * 16 * 64, dtype=torch.uint8)
    reads = [("e.0.gate_proj", 4, 16, buf[: 12 * 64]), ("e.0.up_proj", 0, 10, buf[12 * 64 : 22 * 64])]
    assert reads_of(reads) == (1, [22 * 64])
    assert torch.equal(buf[: 22 * 64].view(torch.bfloat16).view(22, 32), torch.cat([g[4:], u[:10]]))
    # not adjacent in the file (gate_proj's last rows lie between), or not in the buffer: two reads, one job
    assert reads_of([("e.0.gate_proj", 0, 8, buf[: 8 * 64]), ("e.0.up_proj", 0, 4, buf[8 * 64 : 12 * 64])]) == (1, [4 * 64, 8 * 64])
    assert reads_of([("e.0.gate_proj", 0, 16, buf[: 16 * 64]), ("e.1.down_proj", 0, 4, buf[17 * 64 : 21 * 64])]) == (1, [4 * 64, 16 * 64])
    assert torch.equal(buf[17 * 64 : 21 * 64].view(torch.bfloat16).view(4, 32), d[:4])
    # a job never holds more than a part: large runs are cut, small reads are packed only while they fit
    assert reads_of(reads, 512) == (-(-22 * 64 // 512), sorted([512] * (22 * 64 // 512) + [22 * 64 % 512]))
    assert reads_of([("e.0.gate_proj", 0, 16, buf[: 16 * 64]), ("e.1.down_proj", 0, 4, buf[17 * 64 : 21 * 64])], 16 * 64)[0] == 2
    f = tmp_path / "model.safetensors"  # truncated while loading (after the header was checked)
    f.write_bytes(f.read_bytes()[: ckpt.tensors["e.0.up_proj"].offset + 100])
    with pytest.raises(CheckpointError, match=r"ends inside tensor 'e\.0\.up_proj'"):
        ckpt.read_into(reads)
    ckpt.close()


def test_a_failing_part_fails_the_read_after_the_others_finish(tmp_path, monkeypatch):
    """read_into over the reader pool: a part that raises makes read_into raise that error, only once every
    other part has finished (none still writes into the buffer), and the pool keeps serving reads."""
    x = torch.randn(8192, 256)  # 8 MiB over 4 threads: 8 parts of 1 MiB (2 per thread) once parts may be that small
    save_file({"x": x}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint(tmp_path, read_threads=4)
    monkeypatch.setattr("fp8stream.checkpoint._MIN_READ_PART", 1 << 20)
    finished, real = [], Checkpoint._pread
    first = ckpt.tensors["x"].offset

    def flaky(self, info, offset, view):
        if offset == first + (2 << 20):
            raise CheckpointError(f"{info.file}: cannot read tensor '{info.key}' (Input/output error)")
        real(self, info, offset, view)
        finished.append(offset)

    monkeypatch.setattr(Checkpoint, "_pread", flaky)
    with pytest.raises(CheckpointError, match="Input/output error"):
        ckpt.read_rows("x", 0, 8192)
    assert len(finished) == 7  # 8 parts of 1 MiB, one failed, the others all done before the raise
    monkeypatch.setattr(Checkpoint, "_pread", real)
    assert torch.equal(ckpt.read_rows("x", 100, 8000), x[100:8000])
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
        rows, slot = pf.take(i)
        got = rows.clone()
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
        rows, slot = pf.take(i)
        assert torch.equal(rows, ref["a"][i * 16 : i * 16 + 16]), i
        pf.release(slot, None)
    pf.close()
    assert pf._bufs == [None] * 3 and pf._in_flight == 0
    ckpt.close()
    assert not _fp8stream_threads()


def test_small_items_share_a_buffer_so_reads_keep_going_behind_them(two_tensor_ckpt):
    """The pool is a ring placed by bytes: with 2 buffers, one big item and then six small ones (one row of
    96 bytes each, aligned to 256) all land while the big one is still held, because the six share the
    second buffer. One item per buffer would read only item 1 until item 0 is released."""
    ckpt, ref = two_tensor_ckpt
    reqs = [Request((("a", 0, 16),), torch.bfloat16, 16 * 48 * 2)]  # 1536 bytes: the buffer size
    reqs += [Request((("a", r, r + 1),), torch.bfloat16, 48 * 2) for r in range(16, 22)]
    reqs.append(Request((("a", 22, 38),), torch.bfloat16, 16 * 48 * 2))
    pf = Prefetcher(ckpt, reqs, buffers=2, pinned=False)
    rows, slot = pf.take(0)
    deadline = time.monotonic() + 10
    while not all(i in pf._ready for i in range(1, 7)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(i in pf._ready for i in range(1, 7)), sorted(pf._ready)  # read while item 0 is still held
    assert 7 not in pf._ready  # the ring is full: the next big item waits for buffer 0
    assert torch.equal(rows, ref["a"][:16])
    pf.release(slot, None)
    for i in range(1, len(reqs)):
        rows, slot = pf.take(i)
        assert torch.equal(rows, ref["a"][15 + i : 16 + i] if i < 7 else ref["a"][22:38]), i
        assert (rows.data_ptr() - pf._bufs[slot].data_ptr()) % 256 == 0  # aligned within its buffer
        pf.release(slot, None)
    pf.close()
    ckpt.close()
    assert not _fp8stream_threads()


class _FakeCudart:
    """Records what the pool registers / unregisters with CUDA (no GPU needed); `fail` makes register fail."""

    def __init__(self, fail=False):
        self.fail, self.registered, self.unregistered = fail, [], []

    def cudaHostRegister(self, ptr, size, flags):
        self.registered.append((ptr, size))
        return 1 if self.fail else 0

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


@pytest.mark.parametrize("fail", [False, True])
def test_pinned_pool_registers_its_pages_and_unregisters_on_close(two_tensor_ckpt, monkeypatch, fail):
    """A pinned pool buffer is ordinary memory whose pages are touched and then registered with CUDA (exactly its
    bytes, once per buffer); close() unregisters each one after the reads are done. If registering fails, the
    buffer comes from cudaHostAlloc (pin_memory=True) instead and nothing is unregistered."""
    ckpt, ref = two_tensor_ckpt
    fake = _FakeCudart(fail)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    devices = []  # (thread, device) of every set_device, and the thread of every registration
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: devices.append((threading.current_thread().name, d)))
    real_register = fake.cudaHostRegister
    fake.cudaHostRegister = lambda *a: devices.append((threading.current_thread().name, "register")) or real_register(*a)
    real_empty, pinned_allocs = torch.empty, []

    def empty(*args, pin_memory=False, **kw):  # no GPU here: a pinned allocation is recorded, then made pageable
        if pin_memory:
            pinned_allocs.append(args)
        return real_empty(*args, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    reqs = [Request((("a", i, i + 16),), torch.bfloat16, 16 * 48 * 2) for i in range(0, 64, 16)]
    pf = Prefetcher(ckpt, reqs, buffers=2, pinned=True, device=torch.device("cuda", 1))
    for i, req in enumerate(reqs):
        rows, slot = pf.take(i)
        assert torch.equal(rows, ref["a"][i * 16 : i * 16 + 16]), i
        pf.release(slot, None)
    ptrs = [b.data_ptr() for b in pf._bufs]
    # the thread that registers is on the load's device first (a rank on GPU 1 makes no context on GPU 0)
    assert devices[0] == ("fp8stream-prefetch", torch.device("cuda", 1))
    assert {t for t, _ in devices} == {"fp8stream-prefetch"} and devices.count(("fp8stream-prefetch", "register")) == 2
    pf.close()
    ckpt.close()
    assert [size for _, size in fake.registered] == [16 * 48 * 2] * 2
    if fail:
        assert len(pinned_allocs) == 2 and fake.unregistered == []
    else:
        assert [ptr for ptr, _ in fake.registered] == ptrs and sorted(fake.unregistered) == sorted(ptrs)
        assert pinned_allocs == [] and pf._registered == []
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
        got, slot = pf.take(i)
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

    monkeypatch.setattr(source.Source, "PREFETCH_DEVICES", ("cuda", "cpu"))  # the read-ahead pool, unpinned
    took = []
    real_take = Prefetcher.take
    monkeypatch.setattr(Prefetcher, "take", lambda self, i: took.append(i) or real_take(self, i))
    piped = fp8stream.load(path, device="cpu", staging_mib=0.3, progress=False, prefetch_buffers=2)
    assert len(took) > 20 and took == sorted(took)  # every read came from the pipeline, in schedule order
    for (n, a), (_, b) in zip(plain.state_dict().items(), piped.state_dict().items()):
        a = a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a
        b = b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b
        assert torch.equal(a, b), n
    assert not _fp8stream_threads()


def test_error_in_a_reader_thread_is_clean_and_stops_everything(tmp_path, monkeypatch):
    path, _ = make_checkpoint("llama", tmp_path / "m", max_shard_size="100KB")

    monkeypatch.setattr(source.Source, "PREFETCH_DEVICES", ("cuda", "cpu"))  # the read-ahead pool, unpinned
    real = Checkpoint._pread

    def failing(self, info, offset, view):
        if "layers.1.mlp.up_proj" in info.key:
            raise CheckpointError(f"{info.file}: cannot read tensor '{info.key}' (Input/output error)")
        return real(self, info, offset, view)

    monkeypatch.setattr(Checkpoint, "_pread", failing)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj.*Input/output error") as e:
        fp8stream.load(path, device="cpu", progress=False, prefetch_buffers=2)
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


def test_chunk_requests_cover_exactly_the_planned_rows(tmp_path):
    """_Source.request finds a chunk's pieces by bisection: for any destination row range of a fused expert
    parameter (16 pieces: each expert's gate and up), the reads are exactly the pieces' overlapping rows, in
    destination order, as a scan over every piece gives them."""
    import random

    from fp8stream.load_plan import build_plan
    from fp8stream.meta_model import build_meta_model

    path, _ = make_checkpoint("qwen2_moe", tmp_path / "m")
    ckpt = Checkpoint(path)
    plans = build_plan(build_meta_model(loader._load_config(path), torch.bfloat16), ckpt)
    plan = next(p for n, p in plans.items() if n.endswith("experts.gate_up_proj"))
    assert len(plan.pieces) == 16
    src = source.Source(ckpt, torch.bfloat16, torch.device("cpu"))
    rows = plan.shape[0] * plan.shape[1]
    rng = random.Random(0)
    for d0, d1 in [(0, rows), (0, 1), (rows - 1, rows)] + [sorted(rng.sample(range(rows + 1), 2)) for _ in range(200)]:
        if d0 == d1:
            continue
        scan = [(p.key, p.src_row + max(d0, p.dst_row) - p.dst_row, p.src_row + min(d1, p.dst_row + p.rows) - p.dst_row)
                for p in sorted(plan.pieces, key=lambda p: p.dst_row) if max(d0, p.dst_row) < min(d1, p.dst_row + p.rows)]
        assert list(src.request(plan, d0, d1, "gate_up").reads) == scan
    ckpt.close()
