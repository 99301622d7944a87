"""No fp8stream process aborts, hangs or leaks at exit: torchrun soak, Ctrl-C mid-load and mid-export, a failing
rank, repeated loads in one process. The CLI runs through tests/cli_worker.py (the same main, plus test-only
faults and a report of the threads left when main returns)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fp8stream
from tiny_models import make_checkpoint

HERE = Path(__file__).parent
WORKER = HERE / "cli_worker.py"


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)  # one intra-op thread: every other thread is someone's to end
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def _torchrun(*args, env=None, timeout=120):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env())


def _thread_reports(stderr: str) -> list[dict]:
    # each report is one JSON object without nested braces; ranks' lines may still meet on torchrun's shared stderr
    return [json.loads(m) for m in re.findall(r"cli_worker: threads (\{[^{}]*\})", stderr)]


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("fp8stream: error:")]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    moe = make_checkpoint("qwen3_moe", root / "moe")[0]
    bad = root / "bad"
    bad.mkdir()
    for f in moe.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated: a header error naming the file
    # wide enough that a slowed reader takes seconds, with MLP weights of 8 MiB (two parts: the reader pool runs)
    big = make_checkpoint("llama", root / "big", hidden_size=1024, intermediate_size=4096, num_attention_heads=8,
                          num_key_value_heads=8)[0]
    return {"moe": moe, "bad": bad, "big": big, "root": root}


def test_torchrun_cli_soak(ckpts):
    """The torchrun CLI load that once died with SIGABRT at exit (2 of 30 runs): 10 runs in a row, every one exit 0."""
    for i in range(10):
        proc = _torchrun("-m", "fp8stream", "load", ckpts["moe"], "--device", "cpu", "--tp", "2", "--ep", "--json")
        assert proc.returncode == 0, f"run {i}: {proc.stderr[-3000:]}"
        assert "terminate called" not in proc.stderr
        assert len([ln for ln in proc.stdout.splitlines() if ln.strip()]) == 1


def test_torchrun_cli_ends_every_thread_and_the_group(ckpts):
    """The cause of the abort: the gloo group's worker threads were still alive at interpreter exit. After main
    returns, each rank has its main thread only (no gloo, reader, sampler or tqdm thread)."""
    proc = _torchrun(WORKER, "load", ckpts["moe"], "--device", "cpu", "--tp", "2", "--ep", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = _thread_reports(proc.stderr)
    assert len(reports) == 2
    for r in reports:
        assert r["python"] == ["MainThread"] and r["os"] == 1, r


def _start(args, **env):
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(**env))


def _interrupt_when_reading(proc) -> float:
    """SIGINT once the first read has started; seconds from the signal to the exit."""
    line = proc.stderr.readline()
    assert "cli_worker: reading" in line, line + proc.stderr.read()
    time.sleep(0.3)  # well inside the load: the slowed reads take seconds
    assert proc.poll() is None, "the load ended before it could be interrupted"
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    return time.perf_counter() - t0


@pytest.mark.parametrize("read_threads", ["1", "4"])
def test_sigint_mid_load_exits_130_with_one_line_and_no_thread(ckpts, read_threads):
    proc = _start(["load", ckpts["big"], "--device", "cpu", "--read-threads", read_threads], FP8STREAM_TEST_SLOW_READ_S="0.2")
    seconds = _interrupt_when_reading(proc)
    err = proc.stderr.read()
    assert proc.returncode == 130, err
    assert seconds < 2.0, seconds
    lines = [ln for ln in err.splitlines() if not ln.startswith("cli_worker:")]
    assert lines == ["fp8stream: interrupted"], err
    (threads,) = _thread_reports(err)
    assert threads["python"] == ["MainThread"] and threads["os"] == 1, threads


def test_sigint_mid_export_leaves_out_clean(ckpts, tmp_path):
    out = tmp_path / "fp8"
    proc = _start(["export", ckpts["big"], str(out)], FP8STREAM_TEST_SLOW_READ_S="0.2")
    seconds = _interrupt_when_reading(proc)
    err = proc.stderr.read()
    assert proc.returncode == 130 and seconds < 2.0, (seconds, err)
    assert [ln for ln in err.splitlines() if not ln.startswith("cli_worker:")] == ["fp8stream: interrupted"], err
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    (threads,) = _thread_reports(err)
    assert threads["python"] == ["MainThread"] and threads["os"] == 1, threads


def _our_frames(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip().startswith("File ") and ("fp8stream" in ln or "cli_worker" in ln)]


def _failing_rank_run(args, **env):
    t0 = time.perf_counter()
    proc = _torchrun(WORKER, *args, env=_env(**env), timeout=90)
    return proc, time.perf_counter() - t0


def test_a_corrupt_shard_on_one_rank_stops_every_rank(ckpts):
    root = ckpts["root"]
    for r, name in ((0, "moe"), (1, "bad")):  # "{rank}" in the path: rank 1 alone gets the truncated shard
        link = root / f"rank{r}"
        if not link.exists():
            link.symlink_to(ckpts[name])
    proc, seconds = _failing_rank_run(["load", str(root / "rank{rank}"), "--device", "cpu", "--tp", "2", "--ep", "--json"])
    assert proc.returncode != 0 and seconds < 30, (seconds, proc.stderr[-3000:])
    errors = _errors(proc.stderr)
    assert len(errors) == 2, proc.stderr[-3000:]
    one = next(e for e in errors if e.startswith("fp8stream: error: rank 1:"))
    zero = next(e for e in errors if e.startswith("fp8stream: error: rank 0:"))
    assert "model.safetensors" in one and not _our_frames(proc.stderr)  # torchrun prints its own traceback, not ours
    assert "stopped because rank 1:" in zero and "model.safetensors" in zero


def test_an_exception_in_one_ranks_quantization_stops_every_rank(ckpts):
    proc, seconds = _failing_rank_run(["load", ckpts["moe"], "--device", "cpu", "--tp", "2", "--ep", "--json"],
                                      FP8STREAM_TEST_FAIL_RANK="1")
    assert proc.returncode != 0 and seconds < 30, (seconds, proc.stderr[-3000:])
    errors = _errors(proc.stderr)
    assert len(errors) == 2, proc.stderr[-3000:]
    assert any(e.startswith("fp8stream: error: rank 1: internal error (RuntimeError: injected fault)") for e in errors), errors
    assert any(e.startswith("fp8stream: error: rank 0: stopped because rank 1: internal error") for e in errors), errors
    assert not _our_frames(proc.stderr)


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssAnon:"))


def _counts():
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


def test_twenty_loads_in_one_process_leak_nothing(ckpts):
    """load, free, load again: threads, open files and RSS come back to the first cycle's level; every load's
    peak is the first's."""
    import gc

    peaks, rss = [], []
    for i in range(20):
        model = fp8stream.load(ckpts["moe"], device="cpu", progress=False)
        peaks.append(model.fp8stream_report.peak_bytes)
        del model
        gc.collect()
        if i == 0:
            threads, fds = _counts()
        rss.append(_rss_anon())
        assert _counts() == (threads, fds), (i, _counts(), (threads, fds))
    assert len(set(peaks)) == 1, peaks
    assert max(rss[1:]) - rss[0] < 16 << 20, [r >> 20 for r in rss]


def test_internal_errors_are_one_line_without_debug(ckpts, capsys, monkeypatch):
    from fp8stream import cli, stream

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault\nsecond line")

    monkeypatch.setattr(stream, "quantize_rows_into", broken)
    assert cli.main(["load", str(ckpts["moe"]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fp8stream: error: internal error (RuntimeError: injected fault); rerun with --debug for the traceback"]
    with pytest.raises(RuntimeError, match="injected fault"):
        cli.main(["--debug", "load", str(ckpts["moe"]), "--device", "cpu"])


def test_every_failing_cli_call_in_one_process_prints_its_own_line(tmp_path, capsys):
    # the one-line-per-process guard is per call: a second failing main() must not wait for a peer watch
    from fp8stream import cli

    for i in range(3):
        start = time.monotonic()
        assert cli.main(["load", str(tmp_path / f"missing{i}"), "--device", "cpu"]) == 2
        assert time.monotonic() - start < 5
        assert capsys.readouterr().err.strip().splitlines() == [f"fp8stream: error: {tmp_path / f'missing{i}'}: no such file or directory"]
