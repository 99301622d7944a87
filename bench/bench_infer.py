"""Inference benchmark: fp8stream FP8 (each scheme) against the same model in bf16, eager and compiled, one command.

    python bench/bench_infer.py --out DIR [--models llama-3.1-8b,qwen1.5-moe-a2.7b] [--quick] [--budget-s 540]

Everything runs in the same harness, on the same card, in this one run; each (model, variant, mode)
in a fresh worker process (a crash or timeout in one configuration is recorded, the others go on):

  linear   one FP8Linear forward (eager) at M = 1, 16, 256, 4096, 16384 on the Llama-3.1-8B shapes
           (N x K = 4096x4096, 14336x4096, 4096x14336), each scheme, against F.linear in bf16 and against
           the bare FP8 GEMM on pre-quantized inputs (torch._scaled_mm rowwise; for fp8_per_block the
           blockwise GEMM the module uses): overhead = FP8Linear / bare - 1 is the activation
           quantization's cost. Also the same calls captured in a CUDA graph (GPU time, no launch
           overhead) and, for per-channel at 4096x4096, torch.compile'd FP8Linear (inductor-fused quant).
  models   each model shape from bench/configs, random weights: bf16 = transformers from_config on the
           GPU (its init: normal(0, initializer_range=0.02), norms 1); FP8 = fp8stream.load(load_format=
           "dummy"): normal(0, 0.02) values quantized by the scheme; kept modules (embeddings, lm_head,
           routers, norms) are bf16 in both. Measured:
             prefill tok/s  model(ids, use_cache=False, logits_to_keep=1), 1 x 4096 and 8 x 512 tokens; median of
                            --prefill-reps forwards (5) after --prefill-warm (2; compiled 2), each one recorded
                            (rep_tok_s); points whose repetitions differ by > 10 % are listed under the tables
             decode tok/s   transformers generate, greedy, exactly N new tokens (min_new_tokens = N) after
                            a 32-token random prompt, batch 1 / 8 / 32: B * N / wall time of generate
           eager: as loaded (dynamic cache). compiled: decode = transformers' static-cache recipe
           (generate(cache_implementation="static"): the decode step torch.compile'd, mode
           reduce-overhead = CUDA graphs); prefill = each decoder layer torch.compile'd (regional
           compilation; embedding / final norm / lm_head eager, the same for bf16 and FP8).

Order (priority, so that a --budget-s cut drops the least important): linear (at most 75 s);
compiled bf16 and per-channel decode b1 + prefill 1x4096 (the targets); eager bf16 and
fp8_per_channel; eager per-tensor and per-block; compiled prefill 8x512 and decode b8 / b32. A
whole-model compile takes minutes, so one model per command (--models) fits more in a budget. Work left when the budget runs out is listed
as skipped. Writes DIR/results.json (all records, environment, probes) and DIR/results.md (tables).
--quick: a smoke run (4 layers, 32 new tokens, smaller shapes): checks the harness, not a result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bench" / "configs"
DEFAULT_MODELS = "llama-3.1-8b,qwen1.5-moe-a2.7b"
ALL_SCHEMES = ("fp8_per_channel", "fp8_per_tensor", "fp8_per_block")
LINEAR_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
LINEAR_MS = (1, 16, 256, 4096, 16384)
COMPILE_ESTIMATE_S = 120  # a whole-model compile is not started with less than this left (first one per worker)


# ================================================================ worker side

DEVICE = "cuda"  # the worker's device (--device cpu: a smoke test of the harness itself)


def _sync():
    import torch

    if DEVICE != "cpu":
        torch.cuda.synchronize()


class _Clock:
    """CUDA events on the GPU, perf_counter on the CPU (smoke tests)."""

    def __init__(self):
        import torch

        self.cuda = DEVICE != "cpu"
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self):
        if self.cuda:
            self.a.record()
        else:
            self.t0 = time.perf_counter()

    def stop_ms(self) -> float:
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            return self.a.elapsed_time(self.b)
        return (time.perf_counter() - self.t0) * 1e3


def _emit(out: Path, **rec) -> None:
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def _time_loop(fn, min_s=0.05, max_iters=200) -> float:
    """Microseconds per call of fn, back to back (CUDA events around the loop: eager throughput,
    launch overhead included where the GPU waits for the CPU)."""
    import torch

    for _ in range(3):
        fn()
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    est = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(max_iters, max(10, min_s / est)))
    clock = _Clock()
    clock.start()
    for _ in range(iters):
        fn()
    return clock.stop_ms() * 1e3 / iters


def _time_graph(fn, reps=20) -> float:
    """Microseconds per call of fn replayed from a CUDA graph (GPU time only)."""
    import torch

    if DEVICE == "cpu":
        return None

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    _sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def _quantize_weight(w, scheme):
    import torch

    from fp8stream.quantize import quantize_blocks, quantize_rows

    if scheme == "fp8_per_block":
        return quantize_blocks(w.float())
    if scheme == "fp8_per_tensor":
        return quantize_rows(w.float(), (w.float().abs().amax() / 448).expand(w.shape[0]).contiguous())
    return quantize_rows(w.float())


def run_linear(spec: dict, out: Path) -> None:
    import torch
    import torch.nn.functional as F

    from fp8stream import kernels as K
    from fp8stream.modules import FP8Linear

    dev = torch.device(DEVICE)
    c = K.caps(dev) if dev.type == "cuda" else K.Caps(triton_quant=False)
    _emit(out, kind="probe", **K.prepare(dev))
    shapes = [tuple(s) for s in spec["shapes"]]
    for scheme in spec["schemes"]:
        for n, k in shapes:
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            q, s = _quantize_weight(w, scheme)
            lin = FP8Linear(k, n, False, scheme, torch.bfloat16, device=dev)
            lin.weight.data, lin.weight_scale.data = q, s
            compiled = None
            for m in spec["ms"]:
                if time.time() > spec["deadline"]:
                    _emit(out, kind="linear", scheme=scheme, n=n, k=k, m=m, skipped="budget")
                    continue
                rec = dict(kind="linear", scheme=scheme, n=n, k=k, m=m)
                try:
                    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                    with torch.no_grad():
                        rec["bf16_us"] = _time_loop(lambda: F.linear(x, w))
                        rec["fp8_us"] = _time_loop(lambda: lin(x))
                        mode = {"fp8_per_channel": "row", "fp8_per_tensor": "tensor", "fp8_per_block": "group"}[scheme]
                        if scheme == "fp8_per_block":
                            use_cublas = c.blockwise and n % 128 == 0 and k % 128 == 0
                            qx, sx = K._act_quant(x, mode, c, col_major=use_cublas)
                            if dev.type == "cpu":  # smoke test: the reference GEMM
                                def bare():
                                    return K.reference_linear(x, q, s, None, scheme)
                                rec["bare_gemm"] = "reference (cpu)"
                            elif use_cublas:
                                def bare():
                                    return K._blockwise_scaled_mm(qx, sx, q, s, torch.bfloat16)
                                rec["bare_gemm"] = "F.scaled_mm blockwise"
                            else:
                                def bare():
                                    return K.grouped_gemm(qx, sx, q, s, None, None, True, torch.bfloat16)
                                rec["bare_gemm"] = "triton blockwise"
                            rec["quant_us"] = _time_loop(lambda: K._act_quant(x, mode, c, col_major=use_cublas))
                        else:
                            qx, sx = K._act_quant(x, mode, c)
                            sxv, sw = sx.view(-1, 1), s.view(1, n)

                            def bare():
                                if dev.type == "cpu":  # smoke test: the reference GEMM
                                    return (qx.float() * sxv) @ (q.float() * sw.t()).t()
                                return torch._scaled_mm(qx, q.t(), scale_a=sxv, scale_b=sw, out_dtype=torch.bfloat16,
                                                        use_fast_accum=K.FAST_ACCUM)
                            # the floor runs the GEMM exactly as the module does (accumulation included)
                            rec["bare_gemm"] = f"torch._scaled_mm rowwise, use_fast_accum={K.FAST_ACCUM}"
                            rec["quant_us"] = _time_loop(lambda: K._act_quant(x, mode, c))
                            if c.triton_gemm:  # the Triton rowwise GEMM on the same inputs (FP8STREAM_TRITON_MAX_M)
                                def tri():
                                    return K.grouped_gemm(qx, sx, q, s, None, None, False, torch.bfloat16)
                                rec["triton_gemm_us"] = _time_loop(tri)
                                try:
                                    rec["graph_triton_gemm_us"] = _time_graph(tri)
                                except Exception as e:  # noqa: BLE001
                                    rec["graph_triton_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        rec["bare_us"] = _time_loop(bare)
                        rec["overhead_pct"] = 100 * (rec["fp8_us"] / rec["bare_us"] - 1)
                        rec["speedup_vs_bf16"] = rec["bf16_us"] / rec["fp8_us"]
                        try:
                            rec["graph_bf16_us"] = _time_graph(lambda: F.linear(x, w))
                            rec["graph_fp8_us"] = _time_graph(lambda: lin(x))
                            rec["graph_bare_us"] = _time_graph(bare)
                        except Exception as e:  # noqa: BLE001
                            rec["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        if spec["compiled"] and scheme == "fp8_per_channel" and (n, k) == shapes[0]:
                            try:
                                compiled = compiled or torch.compile(lin, dynamic=False)
                                rec["compiled_fp8_us"] = _time_loop(lambda: compiled(x))
                            except Exception as e:  # noqa: BLE001
                                rec["compiled_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    y, ref = lin(x), K.reference_linear(x, q, s, None, scheme)
                    rec["rel_err_vs_reference"] = float((y.float() - ref).norm() / ref.norm())
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                _emit(out, **rec)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            del lin, w, q, s


def _config_dir(model: str, layers: int | None) -> str:
    src = CONFIGS / model
    if not layers:
        return str(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    cfg.pop("max_window_layers", None)
    d = Path(tempfile.mkdtemp(prefix=f"bench-{model}-"))
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def build_model(model: str, variant: str, layers: int | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = _config_dir(model, layers)
    t0 = time.perf_counter()
    if variant == "bf16":
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device(DEVICE):
            m = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        if next(m.parameters()).device.type != torch.device(DEVICE).type:  # built elsewhere: move it
            m = m.to(DEVICE)
    else:
        import fp8stream

        # BENCH_FUSE_GATE_UP=0: load(fuse_gate_up=False), gate_proj / up_proj as two GEMMs, for A/B runs
        fuse = os.environ.get("BENCH_FUSE_GATE_UP", "1") != "0"
        m = fp8stream.load(path, device=DEVICE, scheme=variant, load_format="dummy", progress=False, fuse_gate_up=fuse)
    m.eval()
    _sync()
    return m, time.perf_counter() - t0


def _prefill_tok_s(model, b: int, t: int, reps: int = 3, warm: int = 1) -> tuple[float, list[float]]:
    """(median tokens/s, tokens/s of each timed forward): the spread between repetitions is part of the result."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (b, t), device=DEVICE)
    with torch.no_grad():
        for _ in range(warm):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        _sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            _sync()
            ts.append(time.perf_counter() - t0)
    return b * t / statistics.median(ts), [b * t / x for x in ts]


def _decode_tok_s(model, b: int, new: int, static: bool, warm_new: int, reps: int) -> tuple[float, float]:
    """(tokens/s of the timed runs (median), seconds of the warm-up)."""
    import torch

    g = torch.Generator().manual_seed(b)
    ids = torch.randint(0, model.config.vocab_size, (b, 32), generator=g).to(DEVICE)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(2 if static else 1):  # static: compile + CUDA graph recording need the same shapes
            model.generate(ids, max_new_tokens=warm_new, min_new_tokens=warm_new, **kw)
        _sync()
        warm_s = time.perf_counter() - t0
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            o = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            _sync()
            ts.append(time.perf_counter() - t0)
            assert o.shape[1] - ids.shape[1] == new, o.shape
    return b * new / statistics.median(ts), warm_s


def _compile_layers(model) -> int:
    layers = None
    for name in ("model.layers", "model.decoder.layers"):
        try:
            layers = model.get_submodule(name)
            break
        except AttributeError:
            continue
    if layers is None:
        raise RuntimeError("no decoder layer list found")
    import torch

    # one compiled graph should serve every layer; if a per-layer attribute forces recompiles, let them
    # happen (compile time grows) rather than fall back to eager past the default limit of 8
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(layers))
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit,
                                                                8 * len(layers))
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


def _unique_graphs() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return None


def run_model(spec: dict, out: Path) -> None:
    import torch

    from fp8stream import kernels as K

    model_name, variant, mode = spec["model"], spec["variant"], spec["mode"]
    base = dict(kind="model", model=model_name, variant=variant, mode=mode)
    K.prepare(DEVICE)
    model, load_s = build_model(model_name, variant, spec.get("layers"))
    with torch.no_grad():  # sanity: a forward gives finite logits
        ids = torch.randint(0, model.config.vocab_size, (1, 16), device=DEVICE)
        finite = bool(torch.isfinite(model(input_ids=ids).logits).all())
    _emit(out, **base, task="load", seconds=load_s, gib=torch.cuda.memory_allocated() / 2**30 if DEVICE != "cpu" else 0.0,
          layers=model.config.num_hidden_layers, logits_finite=finite)
    deadline = spec["deadline"]
    compiled_layers = False
    first_compile_s = None
    for task in spec["tasks"]:
        rec = dict(base, task=task)
        left = deadline - time.time()
        need = 5.0
        if mode == "compiled" and task.startswith("decode"):
            need = first_compile_s * 1.2 if first_compile_s else COMPILE_ESTIMATE_S
        if left < need:
            _emit(out, **rec, skipped=f"budget ({left:.0f} s left, ~{need:.0f} s needed)")
            continue
        try:
            kind, shape = task.split("_", 1)
            if kind == "prefill":
                b, t = (int(v) for v in shape.split("x"))
                if mode == "compiled" and not compiled_layers:
                    rec["compiled_layers"] = _compile_layers(model)
                    compiled_layers = True
                t0 = time.perf_counter()
                graphs0 = _unique_graphs()
                rec["tok_s"], rec["rep_tok_s"] = _prefill_tok_s(model, b, t, reps=spec["prefill_reps"],
                                                                warm=2 if mode == "compiled" else spec["prefill_warm"])
                rec["wall_s"] = time.perf_counter() - t0
                rec["tokens"] = b * t
                if mode == "compiled" and graphs0 is not None:
                    rec["dynamo_graphs_compiled"] = _unique_graphs() - graphs0  # 1 = all layers share one graph
            else:
                b = int(shape[1:])
                new = spec["new_tokens"]
                static = mode == "compiled"
                if static and compiled_layers:
                    raise RuntimeError("decode compiled must run before the regional prefill compile")
                graphs0 = _unique_graphs()
                rec["tok_s"], rec["warmup_s"] = _decode_tok_s(model, b, new, static, new if static else 8,
                                                              reps=spec["reps"])
                if static and graphs0 is not None:
                    rec["dynamo_graphs_compiled"] = _unique_graphs() - graphs0
                if static and first_compile_s is None:
                    first_compile_s = rec["warmup_s"]
                rec.update(batch=b, new_tokens=new, prompt_tokens=32)
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e).strip()[:400]}"
            rec["traceback"] = traceback.format_exc()[-2000:]
        _emit(out, **rec)
        if DEVICE != "cpu":
            torch.cuda.empty_cache()


def worker_main(spec_json: str) -> int:
    global DEVICE, CONFIGS
    spec = json.loads(spec_json)
    DEVICE, CONFIGS = spec["device"], Path(spec["config_root"])
    out = Path(spec["out"])
    try:
        if spec["mode"] == "linear":
            run_linear(spec, out)
        else:
            run_model(spec, out)
    except Exception as e:  # noqa: BLE001
        _emit(out, kind="worker_error", spec={k: v for k, v in spec.items() if k != "out"},
              error=f"{type(e).__name__}: {str(e).strip()[:400]}", traceback=traceback.format_exc()[-3000:])
        return 1
    return 0


# ================================================================ parent side

def plan(args) -> list[dict]:
    models = [m for m in args.models.split(",") if m]
    schemes = [s for s in args.schemes.split(",") if s]
    cschemes = [s for s in args.compiled_schemes.split(",") if s] if args.compiled else []
    prefill = [f"prefill_{p}" for p in args.prefill.split(",") if p]
    decode = [f"decode_b{b}" for b in args.decode_batches.split(",") if b]
    cdecode = [f"decode_b{b}" for b in args.compiled_decode_batches.split(",") if b]
    jobs = []
    if args.linear:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.linear_shapes.split(",")] if args.linear_shapes else (
            LINEAR_SHAPES[:1] if args.quick else LINEAR_SHAPES)
        ms = [int(v) for v in args.linear_ms.split(",")] if args.linear_ms else ((1, 256, 4096) if args.quick else LINEAR_MS)
        jobs.append(dict(mode="linear", schemes=schemes, shapes=shapes, ms=ms, compiled=args.compiled, share_s=75))
    first = [v for v in ["bf16", "fp8_per_channel"] if v == "bf16" or v in schemes]
    rest = [s for s in schemes if s not in first]
    cvars = ["bf16"] + cschemes if cschemes else []
    for m in models:
        for v in cvars:
            jobs.append(dict(mode="compiled", model=m, variant=v, tasks=cdecode[:1] + prefill[:1]))
    for m in models:
        for v in first:
            jobs.append(dict(mode="eager", model=m, variant=v, tasks=prefill + decode))
    for m in models:
        for v in rest:
            jobs.append(dict(mode="eager", model=m, variant=v, tasks=prefill + decode))
    for m in models:
        for v in cvars:
            jobs.append(dict(mode="compiled", model=m, variant=v, tasks=cdecode[1:] + prefill[1:]))
    return [j for j in jobs if j.get("tasks", True)]


def environment() -> dict:
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "host": platform.node()}
    try:
        import torch
        import transformers

        env.update(torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__)
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
            env["capability"] = list(torch.cuda.get_device_capability())
        try:
            import triton

            env["triton"] = triton.__version__
        except Exception as e:  # noqa: BLE001
            env["triton"] = f"unavailable ({type(e).__name__})"
    except Exception as e:  # noqa: BLE001
        env["error"] = str(e)
    try:
        env["commit"] = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True,
                                       text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return env


def _fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def targets(records: list[dict]) -> list[str]:
    """The targets (issue 20's: decode b1 1.3x bf16 compiled; prefill 1.5x, 1.3x on an MoE model), computed from the
    records (missing inputs say so)."""
    tok = {(r["model"], r["variant"], r["mode"], r["task"]): r["tok_s"] for r in records
           if r.get("kind") == "model" and "tok_s" in r}
    out = ["## Targets", ""]
    for model in dict.fromkeys(k[0] for k in tok):
        prefill_goal = 1.3 if "moe" in model else 1.5
        for label, mode, task, goal in (("decode batch 1, compiled", "compiled", "decode_b1", 1.3),
                                        ("prefill 1 x 4096, eager", "eager", "prefill_1x4096", prefill_goal),
                                        ("prefill 1 x 4096, compiled", "compiled", "prefill_1x4096", prefill_goal)):
            base = tok.get((model, "bf16", mode, task))
            for v in ALL_SCHEMES:
                got = tok.get((model, v, mode, task))
                if got is None:
                    continue
                ratio = got / base if base else None
                verdict = "-" if ratio is None else ("met" if ratio >= goal else "NOT met")
                out.append(f"- {model} {v}, {label}: {_fmt(ratio, 2)}x bf16 (target >= {goal}x): {verdict}")
    lin = [r for r in records if r.get("kind") == "linear" and r.get("m", 0) >= 256 and "overhead_pct" in r]
    for v in ALL_SCHEMES:
        rs = [r for r in lin if r["scheme"] == v]
        if not rs:
            continue
        worst = max(rs, key=lambda r: r["overhead_pct"])
        g = [100 * (r["graph_fp8_us"] / r["graph_bare_us"] - 1) for r in rs if r.get("graph_fp8_us") and r.get("graph_bare_us")]
        out.append(f"- FP8Linear {v} overhead over the bare GEMM at M >= 256: worst {worst['overhead_pct']:.0f}% eager "
                   f"(M={worst['m']}, {worst['n']}x{worst['k']}){f', worst {max(g):.0f}% in CUDA graphs' if g else ''} "
                   f"(target <= 15%): {'met' if worst['overhead_pct'] <= 15 else 'NOT met'}")
    return out + [""]


def markdown(env: dict, records: list[dict], args, wall_s: float) -> str:
    lines = [f"# bench_infer ({env.get('date_utc')})", "",
             f"{env.get('gpu', '?')} (sm_{''.join(map(str, env.get('capability', [])))}), torch {env.get('torch')} "
             f"(CUDA {env.get('cuda')}), transformers {env.get('transformers')}, triton {env.get('triton')}, "
             f"Python {env.get('python')}; commit {env.get('commit', '?')}", "",
             f"Command: `{args.command}` ({wall_s:.0f} s)", ""]
    probe = next((r for r in records if r.get("kind") == "probe"), None)
    if probe:
        lines += ["Kernel probes: " + ", ".join(f"{k}={probe.get(k)}" for k in
                                                 ("scaled_mm", "grouped", "blockwise", "triton_quant", "triton_gemm")), ""]
        for k, v in probe.get("probes", {}).items():
            lines.append(f"- {k}: {v}")
        lines.append("")
    lin = [r for r in records if r.get("kind") == "linear"]
    if lin:
        lines += ["## FP8Linear vs bf16 vs bare FP8 GEMM (microseconds per call)", "",
                  "eager = back-to-back calls (launch overhead included); graph = replayed CUDA graph (GPU time). "
                  "overhead = FP8Linear / bare GEMM - 1 (the activation quantization).", "",
                  "triton GEMM = the Triton rowwise kernel on the same quantized inputs (eager / graph), "
                  "an alternative to the bare cuBLAS GEMM at small M.", "",
                  "| scheme | N x K | M | bf16 | FP8Linear | bare GEMM | quant | overhead | FP8 vs bf16 | graph bf16 | graph FP8Linear | graph bare | compiled FP8Linear | triton GEMM | rel err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in lin:
            if "skipped" in r or "error" in r:
                lines.append(f"| {r['scheme']} | {r['n']}x{r['k']} | {r['m']} | {r.get('skipped') or r.get('error')} ||||||||||||")
                continue
            lines.append(
                f"| {r['scheme']} | {r['n']}x{r['k']} | {r['m']} | {_fmt(r.get('bf16_us'))} | {_fmt(r.get('fp8_us'))} | "
                f"{_fmt(r.get('bare_us'))} | {_fmt(r.get('quant_us'))} | {_fmt(r.get('overhead_pct'), 0)}% | "
                f"{_fmt(r.get('speedup_vs_bf16'), 2)}x | {_fmt(r.get('graph_bf16_us'))} | {_fmt(r.get('graph_fp8_us'))} | "
                f"{_fmt(r.get('graph_bare_us'))} | {_fmt(r.get('compiled_fp8_us'))} | "
                f"{_fmt(r.get('triton_gemm_us'))} / {_fmt(r.get('graph_triton_gemm_us'))} | {_fmt(r.get('rel_err_vs_reference'), 4)} |")
        lines.append("")
    mod = [r for r in records if r.get("kind") == "model" and r.get("task") != "load"]
    if mod:
        tasks = []
        for r in mod:
            if r["task"] not in tasks:
                tasks.append(r["task"])
        tasks.sort(key=lambda t: (not t.startswith("prefill"), int(t.split("_b")[-1]) if "_b" in t else 0))
        lines += ["## Models (tokens/s; in brackets: x the bf16 model in the same mode)", "",
                  "prefill_BxT: B sequences of T tokens, one forward, use_cache=False, logits_to_keep=1. "
                  f"decode_bB: generate, batch B, {args.new_tokens} new tokens after a 32-token prompt.", ""]
        for model in dict.fromkeys(r["model"] for r in mod):
            lines += [f"### {model}", "", "| variant | mode | " + " | ".join(tasks) + " |",
                      "|---|---|" + "---|" * len(tasks)]
            cells = {}
            for r in mod:
                if r["model"] == model:
                    cells[(r["variant"], r["mode"], r["task"])] = r
            for mode in ("eager", "compiled"):
                for variant in ["bf16", *ALL_SCHEMES]:
                    if not any(k[0] == variant and k[1] == mode for k in cells):
                        continue
                    row = []
                    for t in tasks:
                        r = cells.get((variant, mode, t))
                        if r is None:
                            row.append("")
                        elif "tok_s" in r:
                            base = cells.get(("bf16", mode, t), {}).get("tok_s")
                            ratio = f" ({r['tok_s'] / base:.2f}x)" if base and variant != "bf16" else ""
                            flag = " (nothing compiled!)" if mode == "compiled" and r.get("dynamo_graphs_compiled") == 0 else ""
                            row.append(f"{r['tok_s']:.0f}{ratio}{flag}")
                        else:
                            row.append(("skipped" if "skipped" in r else "error: " + r.get("error", "?")[:80]).replace("|", "/"))
                    lines.append(f"| {variant} | {mode} | " + " | ".join(row) + " |")
            loads = [r for r in records if r.get("kind") == "model" and r.get("task") == "load" and r["model"] == model]
            if loads:
                lines += ["", "Load / GPU memory: " + "; ".join(
                    f"{r['variant']} {r['mode']} {r['seconds']:.1f} s {r['gib']:.1f} GiB" for r in loads)]
            lines.append("")
    spread = [r for r in records if len(r.get("rep_tok_s", [])) > 1 and max(r["rep_tok_s"]) > 1.1 * min(r["rep_tok_s"])]
    if spread:  # one forward is ~0.1-4 s: a slow repetition shows here before it moves a median
        lines += ["Prefill points whose repetitions differ by > 10 % (tokens/s, min-max): " + "; ".join(
            f"{r['model']} {r['variant']} {r['mode']} {r['task']} {min(r['rep_tok_s']):.0f}-{max(r['rep_tok_s']):.0f}"
            for r in spread), ""]
    lines += targets(records)
    errs = [r for r in records if r.get("kind") == "worker_error" or (r.get("kind") == "job" and r.get("error"))]
    if errs:
        lines += ["## Errors", ""] + [f"- {json.dumps({k: v for k, v in r.items() if k != 'traceback'})[:600]}" for r in errs] + [""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results directory (results.json, results.md, worker logs)")
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"names under bench/configs (default {DEFAULT_MODELS})")
    ap.add_argument("--schemes", default=",".join(ALL_SCHEMES))
    ap.add_argument("--compiled-schemes", default="fp8_per_channel", help="FP8 schemes also run compiled (with bf16)")
    ap.add_argument("--no-compiled", dest="compiled", action="store_false")
    ap.add_argument("--no-linear", dest="linear", action="store_false")
    ap.add_argument("--prefill", default="1x4096,8x512", help="BxT shapes")
    ap.add_argument("--decode-batches", default="1,8,32")
    ap.add_argument("--compiled-decode-batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=1, help="timed generate calls per decode point (median)")
    ap.add_argument("--prefill-reps", type=int, default=5, help="timed forwards per prefill point (median; each is recorded)")
    ap.add_argument("--prefill-warm", type=int, default=2, help="untimed forwards before an eager prefill point")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (faster compiles; ratios shift "
                                                              "towards the bf16 embedding / lm_head share)")
    ap.add_argument("--budget-s", type=float, default=540, help="stop starting work after this many seconds")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 layers, 32 new tokens, small shapes")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the harness (tiny configs via --config-root)")
    ap.add_argument("--config-root", default=str(CONFIGS), help="directory of <model>/config.json")
    ap.add_argument("--linear-shapes", default=None, help="NxK list for the Linear microbenchmark (default: Llama-3.1-8B's)")
    ap.add_argument("--linear-ms", default=None, help="M list for the Linear microbenchmark (default 1,16,256,4096,16384)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if not args.out:
        ap.error("--out is required")
    if args.quick:
        args.layers = args.layers or 4
        args.new_tokens = 32 if args.new_tokens == 128 else args.new_tokens
        if args.prefill == "1x4096,8x512":
            args.prefill = "1x1024,4x256"
        if args.decode_batches == "1,8,32":
            args.decode_batches = "1,8"
        if args.compiled_decode_batches == "1,8,32":
            args.compiled_decode_batches = "1"
    args.command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, os.getcwd()), *(argv or sys.argv[1:])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    end = t_start + args.budget_s
    env = environment()
    print(json.dumps({"env": env}), flush=True)
    jobs = plan(args)
    raw = out / "records.jsonl"
    raw.write_text("")
    records: list[dict] = []
    pyenv = dict(os.environ, PYTHONUNBUFFERED="1")
    pyenv["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + pyenv["PYTHONPATH"] if pyenv.get("PYTHONPATH") else "")
    for i, job in enumerate(jobs):
        now = time.time()
        label = f"{job['mode']} {job.get('model', '')} {job.get('variant', '')}".strip()
        if end - now < 20:
            records.append(dict(kind="job", job=label, skipped="budget", tasks=job.get("tasks")))
            print(f"=== skip {label}: budget", flush=True)
            continue
        deadline = min(end, now + job["share_s"]) if "share_s" in job else end
        jout = out / f"worker-{i:02d}.jsonl"
        jout.write_text("")
        spec = dict(job, out=str(jout), deadline=deadline, new_tokens=args.new_tokens, reps=args.reps, layers=args.layers,
                    prefill_reps=args.prefill_reps, prefill_warm=args.prefill_warm,
                    device=args.device, config_root=args.config_root)
        print(f"=== {label} (tasks {job.get('tasks', '')}, {end - now:.0f} s of budget left)", flush=True)
        t0 = time.time()
        err = None
        try:
            with open(out / f"worker-{i:02d}.log", "w") as log:
                p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=str(ROOT), env=pyenv,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   timeout=max(30, min(deadline - now + 90, end + 40 - now)))  # hard stop: budget + 40 s
            if p.returncode:
                err = f"worker exit code {p.returncode} (log: worker-{i:02d}.log)"
        except subprocess.TimeoutExpired:
            err = f"timeout after {time.time() - t0:.0f} s (log: worker-{i:02d}.log)"
        got = [json.loads(line) for line in jout.read_text().splitlines() if line.strip()]
        records += got
        with open(raw, "a") as f:
            for r in got:
                f.write(json.dumps(r) + "\n")
        records.append(dict(kind="job", job=label, seconds=time.time() - t0, error=err))
        print(f"=== {label}: {time.time() - t0:.0f} s{'; ' + err if err else ''}", flush=True)
        (out / "results.json").write_text(json.dumps({"env": env, "command": args.command, "records": records}, indent=1))
        (out / "results.md").write_text(markdown(env, records, args, time.time() - t_start))
    wall = time.time() - t_start
    (out / "results.json").write_text(json.dumps({"env": env, "command": args.command, "wall_s": wall, "records": records}, indent=1))
    md = markdown(env, records, args, wall)
    (out / "results.md").write_text(md)
    print(md)
    failed = [r for r in records if r.get("error") or r.get("kind") == "worker_error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
