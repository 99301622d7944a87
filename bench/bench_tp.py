"""Multi-GPU benchmark: one GPU vs tensor parallel vs expert parallel, per GPU, each layout in fresh processes.

    python bench/bench_tp.py CKPT_DIR --out results.json [--layouts tp1,tp2,ep2,tp2ep2] [--scheme fp8_per_channel]
                             [--new-tokens 64] [--timeout 600] [--markdown results.md]

The driver is a plain python process; it runs each layout as its own launch (tp1: one process on
cuda:0; the others: `python -m torch.distributed.run --standalone --nproc-per-node 2`, NCCL), after
reading the checkpoint once so every layout starts from the same warm page cache. Per rank (= per GPU):
  load s     wall clock around fp8stream.load (all ranks enter together after a barrier),
  peak       torch.cuda.max_memory_allocated - allocated before (reset before the load),
  final      torch.cuda.memory_allocated after the load - before,
  read       checkpoint bytes the rank read (report.read_bytes),
  decode     tokens/s of greedy model.generate, batch 1, eager, --new-tokens new tokens after a warm-up
             (every rank runs the same generate in lockstep; the collectives are inside the forward).
Every rank's record is one JSON line on stdout and in --out (a JSON list); a failed layout is
recorded with its error and the run goes on. --device cpu runs the same on the CPU (gloo), as a smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from pathlib import Path

LAYOUTS = {"tp1": (1, 1, False), "tp2": (2, 2, False), "ep2": (2, 1, True), "tp2ep2": (2, 2, True)}  # procs, tp, ep


# ---------------------------------------------------------------- worker (one rank)

def worker(args) -> dict:
    import torch
    import transformers

    import fp8stream

    transformers.logging.set_verbosity_error()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device == "cuda"
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if cuda else "gloo")
    res = {"layout": args.layout, "rank": rank, "world_size": world, "tp": args.tp, "ep": args.ep, "scheme": args.scheme,
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device_name": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu"}
    if cuda:
        torch.empty(1, device=dev)
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    if dist is not None:
        dist.barrier()
    t0 = time.perf_counter()
    model = fp8stream.load(args.ckpt, device=str(dev), scheme=args.scheme, progress=False, tp=args.tp, ep=args.ep)
    if cuda:
        torch.cuda.synchronize(dev)
    res["load_s"] = time.perf_counter() - t0
    if dist is not None:
        dist.barrier()
        res["load_s_all_ranks"] = time.perf_counter() - t0
    if cuda:
        res["peak_bytes"] = torch.cuda.max_memory_allocated(dev) - base
        res["final_bytes"] = torch.cuda.memory_allocated(dev) - base
    # logits of a fixed prompt, saved by rank 0: the driver compares every layout with one GPU (tp1)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        logits = model(ids).logits.float().cpu()
    if rank == 0:
        torch.save(logits, Path(args.result_dir).parent / f"logits_{args.layout}.pt")
    rep = json.loads(model.fp8stream_report.to_json())
    for k in ("quantized_modules", "kept_modules"):
        rep.pop(k, None)
    res["report"] = rep
    if args.new_tokens > 0:
        res["decode_tok_s"] = decode_tok_s(model, args.new_tokens, dev)
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
    return res


def decode_tok_s(model, new_tokens: int, dev) -> float:
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(dev)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)


def worker_main(args) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        res, rc = worker(args), 0
    except BaseException as e:
        traceback.print_exc()
        text = str(e).strip()
        res, rc = {"layout": args.layout, "rank": rank, "error": f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]}, 1
    Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(res))
    return rc


# ---------------------------------------------------------------- driver

def run_layout(args, layout: str) -> list[dict]:
    procs, tp, ep = LAYOUTS[layout]
    with tempfile.TemporaryDirectory(dir=args.logits_dir) as tmp:
        inner = [os.path.abspath(__file__), args.ckpt, "--worker", "--layout", layout, "--tp", str(tp), "--scheme", args.scheme,
                 "--device", args.device, "--new-tokens", str(args.new_tokens), "--result-dir", tmp] + (["--ep"] if ep else [])
        if procs == 1:
            cmd = [sys.executable, *inner]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *inner]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
        src = str(Path(__file__).resolve().parent.parent / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        timer = threading.Timer(args.timeout, proc.kill)
        timer.start()
        tail = deque(maxlen=30)
        for line in proc.stdout:
            print(f"  [{layout}] {line}", end="", file=sys.stderr, flush=True)
            tail.append(line.rstrip())
        rc = proc.wait()
        timer.cancel()
        wall = time.perf_counter() - t0
        out = []
        for r in range(procs):
            f = Path(tmp, f"rank{r}.json")
            res = json.loads(f.read_text()) if f.is_file() else {"layout": layout, "rank": r}
            if rc != 0 and "error" not in res:
                why = f"timeout after {args.timeout} s" if wall >= args.timeout else f"exit code {rc}"
                res["error"] = f"{why}: {next((l for l in reversed(tail) if l.strip()), '')}"[:300]
            res["process_wall_s"] = wall
            out.append(res)
    return out


def compare_logits(d: Path, layouts: list[str]) -> dict:
    import torch

    ref_file = d / "logits_tp1.pt"
    if not ref_file.is_file():
        return {}
    ref = torch.load(ref_file)
    out = {}
    for layout in layouts:
        f = d / f"logits_{layout}.pt"
        if layout == "tp1" or not f.is_file():
            continue
        x = torch.load(f)
        out[layout] = {"rel_l2": float((x - ref).norm() / ref.norm()),
                       "top1_agree": float((x.argmax(-1) == ref.argmax(-1)).float().mean())}
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| layout | rank | load s | peak GiB | final GiB | read GiB | decode tok/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['rank']} | failed: {r['error']} | | | | |")
            continue
        rep = r.get("report", {})
        g = lambda k: f"{(r.get(k) if r.get(k) is not None else rep.get(k, 0)) / 2**30:.2f}"  # noqa: E731  (CPU: the report's)
        read = rep.get("read_bytes")
        lines.append(f"| {r['layout']} | {r['rank']} | {r['load_s']:.2f} | {g('peak_bytes')} | {g('final_bytes')} | "
                     f"{read / 2**30 if read is not None else 0:.2f} | {r.get('decode_tok_s', 0):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", help="checkpoint directory (e.g. written by bench/make_checkpoint.py)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, from {', '.join(LAYOUTS)}")
    ap.add_argument("--scheme", default="fp8_per_channel")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per layout before its processes are killed")
    ap.add_argument("--out", default="bench_tp.json")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--no-warm", action="store_true", help="do not read the checkpoint once before the first layout")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ep", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)

    layouts = [x for x in args.layouts.split(",") if x]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        ap.error(f"unknown layout(s) {bad}; choose from {', '.join(LAYOUTS)}")
    ckpt = Path(args.ckpt)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "checkpoint": str(ckpt), "rows": []}
    try:
        doc["gpus"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except Exception:
        doc["gpus"] = []
    if not args.no_warm:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_load import warm_page_cache

        doc["warm"] = warm_page_cache(ckpt)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as logits_dir:
        args.logits_dir = logits_dir
        for layout in layouts:
            rows = run_layout(args, layout)
            for r in rows:
                print(json.dumps(r), flush=True)
            doc["rows"] += rows
            out.write_text(json.dumps(doc, indent=1))  # after every layout: a later crash keeps what was measured
        doc["logits_vs_tp1"] = compare_logits(Path(logits_dir), layouts)
        out.write_text(json.dumps(doc, indent=1))
    text = markdown(doc["rows"]) + "\n\n" + "\n".join(
        f"- {k}: logits rel. L2 vs tp1 {v['rel_l2']:.4f}, top-1 agreement {v['top1_agree']:.3f}" for k, v in doc["logits_vs_tp1"].items())
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    print(text, file=sys.stderr)
    return 0 if all("error" not in r for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
