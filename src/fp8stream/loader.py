"""`load()`: the setup of a streaming load, from a checkpoint directory to the work list that stream.py fills.

config.json -> a meta-device model of transformers' own class (meta_model.py) -> the load plan (load_plan.py) -> FP8 modules in
place of the Linear / experts modules (modules.py, experts.py) -> this rank's shard of each (parallel.py) -> per parameter,
its staging chunks and reads -> stream.stream_weights -> the report.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._gc import gc_paused
from .checkpoint import DEFAULT_READ_THREADS, Checkpoint
from .errors import CheckpointError, Fp8StreamError, UnsupportedModelError
from .experts import FP8Experts
from .load_plan import TargetPlan, build_plan, prequantized_scheme, scale_pieces
from .memory import MemoryLedger, Sampler
from .meta_model import build_meta_model
from .modules import SENSITIVE_RULE, FP8Linear, coverage, gated_mlps, qkv_groups, replace_with_fp8, sensitive_modules
from .parallel import current_group, install_hooks, local_plan, plan_layout, shard_meta
from .quantize import FP8_DTYPE, SCHEMES, quantize_blocks, quantize_rows_into, scale_from_amax, tensor_amax
from .report import LoadReport
from .source import Source
from .stream import _FusedStorage, _kept_chunks, _quantized_chunks, _schedule, _Target, _unique_bytes, stream_weights

log = logging.getLogger("fp8stream")

# Kept in full precision unless the user asks otherwise: MoE routers and shared-expert gates (tiny,
# and routing decisions are sensitive); the output embedding is added by name at load time.
DEFAULT_IGNORE = (r"(^|\.)gate$", r"(^|\.)shared_expert_gate$")


@dataclass
class _LoadState:
    """What `reload()` needs of a model `load()` built (attached as `model._fp8stream_state`): the scheme and
    dtype, the device, the load plan over the whole model (checkpoint key -> parameter rows, before any tp/ep
    split) with the on-disk shape of each key, and the tp/ep layout and group of this rank."""

    scheme: str
    dtype: torch.dtype
    device: torch.device
    plans: dict[str, TargetPlan] | None  # None after a dummy load: reload builds it from its first source
    key_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tied: frozenset = frozenset()  # tied parameter names (their checkpoint tensors are skipped, as load skips them)
    layout: object = None  # parallel.Layout of this rank, None on one device
    group: object = None  # parallel.Group
    prequantized: bool = False


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise Fp8StreamError(f"unknown device '{device}' (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Fp8StreamError(f"device '{device}' requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise Fp8StreamError(f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise Fp8StreamError(f"unsupported device '{device}' (use cpu, cuda or cuda:N)")
    return dev


def _load_config(path: Path):
    from transformers import AutoConfig

    cfg = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory" if path.exists() else f"{path}: no such file or directory")
    if not cfg.is_file():
        raise CheckpointError(f"{cfg}: missing (every checkpoint directory needs a config.json)")
    try:  # our own parse first: transformers' message for bad JSON does not say where
        doc = json.loads(cfg.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{cfg}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{cfg}: not a JSON object")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError with multi-line text
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        n = next((i for i, ln in enumerate(lines) if not ln.endswith(":")), len(lines) - 1)
        raise CheckpointError(f"{cfg}: {' '.join(lines[: n + 1])}") from None  # "field 'x':" needs its next line


def _targets(model: nn.Module, plans: dict[str, TargetPlan] | None) -> list[_Target]:
    out, seen = [], set()
    for mod_name, module in model.named_modules():
        for attr, p in list(module._parameters.items()):
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{attr}" if mod_name else attr
            if isinstance(module, FP8Linear) and attr == "weight":
                scale = "weight_scale"
            elif isinstance(module, FP8Experts) and attr in ("gate_up_proj", "down_proj"):
                scale = f"{attr}_scale"
            elif isinstance(module, (FP8Linear, FP8Experts)) and attr.endswith("_scale"):
                continue  # filled together with its weight
            else:
                scale = None
            out.append(_Target(name, module, attr, scale, plans.get(name) if plans is not None else None))
    return out


def _check_coverage(cov, model_type: str, cfg: Path, allow: bool) -> None:
    """Refuse a model that would end mostly in full precision: the user asked for FP8."""
    if not cov.unhandled:
        return
    what = "; ".join(f"{cls} ({len(names)} weight{'s' * (len(names) > 1)}, e.g. '{names[0]}')" for cls, names in cov.unhandled.items())
    if cov.expected_fraction < 0.5 and not allow:
        raise UnsupportedModelError(
            f"{cfg}: model type '{model_type}': only {100 * cov.fraction:.0f}% of its weights can be stored in FP8; not handled: {what}. "
            "Pass --allow-unquantized (allow_unquantized=True) to load it with the rest in full precision")
    log.warning("model type '%s': %.0f%% of the weights in FP8; kept in full precision, not handled: %s", model_type, 100 * cov.fraction, what)


def _mark_transposed(model: nn.Module, plans: dict[str, TargetPlan] | None) -> list[str]:
    """The plans of FP8 weights whose checkpoint tensor is stored transposed ([.., in, out]: a Conv1D, Llama 4's
    experts) read it transposed."""
    names = [n for n, m in model.named_modules() if getattr(m, "transposed_source", False)]
    for n in names:
        module = model.get_submodule(n)
        for attr in ("weight",) if isinstance(module, FP8Linear) else ("gate_up_proj", "down_proj"):
            plan = plans.get(f"{n}.{attr}") if plans is not None else None
            if plan is None:
                continue
            whole = len(plan.pieces) == 1 and plan.pieces[0].src_row == 0 and plan.pieces[0].rows == math.prod(plan.shape[:-1])
            if not whole:
                raise UnsupportedModelError(f"'{n}.{attr}': a transposed weight fused from several checkpoint tensors is not supported")
            plan.transposed = True
    return names


def _fp8_sources(plan: TargetPlan | None, ckpt: Checkpoint | None) -> bool:
    return plan is not None and any(ckpt.tensors[k].dtype == FP8_DTYPE for k in plan.sources)


def _full_precision_modules(model: nn.Module, plans: dict[str, TargetPlan], ckpt: Checkpoint) -> list[str]:
    """Pre-quantized checkpoint: modules whose weights are stored in full precision stay so (as vLLM does),
    as ignore patterns; a module is quantized only when its checkpoint weights are FP8."""
    out = []
    for name, module in model.named_modules():
        attrs = ["weight"] if isinstance(module, nn.Linear) else [a for a in ("gate_up_proj", "down_proj") if isinstance(getattr(module, a, None), nn.Parameter)]
        if attrs and not all(_fp8_sources(plans.get(f"{name}.{a}"), ckpt) for a in attrs):
            out.append(rf"^{re.escape(name)}$")
    return out


def _check_prequantized(targets: list[_Target], ckpt: Checkpoint, scheme: str, suffix: str) -> dict[str, list]:
    """Every FP8 checkpoint tensor must land in an FP8 parameter (no dequantization), whole; its scales are planned."""
    scales = {}
    for t in targets:
        if t.plan is None or not _fp8_sources(t.plan, ckpt):
            continue
        key = next(k for k in t.plan.sources if ckpt.tensors[k].dtype == FP8_DTYPE)
        if t.scale_attr is None:
            raise CheckpointError(f"{ckpt.tensors[key].file}: tensor '{key}' is stored in FP8 but the model's '{t.name}' is kept in "
                                  "full precision (--ignore, or a Linear whose dims are not multiples of 16); fp8stream does not dequantize")
        other = next((k for k in t.plan.sources if ckpt.tensors[k].dtype != FP8_DTYPE), None)
        if other is not None:
            raise CheckpointError(f"{ckpt.tensors[other].file}: tensor '{other}' is {str(ckpt.tensors[other].dtype).removeprefix('torch.')} "
                                  f"but '{key}', fused with it into '{t.name}', is FP8")
        scales[t.name] = scale_pieces(t.plan, ckpt, scheme, suffix)
    return scales


class _KernelWarmup:
    """Runs, on a side thread and on tiny tensors, the device work the load does per chunk (a pinned
    host-to-device copy on a side stream, the quantization or full-precision kernels for this source dtype),
    while the loader thread builds the model and the plan.

    Why: the first launch of each of these kernels in a process loads its module into the CUDA context
    (lazy module loading): the first row quantization of a process took 0.07-0.31 s on the H100, the next
    0.2-0.8 ms, and 0.009-0.12 s with CUDA_MODULE_LOADING=EAGER (bench/first_use_cost.py). On this thread that
    wait overlaps the Python-bound setup instead of stalling the first chunks of the stream (fresh-process
    A/B: streaming 1.20 s with it, 1.36 s without; BENCHMARKS.md). Best effort: any error here is left for
    the real load to meet and report."""

    def __init__(self, device: torch.device, src_dtype: torch.dtype, dtype: torch.dtype, scheme: str):
        self._args = (device, src_dtype, dtype, scheme)
        self._thread = threading.Thread(target=self._run, name="fp8stream-warmup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        device, src_dtype, dtype, scheme = self._args
        try:
            torch.cuda.set_device(device)
            host = torch.ones(64, 2048, dtype=src_dtype, pin_memory=True)  # a real width: the same kernel variants
            side, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)
            with torch.cuda.stream(side):
                x = host.to(device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            compute.wait_event(copied)
            x.record_stream(compute)
            q, s = torch.empty(64, 2048, dtype=FP8_DTYPE, device=device), torch.empty(64, device=device)
            if scheme == "fp8_per_block":
                quantize_blocks(x)
            else:
                quantize_rows_into(x, q, s)
                quantize_rows_into(x, q, s, scale_from_amax(tensor_amax(x)).expand(64))
            kept = torch.empty(64, 2048, dtype=dtype, device=device)
            kept.copy_(x)
            norms = torch.zeros(2, dtype=dtype, device=device)
            torch.linalg.vector_norm(kept, float("inf"), out=norms[0])
            torch.stack([torch.isfinite(norms).all(), torch.isfinite(s).all()]).all().item()
        except Exception as e:  # pragma: no cover - best effort, see the docstring
            log.debug("kernel warm-up: %s", e)

    def join(self) -> None:
        self._thread.join()


# The cyclic collector is paused for the whole load: a full collection walks every Python object (about 0.2 s
# once a 19k-tensor checkpoint's headers and plan exist) and lands at random inside the load; a load makes no
# cyclic garbage that must go before it returns.
@gc_paused()
def load(
    path: str | Path,
    device: str | torch.device = "cuda",
    scheme: str | None = None,
    *,
    load_format: str = "auto",
    staging_mib: float = 256,
    ignore: tuple[str, ...] | list[str] = (),
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    read_threads: int = DEFAULT_READ_THREADS,
    prefetch_buffers: int = 8,
    timeline: str | Path | None = None,
    tp: int = 1,
    ep: bool = False,
    keep_sensitive: bool = False,
    fuse_gate_up: bool = True,
    allow_unquantized: bool = False,
    cuda_graphs: bool = True,
):
    """Stream a Hugging Face checkpoint directory into an FP8 transformers model on `device`.

    Returns a transformers PreTrainedModel whose Linear layers / fused MoE experts are FP8; its
    `fp8stream_report` attribute is a LoadReport. Raises Fp8StreamError (one-line message) on bad input.
    `read_threads` positional reads run in parallel into a ring of `prefetch_buffers` pinned host buffers,
    each the size of the largest staging chunk (CUDA); `timeline` names a PNG to draw memory and progress
    against time (its data goes next to it as JSON). `scheme` defaults to the checkpoint's own for a pre-quantized FP8
    checkpoint (config.json quantization_config: its FP8 bytes are copied, never requantized; another
    scheme is an error), else fp8_per_channel.

    `tp=N` (N = world size) / `ep=True`: inside an initialised torch.distributed process group (torchrun),
    this rank loads, and reads, only its part of the model: tensor parallel along transformers'
    `base_model_tp_plan`, MoE experts expert-parallel with `ep` (see parallel.py); device "cuda" means
    cuda:LOCAL_RANK. The report is this rank's.

    `keep_sensitive`: also keep the first and the last decoder layer's Linear / experts modules in the
    model dtype (chosen by name, no calibration data; the report's `kept_sensitive` lists them).

    `fuse_gate_up` (single device): the gate_proj and up_proj weights of every MLP whose forward is the canonical
    `down_proj(act_fn(gate_proj(x)) * up_proj(x))` are loaded into the two halves of one storage, and at prefill sizes
    the MLP runs them as one GEMM, with silu(gate) * up fused into the down projection's input quantization (decode
    sizes keep the two projections). The parameters keep their names and shapes (views); the report's
    `gate_up_fused` counts the MLPs. H100, Llama-8B prefill 1 x 4096 compiled: 1.42x -> 1.48x bf16.
    Likewise (single device, always) the q_proj, k_proj and v_proj of each attention share one storage and run as one
    GEMM when called with the same input (modules.SharedInput); the report's `qkv_fused` counts them.

    A model of which less than half the weights that were not kept on purpose (`ignore`, routers, `keep_sensitive`)
    can be stored in FP8 is refused (UnsupportedModelError naming the model type and the module classes fp8stream
    cannot quantize) unless `allow_unquantized`; the report's `quantized_fraction` is the FP8 share of the >= 2-D
    weights outside the embeddings, always.

    `cuda_graphs` (CUDA, one device): `model.generate` uses a static KV cache and replays each decode step from a
    CUDA graph captured on the first step (decode.py; no torch.compile). False keeps transformers' defaults.
    """
    t_call = time.perf_counter()  # load_seconds is the whole call, as the caller waits for it
    if scheme is not None and scheme not in SCHEMES:
        raise Fp8StreamError(f"unknown scheme '{scheme}' (choose from {', '.join(SCHEMES)})")
    if load_format not in ("auto", "dummy"):
        raise Fp8StreamError(f"unknown load format '{load_format}' (auto or dummy)")
    if not staging_mib > 0:
        raise Fp8StreamError(f"--staging-mib must be positive, got {staging_mib}")
    path = Path(path)
    group = current_group(tp, ep)
    if group is not None and str(device) == "cuda":
        device = f"cuda:{group.local_rank}"
    dev = _device(device)
    if group is not None and dev.type == "cuda":
        torch.cuda.set_device(dev)
    config = _load_config(path)
    pre = prequantized_scheme(json.loads((path / "config.json").read_bytes()).get("quantization_config"), path / "config.json")
    if pre is not None and scheme is not None and scheme != pre[0]:
        raise Fp8StreamError(f"{path / 'config.json'}: checkpoint is already quantized as {pre[0]}; loading it as {scheme} would "
                             "need requantization (omit --scheme)")
    scheme = pre[0] if pre is not None else scheme or "fp8_per_channel"
    if read_threads < 1 or prefetch_buffers < 1:
        raise Fp8StreamError(f"read threads and prefetch buffers must be >= 1 (got {read_threads}, {prefetch_buffers})")
    ckpt = Checkpoint(path, read_threads=read_threads) if load_format == "auto" else None
    if ckpt is not None:
        ckpt.check_index()
    src_dtype = dtype
    if ckpt is not None:
        float_dtypes = [i.dtype for i in ckpt.tensors.values() if i.dtype.is_floating_point and i.dtype.itemsize > 1]
        src_dtype = max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else dtype
    warmup = _KernelWarmup(dev, src_dtype, dtype, scheme) if dev.type == "cuda" else None
    src = None
    try:
        try:
            model = build_meta_model(config, dtype)
        except Fp8StreamError:
            raise
        except Exception as e:  # config values transformers' validation lets through (negative sizes, unknown rope type...)
            first = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{path / 'config.json'}: cannot build the {config.model_type} model it describes ({type(e).__name__}: {first})") from None
        full_precision = sum(p.numel() for p in model.parameters()) * src_dtype.itemsize
        plans = build_plan(model, ckpt, scale_suffix=pre[1] if pre else None) if ckpt is not None else None

        ignore = list(DEFAULT_IGNORE) + list(ignore)
        out_emb = model.get_output_embeddings()
        if out_emb is not None:
            out_name = next(n for n, m in model.named_modules() if m is out_emb)
            ignore.append(rf"^{out_name}$")
        if pre is not None and plans is not None:
            ignore += _full_precision_modules(model, plans, ckpt)
        sensitive = sensitive_modules(model) if keep_sensitive else []
        ignore += [rf"^{re.escape(n)}$" for n in sensitive]
        try:
            quantized, kept_modules = replace_with_fp8(model, scheme, ignore, dtype)
        except Exception as e:
            if isinstance(e, Fp8StreamError):
                raise
            raise Fp8StreamError(f"--ignore: {e}") from None
        cov = coverage(model, ignore)
        _check_coverage(cov, config.model_type, path / "config.json", allow_unquantized)
        transposed = _mark_transposed(model, plans)
        if transposed and pre is not None:
            raise UnsupportedModelError(f"{path / 'config.json'}: pre-quantized FP8 checkpoints of Conv1D models ({config.model_type}) are not supported")
        global_plans = plans
        layout = None
        if group is not None:
            if pre is not None:
                raise UnsupportedModelError(f"{path / 'config.json'}: tp/ep loads of pre-quantized FP8 checkpoints are not supported yet; load the full-precision checkpoint")
            tied = set(getattr(model, "all_tied_weights_keys", None) or {})
            if transposed:
                raise UnsupportedModelError(f"{path / 'config.json'}: tensor parallel for transposed (Conv1D / Llama 4 experts) layers ({config.model_type}: '{transposed[0]}') "
                                            "is not supported; load it on one device")
            layout = plan_layout(model, tp, ep, group.rank, group.world, tied)
            shard_meta(model, layout)
            if plans is not None:
                plans = {name: local_plan(plan, layout.shards.get(name)) for name, plan in plans.items()}
        targets = _targets(model, plans)
        # tensor parallel leaves the MLPs as they are: its forward hooks sit on the projections the fused forward skips
        # and q / k / v likewise (their hooks shard each projection's output)
        siblings = _FusedStorage(gated_mlps(model) if fuse_gate_up else [], qkv_groups(model)) if layout is None else None
        if layout is not None:
            for t in targets:
                t.group = group.group
        scales = _check_prequantized(targets, ckpt, scheme, pre[1]) if pre is not None and ckpt is not None else {}
        final_bytes = _unique_bytes(list(model.parameters()) + list(model.buffers()))
        staging = int(staging_mib * 2**20)
        ledger = MemoryLedger(dev, staging)
        ledger.check_fits(final_bytes)

        src = Source(ckpt, dtype, dev, prefetch_buffers=prefetch_buffers)
        work = [(t, _quantized_chunks(t, src, scheme, staging) if t.scale_attr is not None else _kept_chunks(t, src, staging))
                for t in targets]
        for t, c in work:
            if t.name in scales:
                c.amax_reads = []  # stored FP8: no amax pass
        schedule = _schedule(src, work)
        t0 = time.perf_counter()
        ledger.mark_host_base()  # before the pinned pool: the host peak counts it
        # Reading ahead (and pinning the pool) starts now, on the prefetcher's threads, while the warm-up thread
        # may still be loading kernels: host work only, no device memory before the ledger starts.
        src.start(schedule)
    except BaseException:
        if warmup is not None:
            warmup.join()  # no thread outlives a failed load
        if src is not None:
            src.close()
        if ckpt is not None:
            ckpt.close()
        raise
    try:
        if warmup is not None:
            warmup.join()  # before the ledger starts: its tiny tensors are no part of the load's peak
        sampler = Sampler(dev, src, interval_s=0.005)
        ledger.start(sampler)
        with torch.no_grad():
            n_quant, n_kept = stream_weights(work, src, ledger, scheme, dtype, dev, scales, siblings, progress)
            for module in model.modules():
                for name, buf in list(module._buffers.items()):
                    if buf is not None:  # constructed buffers (rotary inv_freq, ...) are part of the final footprint
                        module._buffers[name] = buf.to(dev)
                        ledger.add_final(buf.nbytes)
        model.tie_weights()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    finally:
        pinned = src.pinned_bytes
        src.close()
        if ckpt is not None:
            ckpt.close()
        ledger.stop()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise Fp8StreamError(f"internal: parameter '{left[0]}' was not loaded")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    streaming = time.perf_counter() - t0
    ledger.sample()
    if layout is not None:
        install_hooks(model, layout, group.group)
    fused, qkv_fused = siblings.fuse() if siblings is not None else (0, 0)
    report = LoadReport(
        device=str(dev), scheme=scheme, peak_bytes=ledger.peak(), final_bytes=final_bytes,
        full_precision_bytes=full_precision, staging_bytes=staging, load_seconds=0.0,
        setup_seconds=t0 - t_call, streaming_seconds=streaming,
        quantized_tensors=n_quant, kept_tensors=n_kept, peak_measured_by=ledger.measured_by,
        host_rss_anon_peak_delta_bytes=ledger.rss_peak, host_peak_bytes=ledger.host_peak_bytes,
        pinned_host_bytes=pinned, read_threads=read_threads if ckpt is not None else 0, load_format=load_format,
        quantized_modules=quantized, kept_modules=kept_modules, kept_sensitive=sensitive,
        kept_sensitive_rule=SENSITIVE_RULE if keep_sensitive else "", read_bytes=ckpt.bytes_read if ckpt is not None else 0,
        rank=group.rank if group else 0, world_size=group.world if group else 1, tp=tp, ep=layout.ep if layout else 1,
        gate_up_fused=fused, qkv_fused=qkv_fused, quantized_fraction=cov.fraction,
    )
    if group is None:
        log.debug("Peak device memory while loading weights: %.2f GiB", report.peak_bytes / 2**30)
    else:
        log.debug("[rank %d/%d] Peak device memory while loading weights: %.2f GiB", group.rank, group.world, report.peak_bytes / 2**30)
    model.config.dtype = dtype
    _attach_generation_config(model, path)
    if dev.type == "cuda":
        from .norms import fuse_rms_norms

        log.debug("RMSNorm modules in one kernel: %d", fuse_rms_norms(model))
    if cuda_graphs and dev.type == "cuda" and group is None:
        from .decode import install

        install(model)
    model.fp8stream_report = report
    report.load_seconds = time.perf_counter() - t_call
    log.info(report.summary())
    model._fp8stream_state = _LoadState(
        scheme, dtype, dev, global_plans,
        {k: ckpt.tensors[k].shape for p in global_plans.values() for k in p.sources} if global_plans is not None else {},
        frozenset(getattr(model, "all_tied_weights_keys", None) or ()), layout, group, pre is not None)
    if timeline is not None:
        from .timeline import write_timeline

        write_timeline(Path(timeline), sampler.samples, report)
    return model


def _attach_generation_config(model, path: Path) -> None:
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            log.warning("%s: ignored (%s)", path / "generation_config.json", str(e).splitlines()[0])
