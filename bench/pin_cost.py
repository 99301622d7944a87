"""What pinning the loader's host pool costs in a fresh process, by method (issue 4: first-load costs).

Each method runs in its own fresh process (the first pinning of a process is what a one-shot load pays):
  alloc           torch.empty(pin_memory=True) per buffer (cudaHostAlloc; torch rounds each up to a power of two)
  alloc_register  the same with PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,
                  pinned_num_register_threads:8 (torch faults the pages in on 8 threads, then cudaHostRegister)
  register        torch.empty (pageable, untouched) then cudaHostRegister of exactly its bytes
  touch_register  torch.empty, zero_() (torch's parallel fill faults the pages in on all cores), cudaHostRegister
and then times pinned -> GPU copies out of the buffers (a registered buffer must copy as fast as an allocated one).

    python3 bench/pin_cost.py [--mib 49] [--buffers 8] [--methods alloc,register,...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("alloc", "alloc_register", "register", "touch_register")


def pin_all(method, n, buffers, cudart, bufs, times):
    import torch

    for _ in range(buffers):
        t = time.perf_counter()
        if method in ("alloc", "alloc_register"):
            b = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        else:
            b = torch.empty(n, dtype=torch.uint8)
            if method == "touch_register":
                b.zero_()
            err = cudart.cudaHostRegister(b.data_ptr(), n, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister: {err}")
        times.append(time.perf_counter() - t)
        bufs.append(b)


def worker(method: str, mib: int, buffers: int, side_thread: bool = False) -> dict:
    import torch

    t0 = time.perf_counter()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    n = mib << 20
    cudart = torch.cuda.cudart()
    bufs, times = [], []

    def spin(seconds=None, until=None):  # pure-Python work: how much of it runs while another thread pins
        count, t = 0, time.perf_counter()
        while (time.perf_counter() - t < seconds) if seconds else until.is_alive():
            count += 1
        return count / (time.perf_counter() - t)

    alone = spin(0.1)
    t_all = time.perf_counter()
    if side_thread:  # pin on a side thread (as a pool pinned during the load setup would be)
        import threading

        th = threading.Thread(target=pin_all, args=(method, n, buffers, cudart, bufs, times))
        th.start()
        main_rate = spin(until=th)
        th.join()
    else:
        pin_all(method, n, buffers, cudart, bufs, times)
    pin_s = time.perf_counter() - t_all
    extra = dict(main_thread_python_rate=round(main_rate / alone, 3)) if side_thread else {}
    for b in bufs:
        b.fill_(1)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    rates = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.cuda.stream(stream):
            for b in bufs:
                dst.copy_(b, non_blocking=True)
        stream.synchronize()
        rates.append(buffers * n / (time.perf_counter() - t) / 1e9)
    if method in ("register", "touch_register"):
        for b in bufs:
            cudart.cudaHostUnregister(b.data_ptr())
    return dict(method=method, mib=mib, buffers=buffers, cuda_init_s=round(init_s, 3), pin_s=round(pin_s, 3),
                per_buffer_ms=[round(1e3 * x, 1) for x in times], h2d_gb_s=round(max(rates), 1), **extra)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=49)
    ap.add_argument("--buffers", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=2, help="fresh processes per method (alternated)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--side-thread", action="store_true",
                    help="pin on a side thread; report main_thread_python_rate (pure-Python speed of the main thread meanwhile; 1 = unhindered)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.mib, args.buffers, args.side_thread)))
        return 0
    rows = []
    for _ in range(args.repeat):
        for m in args.methods.split(","):
            env = dict(os.environ)
            if m == "alloc_register":
                env["PYTORCH_CUDA_ALLOC_CONF"] = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
            p = subprocess.run([sys.executable, __file__, "--worker", m, "--mib", str(args.mib), "--buffers", str(args.buffers)]
                               + (["--side-thread"] if args.side_thread else []),
                               env=env, capture_output=True, text=True)
            row = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else dict(method=m, error=p.stderr[-500:])
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
