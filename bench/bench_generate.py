"""transformers' generate as a user calls it: fp8stream's default decode path against bf16, fresh processes.

    python bench/bench_generate.py --out DIR [--model llama-3.1-8b] [--variants bf16,bf16_compiled,fp8,fp8_eager]
                                   [--reps 3] [--batches 1,8] [--new-tokens 64] [--layers N]

Variants (random weights from bench/configs/<model>; the same shapes, kept modules bf16 in both):
  bf16           transformers from_config on the GPU, model.generate as is (dynamic cache, eager)
  bf16_compiled  the same model, generate(cache_implementation="static"): transformers compiles the decode
                 step (torch.compile, mode reduce-overhead)
  fp8            fp8stream.load(load_format="dummy"), model.generate as is: fp8stream's default (its own decode
                 loop: static cache, the whole step one CUDA graph, no per-step host sync; decode_loop.py)
  fp8_hf_loop    the same FP8 model, generate(return_dict_in_generate=True): an option the own loop does not
                 take, so transformers' loop runs, each forward replayed from a CUDA graph (decode.py)
  fp8_eager      the same FP8 model, generate(cache_implementation="dynamic", disable_compile=True)
A variant may carry settings for its worker's environment after '@', '+'-separated (an A/B of one knob in one
run): fp8@FP8STREAM_CACHE_ROUND=256+FP8STREAM_FUSED_NORMS=0 is the fp8 variant with those two set.

Each (variant, repetition) is a fresh worker process; repetitions are interleaved (rep 1 of every variant,
then rep 2, ...). A worker: imports, builds the model, runs generate(max_new_tokens=2) (ready_s: process
start to the first decoded token, i.e. import + build + prefill + the first decode step with its capture
or compilation), then per batch size a first generate of --new-tokens (first_call_s: includes a capture /
compile for that batch) and --calls timed ones (greedy, exactly N new tokens after a 32-token prompt;
tokens/s = B * N / wall, median of the calls). The report gives, per point, the median over the
repetitions, the spread ((max - min) / median, flagged over 10 %) and the ratios to bf16 and bf16_compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

T_START = time.time()
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bench" / "configs"
VARIANTS = ("bf16", "bf16_compiled", "fp8", "fp8_hf_loop", "fp8_eager")


def _config_dir(model: str, layers: int | None, root: Path) -> str:
    src = root / model
    if not layers:
        return str(src)
    import tempfile

    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    cfg.pop("max_window_layers", None)
    d = Path(tempfile.mkdtemp(prefix=f"bench-{model}-"))
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def worker(spec: dict) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = spec["device"]
    sync = torch.cuda.synchronize if dev != "cpu" else (lambda: None)
    path = _config_dir(spec["model"], spec["layers"], Path(spec["config_root"]))
    variant = spec["variant"].split("@")[0]
    t0 = time.perf_counter()
    if variant.startswith("bf16"):
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    else:
        import fp8stream

        model = fp8stream.load(path, device=dev, load_format="dummy", progress=False)
    model.eval()
    sync()
    rec = {"build_s": time.perf_counter() - t0}
    kw = {"bf16": {}, "fp8": {}, "bf16_compiled": {"cache_implementation": "static"},
          "fp8_hf_loop": {"return_dict_in_generate": True},
          "fp8_eager": {"cache_implementation": "dynamic", "disable_compile": True}}[variant]

    def generate(ids, new):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0, **kw)
        out = getattr(out, "sequences", out)
        sync()
        assert out.shape[1] - ids.shape[1] == new, out.shape
        return out

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    first_batch = spec["batches"][0]
    ids = torch.randint(0, vocab, (first_batch, 32), generator=g).to(dev)
    generate(ids, 2)
    rec["ready_s"] = time.time() - spec["t_spawn"]
    points = {}
    for b in spec["batches"]:
        ids = torch.randint(0, vocab, (b, 32), generator=g).to(dev)
        t = time.perf_counter()
        generate(ids, spec["new_tokens"])
        first = time.perf_counter() - t
        walls = []
        for _ in range(spec["calls"]):
            t = time.perf_counter()
            generate(ids, spec["new_tokens"])
            walls.append(time.perf_counter() - t)
        points[str(b)] = {"first_call_s": first, "tok_s": b * spec["new_tokens"] / statistics.median(walls),
                          "call_tok_s": [b * spec["new_tokens"] / w for w in walls]}
    rec["points"] = points
    stats = getattr(model, "_fp8stream_graphs", None)
    if stats is not None:
        rec["graphs"] = dict(stats.stats)
    rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if dev != "cpu" else None
    return rec


def _spread(xs: list[float]) -> float:
    return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 else 0.0


def summarize(records: list[dict], variants: list[str], batches: list[int]) -> dict:
    ok = [r for r in records if "points" in r]
    out: dict = {"points": {}, "ready_s": {}}
    for v in variants:
        rs = [r for r in ok if r["variant"] == v]
        if rs:
            ready = [r["ready_s"] for r in rs]
            out["ready_s"][v] = {"median": statistics.median(ready), "spread": _spread(ready), "n": len(ready)}
        for b in batches:
            xs = [r["points"][str(b)]["tok_s"] for r in rs]
            firsts = [r["points"][str(b)]["first_call_s"] for r in rs]
            if xs:
                out["points"][f"{v}/b{b}"] = {"tok_s": statistics.median(xs), "spread": _spread(xs), "n": len(xs),
                                              "first_call_s": statistics.median(firsts), "runs": xs}
    for b in batches:
        for v in variants:
            for base in ("bf16", "bf16_compiled"):
                p, q = out["points"].get(f"{v}/b{b}"), out["points"].get(f"{base}/b{b}")
                if p and q and v != base:
                    p[f"x_{base}"] = p["tok_s"] / q["tok_s"]
    return out


def markdown(summary: dict, args, env: dict) -> str:
    lines = [f"# generate, {args.model}, {env['gpu']} ({env['date']})", "",
             f"`{env['command']}`", "",
             f"torch {env['torch']}, transformers {env['transformers']}; {args.reps} fresh processes per variant, "
             f"interleaved; {args.new_tokens} new tokens after a 32-token prompt, median of {args.calls} calls per process.", "",
             "| variant / batch | tok/s (median) | spread | x bf16 | x bf16 compiled | first call s | runs |",
             "|---|---|---|---|---|---|---|"]
    for k, p in summary["points"].items():
        flag = " (> 10 %)" if p["spread"] > 0.10 else ""
        lines.append(f"| {k} | {p['tok_s']:.1f} | {100 * p['spread']:.1f} %{flag} | {p.get('x_bf16', float('nan')):.2f} | "
                     f"{p.get('x_bf16_compiled', float('nan')):.2f} | {p['first_call_s']:.2f} | "
                     f"{', '.join(f'{x:.1f}' for x in p['runs'])} |")
    lines += ["", "| variant | ready s (process start to the first decoded token) | spread |", "|---|---|---|"]
    for v, r in summary["ready_s"].items():
        lines.append(f"| {v} | {r['median']:.2f} | {100 * r['spread']:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--calls", type=int, default=2, help="timed generate calls per batch in each process")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (a smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config-root", default=str(CONFIGS))
    ap.add_argument("--worker-timeout-s", type=float, default=400)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        spec["t_spawn"] = spec.get("t_spawn", T_START)
        print("RESULT " + json.dumps(worker(spec)), flush=True)
        return 0
    if not args.out:
        ap.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    bad = [v for v in variants if v.split("@")[0] not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)} (optionally @KEY=VALUE+KEY=VALUE)")
    batches = [int(b) for b in args.batches.split(",")]
    records = []
    for rep in range(args.reps):
        for v in variants:
            spec = dict(model=args.model, variant=v, layers=args.layers, device=args.device, batches=batches,
                        new_tokens=args.new_tokens, calls=args.calls, config_root=args.config_root)
            spec["t_spawn"] = time.time()
            rec = {"variant": v, "rep": rep}
            settings = dict(kv.split("=", 1) for kv in v.split("@", 1)[1].split("+")) if "@" in v else {}
            try:
                p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                                   timeout=args.worker_timeout_s, env={**os.environ, **settings, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"})
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode == 0 and line:
                    rec.update(json.loads(line[-1][7:]))
                else:
                    rec["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][-400:]
                with open(out / "workers.log", "a") as f:  # one file: the device returns at most 8
                    f.write(f"==== {v} rep {rep} rc {p.returncode}\n{p.stdout}{p.stderr}\n")
            except subprocess.TimeoutExpired:
                rec["error"] = f"timed out after {args.worker_timeout_s} s"
            records.append(rec)
            print(json.dumps(rec)[:600], flush=True)
    import torch
    import transformers

    env = {"gpu": torch.cuda.get_device_name() if args.device != "cpu" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}
    summary = summarize(records, variants, batches)
    (out / "results.json").write_text(json.dumps({"env": env, "records": records, "summary": summary}, indent=1))
    md = markdown(summary, args, env)
    (out / "results.md").write_text(md)
    print(md)
    return 0 if all("points" in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
