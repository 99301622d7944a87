"""Load benchmark: fp8stream against its peers, each mode in a fresh process, same card, same run.

    python bench/bench_load.py CKPT_DIR --modes fp8stream,hf_fp8,hf_bf16,safetensors --out results.json \
        [--markdown results.md] [--schemes fp8_per_channel,...] [--check-bound-mib 256] [--no-decode]

Per mode: load s = wall clock around the load call (torch.cuda.synchronize included); peak =
torch.cuda.max_memory_allocated after reset_peak_memory_stats; after = torch.cuda.memory_allocated
once loaded (both minus what was allocated before); host RSS = ru_maxrss of the worker process.
These are the columns of shared/reference/peers.md. Imports and CUDA context creation happen before
the clock starts, for every mode alike: also transformers' modeling code of the checkpoint's model class
and its table of checkpoint renamings, which it builds on first use in a process (0.4-0.7 s on the H100
host, once per process, whichever loader asks first). `--imports-in-clock` leaves those two inside the
clock (what the first load of a fresh process costs a user).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODES = ("fp8stream", "hf_fp8", "hf_bf16", "safetensors")
DECODE_MODES = ("fp8stream", "hf_bf16")  # hf_fp8's forward needs a kernel downloaded from the hub
DECODE_LABEL = "eager HF generate, batch 1"
GIB = 2**30


def label(mode: str, scheme: str | None, device: str) -> str:
    return {
        "fp8stream": f"fp8stream.load {scheme}",
        "hf_fp8": f"transformers FineGrainedFP8Config() (128x128 blocks), device_map=\"{device}\"",
        "hf_bf16": f"transformers from_pretrained bf16, device_map=\"{device}\"",
        "safetensors": f"safetensors safe_open(device=\"{device}\"), all tensors, no model",
    }[mode]


# ---------------------------------------------------------------- worker (one mode, fresh process)

def load_fp8stream(path, device, scheme):
    import fp8stream

    return fp8stream.load(path, device=device, scheme=scheme, progress=False)


def load_hf_fp8(path, device, scheme):
    import torch
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=FineGrainedFP8Config(), device_map=device,
                                                dtype=torch.bfloat16)


def load_hf_bf16(path, device, scheme):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map=device, dtype=torch.bfloat16)


def load_safetensors(path, device, scheme):
    from safetensors import safe_open

    tensors = []  # kept alive: "after" is what the weights hold on the device
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device=device) as f:
            tensors.extend(f.get_tensor(k) for k in f.keys())
    return tensors


def decode_tok_s(model, new_tokens: int) -> float:
    """Greedy generate of exactly `new_tokens` from an 8-token random prompt, after a 2-token warm-up."""
    import torch

    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(dev)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        sync(dev)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        sync(dev)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)


def import_model_code(ckpt: str) -> None:
    """What transformers does once per process before its first load of this model type, whoever loads:
    import the model's modeling code (and modeling_utils) and build its checkpoint-renaming table."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(ckpt, local_files_only=True)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # noqa: B018  (the lookup imports the module)
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # older transformers: no renaming table
        return
    get_checkpoint_conversion_mapping(config.model_type)


class AnonRssPeak(threading.Thread):
    """Samples RssAnon every 20 ms. ru_maxrss also counts the checkpoint's mmap'd file pages; this is
    what the process itself allocated on the host (a cross-check, not one of the peers' columns)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = 0, threading.Event()

    def sample(self) -> None:
        with open("/proc/self/status") as f:
            kib = next((int(l.split()[1]) for l in f if l.startswith("RssAnon:")), 0)
        self.peak = max(self.peak, kib * 1024)

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.sample()

    def stop(self) -> int:
        self.done.set()
        self.join()
        self.sample()
        return self.peak


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def worker(args) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM  # noqa: F401  (import cost stays outside the clock)

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not args.imports_in_clock:
        import_model_code(args.ckpt)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    res = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device_name": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu"}
    if cuda:
        torch.empty(1, device=dev)  # CUDA context now, not inside the timed load
        sync(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    loader = globals()[f"load_{args.worker}"]
    anon = AnonRssPeak()
    anon.start()
    t0 = time.perf_counter()
    model = loader(args.ckpt, args.device, args.scheme)
    sync(dev)
    res["load_s"] = time.perf_counter() - t0
    res["host_anon_rss_peak_bytes"] = anon.stop()
    if cuda:
        res["peak_bytes"] = torch.cuda.max_memory_allocated(dev) - base
        res["after_bytes"] = torch.cuda.memory_allocated(dev) - base
        res["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
    res["host_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    report = getattr(model, "fp8stream_report", None)
    if report is not None:
        res["report"] = json.loads(report.to_json())
        for k in ("quantized_modules", "kept_modules"):  # long name lists; counts are in the report
            res["report"].pop(k, None)
    if args.decode_tokens > 0 and args.worker in DECODE_MODES:
        res["decode_tok_s"] = decode_tok_s(model, args.decode_tokens)
    return res


def worker_main(args) -> int:
    try:
        res, rc = worker(args), 0
    except BaseException as e:  # recorded as "failed: <one line>", never crashes the run
        traceback.print_exc()
        text = str(e).strip()
        res, rc = {"error": f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]}, 1
    Path(args.result).write_text(json.dumps(res))
    return rc


# ---------------------------------------------------------------- driver

def warm_page_cache(ckpt: Path) -> dict:
    """Read every shard once (8 threads), so every mode starts from the same warm page cache."""
    files = sorted(ckpt.glob("*.safetensors"))

    def read(f):
        buf = bytearray(64 * 2**20)
        n = 0
        with open(f, "rb", buffering=0) as fh:
            while (k := fh.readinto(buf)) > 0:
                n += k
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        total = sum(pool.map(read, files))
    s = time.perf_counter() - t0
    return {"files": len(files), "bytes": total, "seconds": s, "gb_per_s": total / s / 1e9}


def checkpoint_info(ckpt: Path) -> dict:
    index = ckpt / "model.safetensors.index.json"
    files = sorted(ckpt.glob("*.safetensors"))
    if index.is_file():
        n = len(json.loads(index.read_text())["weight_map"])
    else:
        from safetensors import safe_open

        n = sum(len(safe_open(str(f), framework="pt").keys()) for f in files)
    return {"path": str(ckpt), "tensors": n, "shards": len(files), "bytes": sum(f.stat().st_size for f in files)}


def run_mode(args, mode: str, scheme: str | None) -> dict:
    name = f"{mode}:{scheme}" if scheme else mode
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(__file__), args.ckpt, "--worker", mode, "--scheme", scheme or "",
               "--device", args.device, "--result", str(result),
               "--decode-tokens", str(0 if args.no_decode else args.decode_tokens)] + (["--imports-in-clock"] if args.imports_in_clock else [])
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(args.timeout, proc.kill)
        timer.start()
        tail = deque(maxlen=30)
        for line in proc.stdout:  # stream the worker's output, keep its end for the failure line
            print(f"  [{name}] {line}", end="", flush=True)
            tail.append(line.rstrip())
        rc = proc.wait()
        timer.cancel()
        wall = time.perf_counter() - t0
        res = json.loads(result.read_text()) if result.is_file() else {}
    if rc != 0 and "error" not in res:
        why = f"timeout after {args.timeout} s" if wall >= args.timeout else f"worker exit code {rc}"
        last = next((l for l in reversed(tail) if l.strip()), "")
        res["error"] = f"{why}: {last}"[:300]
    res.update(mode=mode, scheme=scheme, label=label(mode, scheme, args.device), process_wall_s=wall)
    print(f"{name}: " + (f"failed: {res['error']}" if "error" in res else f"load {res['load_s']:.2f} s") +
          f" (process {wall:.1f} s)", flush=True)
    return res


def fmt(x, spec=".2f", scale=1.0) -> str:
    return "-" if x is None else format(x / scale, spec)


def markdown(doc: dict) -> str:
    m, ck, warm = doc["meta"], doc["checkpoint"], doc["page_cache"]
    lines = [
        f"# Load benchmark: {Path(ck['path']).name}",
        "",
        f"- card: {m['device_name']}; torch {m['torch']}, transformers {m['transformers']}, python {m['python']}; {m['date']}",
        f"- command: `{m['command']}`",
        f"- checkpoint: {ck['path']}: {ck['tensors']} tensors, {ck['bytes'] / GIB:.2f} GiB in {ck['shards']} shards; "
        f"page cache warmed first: read {warm['bytes'] / GIB:.2f} GiB in {warm['seconds']:.1f} s ({warm['gb_per_s']:.1f} GB/s, 8 threads)",
        "- each mode in a fresh process; load s = wall clock around the load call incl. synchronize; peak = "
        "max_memory_allocated after reset_peak_memory_stats; after = memory_allocated after the load; "
        "host RSS = ru_maxrss of the process (imports and mmap'd checkpoint pages included); "
        "host anon = peak RssAnon sampled every 20 ms during the load (what the process allocated itself)",
        "",
        f"| mode | load s | peak GiB | after GiB | peak/after | host RSS GiB | host anon GiB | decode tok/s ({DECODE_LABEL}, {m['decode_tokens']} new tokens) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'].replace('|', '/')} | | | | | | |")
            continue
        peak, after = r.get("peak_bytes"), r.get("after_bytes")
        ratio = f"{peak / after:.3f}" if peak is not None and after else "-"
        lines.append(f"| {r['label']} | {r['load_s']:.2f} | {fmt(peak, scale=GIB)} | {fmt(after, scale=GIB)} | {ratio} | "
                     f"{fmt(r.get('host_rss_bytes'), '.1f', GIB)} | {fmt(r.get('host_anon_rss_peak_bytes'), '.1f', GIB)} | "
                     f"{fmt(r.get('decode_tok_s'), '.1f')} |")
    for r in doc["results"]:
        rep = r.get("report")
        if rep:
            lines.append("")
            lines.append(f"fp8stream {rep['scheme']} report: peak {rep['peak_bytes'] / GIB:.3f} GiB, final {rep['final_bytes'] / GIB:.3f} GiB "
                         f"(peak - final = {(rep['peak_bytes'] - rep['final_bytes']) / 2**20:.1f} MiB, staging bound "
                         f"{rep['staging_bytes'] / 2**20:.0f} MiB), full precision {rep['full_precision_bytes'] / GIB:.2f} GiB, "
                         f"{rep['quantized_tensors']} tensors quantized, {rep['kept_tensors']} kept, its own timer {rep['load_seconds']:.2f} s")
    if doc.get("bound_check"):
        b = doc["bound_check"]
        lines += ["", f"bound check (peak <= final + {b['bound_mib']:g} MiB): {'PASS' if b['ok'] else 'FAIL'}: {b['detail']}"]
    return "\n".join(lines) + "\n"


def bound_check(results: list[dict], bound_mib: float) -> dict:
    """Worst excess of peak over final among fp8stream runs, by the external measure and by the report."""
    runs = [r for r in results if r["mode"] == "fp8stream"]
    if not runs:
        return {"bound_mib": bound_mib, "ok": False, "detail": "no fp8stream run"}
    details, ok = [], True
    for r in runs:
        if "error" in r:
            details.append(f"{r['scheme']}: failed")
            ok = False
            continue
        over = [r["report"]["peak_bytes"] - r["report"]["final_bytes"]]
        if r.get("peak_bytes") is not None:
            over.append(r["peak_bytes"] - r["after_bytes"])
        worst = max(over) / 2**20
        ok &= worst <= bound_mib
        details.append(f"{r['scheme']}: peak - final = {worst:.1f} MiB")
    return {"bound_mib": bound_mib, "ok": ok, "detail": "; ".join(details)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", help="checkpoint directory (config.json + safetensors shards)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--schemes", default="fp8_per_channel", help="fp8stream schemes, comma-separated; one run each")
    ap.add_argument("--device", default="cuda", help="cuda (cuda:N) or cpu for a smoke test")
    ap.add_argument("--out", default="results.json")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--check-bound-mib", type=float, default=None,
                    help="exit 1 unless every fp8stream run has peak <= final + this many MiB")
    ap.add_argument("--no-decode", action="store_true", help=f"skip the decode check ({DECODE_LABEL})")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mode before the worker is killed")
    ap.add_argument("--imports-in-clock", action="store_true",
                    help="time the model-code import and transformers' renaming table inside the load (a fresh process's first load)")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--scheme", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)} (choose from {', '.join(MODES)})")
    ckpt = Path(args.ckpt)
    if not (ckpt / "config.json").is_file():
        ap.error(f"{ckpt}: no config.json")
    info = checkpoint_info(ckpt)
    print(f"checkpoint {ckpt}: {info['tensors']} tensors, {info['bytes'] / GIB:.2f} GiB in {info['shards']} shards", flush=True)
    warm = warm_page_cache(ckpt)
    print(f"page cache warmed: {warm['bytes'] / GIB:.2f} GiB in {warm['seconds']:.1f} s ({warm['gb_per_s']:.1f} GB/s)", flush=True)

    results = []
    for mode in modes:
        schemes = [s.strip() for s in args.schemes.split(",") if s.strip()] if mode == "fp8stream" else [None]
        results += [run_mode(args, mode, s) for s in schemes]

    ok_run = next((r for r in results if "error" not in r), {})
    meta = {k: ok_run.get(k, "?") for k in ("device_name", "torch", "transformers", "python")}
    meta.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=shlex.join([sys.executable, *sys.argv]), device=args.device,
                decode_tokens=0 if args.no_decode else args.decode_tokens)
    doc = {"meta": meta, "checkpoint": info, "page_cache": warm, "results": results}
    if args.check_bound_mib is not None:
        doc["bound_check"] = bound_check(results, args.check_bound_mib)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    if args.markdown:
        Path(args.markdown).write_text(md)
    print("\n" + md, flush=True)
    return 0 if doc.get("bound_check", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
