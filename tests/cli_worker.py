"""fp8stream's CLI (console_main, as the installed script runs it) in this process, with test-only faults, then a
report of the threads left (test_lifecycle.py).

argv: the CLI's arguments; "{rank}" in them becomes this process's RANK (one rank can be given a bad checkpoint).
Environment (all optional):
  FP8STREAM_TEST_SLOW_READ_S   seconds every positional read sleeps first (a slow disk, to interrupt a load)
  FP8STREAM_TEST_FAIL_RANK     the rank whose row quantization raises RuntimeError("injected fault")
stderr gets "cli_worker: reading" when the first read starts, and last "cli_worker: threads {json}".
"""

import json
import os
import signal
import sys
import threading
import time


def _faults() -> None:
    import fp8stream.checkpoint as checkpoint
    import fp8stream.stream as stream

    slow = float(os.environ.get("FP8STREAM_TEST_SLOW_READ_S", "0"))
    pread, said = checkpoint.Checkpoint._pread, []

    def slow_pread(self, info, offset, view):
        if not said:
            said.append(True)
            print("cli_worker: reading", file=sys.stderr, flush=True)
        time.sleep(slow)
        pread(self, info, offset, view)

    checkpoint.Checkpoint._pread = slow_pread
    if os.environ.get("FP8STREAM_TEST_FAIL_RANK") == os.environ.get("RANK", "0"):
        def broken(*args, **kwargs):
            raise RuntimeError("injected fault")

        stream.quantize_rows_into = broken


def _threads() -> dict:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # a thread that ended while we looked
            pass
    return {"python": sorted(t.name for t in threading.enumerate()), "os": len(names), "os_names": sorted(names),
            "fds": len(os.listdir("/proc/self/fd"))}


def main() -> int:
    # Ctrl-C as from a terminal, however the test run was started: a shell's background job (`pytest ... &`) starts
    # with SIGINT ignored, Python then keeps it ignored, and every child would run its load to the end
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _faults()
    from fp8stream.cli import console_main  # what the `fp8stream` script runs (its exit skips the collector's passes)

    rank = os.environ.get("RANK", "0")
    rc = console_main([a.replace("{rank}", rank) for a in sys.argv[1:]])
    # one write, newline included: two ranks share torchrun's stderr, and print() writes the end separately
    sys.stderr.write(f"cli_worker: threads {json.dumps(_threads())}\n")
    sys.stderr.flush()
    return rc


if __name__ == "__main__":
    sys.exit(main())
