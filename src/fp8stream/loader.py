"""The streaming load: checkpoint rows -> staging -> quantize -> final FP8 storage, one bounded chunk at a time.

Every parameter's final storage is allocated once, at its final size, on the target device, right
before it is filled; a quantized parameter's full-precision rows only ever exist on the device as one
staging chunk (<= the staging budget, temporaries included). Hence
    peak device memory <= final footprint + staging budget,
whatever the model size or the largest tensor.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint
from .errors import CheckpointError, Fp8StreamError
from .load_plan import TargetPlan, build_meta_model, build_plan
from .memory import MemoryLedger
from .modules import FP8Experts, FP8Linear, replace_with_fp8
from .quantize import BLOCK, FP8_DTYPE, SCHEMES, quantize_blocks, quantize_rows, scale_from_amax, tensor_amax
from .report import LoadReport

log = logging.getLogger("fp8stream")

# Kept in full precision unless the user asks otherwise: MoE routers and shared-expert gates (tiny,
# and routing decisions are sensitive); the output embedding is added by name at load time.
DEFAULT_IGNORE = (r"(^|\.)gate$", r"(^|\.)shared_expert_gate$")
# Device bytes per staged element while quantizing: the source element, its float32 copy, one float32
# temporary (abs for amax), and the fp8 result.
_STAGE_BYTES_PER_ELEM = 4 + 4 + 1


@dataclass
class _Target:
    name: str
    module: nn.Module
    attr: str
    scale_attr: str | None  # set when the parameter is stored in fp8
    plan: TargetPlan | None


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


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _rows_per_chunk(width: int, src_itemsize: int, staging: int, align: int, name: str) -> int:
    per_row = width * (src_itemsize + _STAGE_BYTES_PER_ELEM)
    rows = staging // max(per_row, 1)
    rows = rows // align * align
    if rows < 1:
        need = per_row * align
        raise Fp8StreamError(f"staging budget {staging / 2**20:.1f} MiB is too small for '{name}' (one chunk of {align} row(s) needs {need / 2**20:.1f} MiB); raise --staging-mib")
    return rows


def _chunks(flat_rows: int, rows_per_slice: int, step: int, per_slice: bool):
    """Flat row ranges [d0, d1); with per_slice, chunks never cross a lead (expert) boundary."""
    if not per_slice:
        for d0 in range(0, flat_rows, step):
            yield d0, min(d0 + step, flat_rows)
        return
    for base in range(0, flat_rows, rows_per_slice):
        for r0 in range(0, rows_per_slice, step):
            yield base + r0, base + min(r0 + step, rows_per_slice)


class _Source:
    """Destination rows of a parameter: checkpoint rows gathered through the plan's pieces into a host
    staging buffer, then copied to the device (random rows for dummy loads).

    On CUDA two pinned host buffers alternate, so the positional reads of the next
    chunk run while the device still copies and quantizes the previous one; an event per buffer
    says when its copy has finished and it may be refilled.
    """

    def __init__(self, ckpt: Checkpoint | None, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.ckpt, self.dtype, self.device = ckpt, dtype, device
        self.gen = torch.Generator(device=device).manual_seed(seed) if ckpt is None else None
        self._cuda = device.type == "cuda"
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._events: list = [None, None]
        self._turn = 0

    def itemsize(self, plan: TargetPlan | None) -> int:
        if plan is None:
            return self.dtype.itemsize
        return max(self.ckpt.tensors[k].dtype.itemsize for k in plan.sources)

    def key_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Flat rows [start, stop) of one checkpoint tensor, on the device."""
        return self._to_device(*self._gather([(key, start, stop)], self.ckpt.tensors[key].dtype))

    def rows(self, plan: TargetPlan | None, d0: int, d1: int, width: int | None, name: str) -> torch.Tensor:
        """Destination rows [d0, d1) on the device, in the checkpoint's dtype."""
        if plan is None:  # dummy: random rows generated straight on the device
            shape = (d1 - d0, width) if width else (d1 - d0,)
            return torch.randn(shape, generator=self.gen, device=self.device, dtype=self.dtype).mul_(0.02)
        reads = []
        for p in plan.pieces:
            lo, hi = max(d0, p.dst_row), min(d1, p.dst_row + p.rows)
            if lo < hi:
                reads.append((p.key, p.src_row + lo - p.dst_row, p.src_row + hi - p.dst_row))
        if sum(b - a for _, a, b in reads) != d1 - d0:
            raise CheckpointError(f"{self.ckpt.path}: checkpoint rows for '{name}' do not cover rows [{d0}, {d1})")
        dtypes = {self.ckpt.tensors[k].dtype for k, _, _ in reads}
        if len(dtypes) == 1:
            return self._to_device(*self._gather(reads, dtypes.pop()))
        # sources of one parameter in different dtypes (rare): convert each on the host
        return torch.cat([self.ckpt.read_rows(k, a, b).to(self.dtype) for k, a, b in reads]).to(self.device)

    def _gather(self, reads, dtype) -> tuple[torch.Tensor, int]:
        infos = [self.ckpt.tensors[k] for k, _, _ in reads]
        total = sum((b - a) * i.row_bytes for (_, a, b), i in zip(reads, infos))
        slot, self._turn = self._turn, self._turn ^ 1
        if not self._cuda:  # on the CPU the chunk itself is the staging (freed after use, counted by the ledger)
            buf = torch.empty(total, dtype=torch.uint8)
        else:
            if self._events[slot] is not None:
                self._events[slot].synchronize()  # the device has finished copying out of this buffer
            buf = self._bufs[slot]
            if buf is None or buf.numel() < total:
                buf = self._bufs[slot] = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        jobs, at = [], 0
        for (key, a, b), info in zip(reads, infos):
            n = (b - a) * info.row_bytes
            jobs.append((key, a, b, buf[at : at + n]))
            at += n
        self.ckpt.read_into(jobs)
        shape = infos[0].flat_shape[1:]
        rows = sum(b - a for _, a, b in reads)
        return buf[:total].view(dtype).reshape((rows, *shape) if infos[0].shape else ()), slot

    def _to_device(self, host: torch.Tensor, slot: int) -> torch.Tensor:
        if not self._cuda:
            return host
        x = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[slot] = event
        return x


def _first_bad(plan: TargetPlan | None, bad_rows: torch.Tensor, ckpt: Checkpoint | None, name: str) -> str:
    row = int(bad_rows.nonzero()[0, 0]) if bad_rows.any() else 0
    if plan is not None:
        for p in plan.pieces:
            if p.dst_row <= row < p.dst_row + p.rows:
                return f"{ckpt.tensors[p.key].file}: tensor '{p.key}' contains NaN or Inf (row {p.src_row + row - p.dst_row})"
    return f"'{name}' contains NaN or Inf"


def _load_quantized(t: _Target, src: _Source, ledger: MemoryLedger, scheme: str, device: torch.device) -> None:
    weight = t.module._parameters[t.attr]
    shape = tuple(weight.shape)
    n, k = shape[-2], shape[-1]
    flat = math.prod(shape[:-1])
    w = torch.empty(shape, dtype=FP8_DTYPE, device=device)
    s = torch.empty(tuple(t.module._parameters[t.scale_attr].shape), dtype=torch.float32, device=device)
    ledger.add_final(w.nbytes + s.nbytes)
    w_flat = w.view(flat, k)
    itemsize = src.itemsize(t.plan)
    block = scheme == "fp8_per_block"
    step = _rows_per_chunk(k, itemsize, ledger.staging_bytes, BLOCK if block and n >= BLOCK else 1, t.name)
    if block:
        step = min(step, math.ceil(n / BLOCK) * BLOCK)

    shard_scales = None
    if scheme == "fp8_per_tensor":
        shard_scales = _shard_scales(t, src, ledger, device, step)

    for d0, d1 in _chunks(flat, n, step, per_slice=block):
        staged = (d1 - d0) * k * (itemsize + _STAGE_BYTES_PER_ELEM)
        ledger.stage(staged)
        x = src.rows(t.plan, d0, d1, k, t.name)
        if block:
            q, bs = quantize_blocks(x)
            lead, r0 = divmod(d0, n)
            s.view(-1, *s.shape[-2:])[lead, r0 // BLOCK : r0 // BLOCK + bs.shape[0]] = bs
        else:
            row_scale = _row_scales(t.plan, shard_scales, d0, d1, device) if shard_scales is not None else None
            q, rs = quantize_rows(x, row_scale)
            s.view(-1)[d0:d1] = rs
        w_flat[d0:d1] = q
        del x, q
        ledger.unstage(staged)
    # NaN / Inf in a weight makes its scale non-finite. Checked once per parameter (a check per chunk
    # would stall the device pipeline); the load fails before the model is returned.
    if not torch.isfinite(s).all():
        _raise_non_finite(t, src, s, block, flat, n, k)
    t.module._parameters[t.attr] = nn.Parameter(w, requires_grad=False)
    t.module._parameters[t.scale_attr] = nn.Parameter(s, requires_grad=False)


def _raise_non_finite(t: _Target, src: _Source, s: torch.Tensor, block: bool, flat: int, n: int, k: int) -> None:
    if not block:
        raise CheckpointError(_first_bad(t.plan, ~torch.isfinite(s.view(-1)).cpu(), src.ckpt, t.name))
    # a block's 128 rows may come from several checkpoint tensors: re-read them to find the row itself
    bad_block = ~torch.isfinite(s.view(-1, *s.shape[-2:])).all(dim=-1)  # [lead, block rows]
    lead, br = (int(i) for i in bad_block.nonzero()[0])
    d0 = lead * n + br * BLOCK
    d1 = min(d0 + BLOCK, (lead + 1) * n)
    bad = torch.ones(d1 - d0, dtype=torch.bool)
    if src.ckpt is not None:
        rows = src.rows(t.plan, d0, d1, k, t.name)
        exact = ~torch.isfinite(rows.reshape(rows.shape[0], -1)).all(dim=1).cpu()
        bad = exact if exact.any() else bad
    raise CheckpointError(_first_bad(t.plan, _shift(bad, d0, flat), src.ckpt, t.name))


def _shift(bad: torch.Tensor, d0: int, flat: int) -> torch.Tensor:
    full = torch.zeros(flat, dtype=torch.bool)
    full[d0 : d0 + bad.numel()] = bad.cpu()
    return full


def _shard_scales(t: _Target, src: _Source, ledger: MemoryLedger, device, step: int) -> torch.Tensor:
    """fp8_per_tensor: first pass, one amax per checkpoint tensor (shard) feeding this parameter."""
    if t.plan is None:  # dummy: one shard, scale from the distribution's bound
        return torch.full((1,), 0.02 * 6 / 448, device=device)
    amax = torch.zeros(len(t.plan.sources), device=device)
    k = t.plan.shape[-1]
    for i, key in enumerate(t.plan.sources):
        info = src.ckpt.tensors[key]
        rows = info.flat_shape[0] if info.shape else 1
        for r0 in range(0, rows, step):
            staged = (min(r0 + step, rows) - r0) * k * (info.dtype.itemsize + 4)
            ledger.stage(staged)
            amax[i] = torch.maximum(amax[i], tensor_amax(src.key_rows(key, r0, min(r0 + step, rows))))
            ledger.unstage(staged)
    bad = ~torch.isfinite(amax)
    if bad.any():
        key = t.plan.sources[int(bad.nonzero()[0])]
        raise CheckpointError(f"{src.ckpt.tensors[key].file}: tensor '{key}' contains NaN or Inf")
    return scale_from_amax(amax)


def _row_scales(plan: TargetPlan | None, shard_scales: torch.Tensor, d0: int, d1: int, device) -> torch.Tensor:
    out = torch.empty(d1 - d0, device=device)
    if plan is None:
        return out.fill_(float(shard_scales[0]))
    for p in plan.pieces:
        lo, hi = max(d0, p.dst_row), min(d1, p.dst_row + p.rows)
        if lo < hi:
            out[lo - d0 : hi - d0] = shard_scales[p.shard]
    return out


def _load_kept(t: _Target, src: _Source, ledger: MemoryLedger, dtype: torch.dtype, device: torch.device) -> None:
    p = t.module._parameters[t.attr]
    shape = tuple(p.shape)
    out_dtype = dtype if p.dtype.is_floating_point else p.dtype
    dst = torch.empty(shape, dtype=out_dtype, device=device)
    ledger.add_final(dst.nbytes)
    if src.ckpt is None:  # dummy: norms start at 1, biases at 0, the rest small random
        leaf = t.attr
        if dst.dim() == 1 and leaf == "weight":
            dst.fill_(1.0)
        elif leaf == "bias":
            dst.zero_()
        else:
            dst.normal_(0.0, 0.02, generator=src.gen)
    else:
        width = shape[-1] if len(shape) >= 2 else None
        flat = math.prod(shape[:-1]) if width else (shape[0] if shape else 1)
        dst_flat = dst.view(flat, width) if width else dst.view(-1)
        itemsize = src.itemsize(t.plan)
        step = _rows_per_chunk(width or 1, itemsize, ledger.staging_bytes, 1, t.name)
        finite = torch.ones((), dtype=torch.bool, device=device)
        for d0, d1 in _chunks(flat, flat, step, per_slice=False):
            # the source rows, then isfinite's temporaries: abs() in the model dtype and three bool masks
            staged = (d1 - d0) * (width or 1) * (itemsize + out_dtype.itemsize + 3)
            ledger.stage(staged)
            x = src.rows(t.plan, d0, d1, width, t.name)
            out = dst_flat[d0:d1]
            out.copy_(x.reshape(out.shape))  # dtype conversion on the device, in place
            if out.is_floating_point():
                # NaN/Inf in the checkpoint, or values that overflow the model dtype. Checked per chunk
                # (isfinite's temporaries stay within staging) into a device flag: no sync per chunk.
                finite &= torch.isfinite(out).all()
            del x, out
            ledger.unstage(staged)
        if not finite:
            _raise_kept_non_finite(t, src, dst_flat, flat, width, step, out_dtype)
    t.module._parameters[t.attr] = nn.Parameter(dst, requires_grad=False)


def _raise_kept_non_finite(t: _Target, src: _Source, dst_flat, flat: int, width, step: int, out_dtype) -> None:
    for d0, d1 in _chunks(flat, flat, step, per_slice=False):
        chunk = dst_flat[d0:d1]
        bad = ~torch.isfinite(chunk.reshape(d1 - d0, -1)).all(dim=1)
        if bad.any():
            row = d0 + int(bad.nonzero()[0])
            msg = _first_bad(t.plan, _shift(bad.cpu(), d0, flat), src.ckpt, t.name)
            if torch.isfinite(src.rows(t.plan, row, row + 1, width, t.name)).all():  # finite on disk: overflow
                msg = msg.replace("contains NaN or Inf", f"has values too large for {str(out_dtype).removeprefix('torch.')}")
            raise CheckpointError(msg)
    raise CheckpointError(f"'{t.name}' contains NaN or Inf")


def load(
    path: str | Path,
    device: str | torch.device = "cuda",
    scheme: str = "fp8_per_channel",
    *,
    load_format: str = "auto",
    staging_mib: float = 256,
    ignore: tuple[str, ...] | list[str] = (),
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
):
    """Stream a Hugging Face checkpoint directory into an FP8 transformers model on `device`.

    Returns a transformers PreTrainedModel whose Linear layers / fused MoE experts are FP8; its
    `fp8stream_report` attribute is a LoadReport. Raises Fp8StreamError (one-line message) on bad input.
    """
    if scheme not in SCHEMES:
        raise Fp8StreamError(f"unknown scheme '{scheme}' (choose from {', '.join(SCHEMES)})")
    if load_format not in ("auto", "dummy"):
        raise Fp8StreamError(f"unknown load format '{load_format}' (auto or dummy)")
    if not staging_mib > 0:
        raise Fp8StreamError(f"--staging-mib must be positive, got {staging_mib}")
    path = Path(path)
    dev = _device(device)
    config = _load_config(path)
    ckpt = Checkpoint(path) if load_format == "auto" else None
    if ckpt is not None:
        ckpt.check_index()

    try:
        model = build_meta_model(config, dtype)
    except Fp8StreamError:
        raise
    except Exception as e:  # config values transformers' validation lets through (negative sizes, unknown rope type...)
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path / 'config.json'}: cannot build the {config.model_type} model it describes ({type(e).__name__}: {first})") from None
    src_itemsize = dtype.itemsize
    if ckpt is not None:
        float_sizes = [i.dtype.itemsize for i in ckpt.tensors.values() if i.dtype.is_floating_point]
        src_itemsize = max(set(float_sizes), key=float_sizes.count) if float_sizes else dtype.itemsize
    full_precision = sum(p.numel() for p in model.parameters()) * src_itemsize
    plans = build_plan(model, ckpt) if ckpt is not None else None

    ignore = list(DEFAULT_IGNORE) + list(ignore)
    out_emb = model.get_output_embeddings()
    if out_emb is not None:
        out_name = next(n for n, m in model.named_modules() if m is out_emb)
        ignore.append(rf"^{out_name}$")
    try:
        quantized, kept_modules = replace_with_fp8(model, scheme, ignore, dtype)
    except Exception as e:
        if isinstance(e, Fp8StreamError):
            raise
        raise Fp8StreamError(f"--ignore: {e}") from None
    targets = _targets(model, plans)
    final_bytes = _unique_bytes(list(model.parameters()) + list(model.buffers()))
    staging = int(staging_mib * 2**20)
    ledger = MemoryLedger(dev, staging)
    ledger.check_fits(final_bytes)

    src = _Source(ckpt, dtype, dev)
    t0 = time.perf_counter()
    ledger.start()
    n_quant = n_kept = 0
    try:
        from tqdm import tqdm

        bar = tqdm(targets, desc="fp8stream", unit="tensor", disable=not progress, leave=False)
        with torch.no_grad():
            for t in bar:
                if t.scale_attr is not None:
                    _load_quantized(t, src, ledger, scheme, dev)
                    n_quant += 1
                else:
                    _load_kept(t, src, ledger, dtype, dev)
                    n_kept += 1
            for module in model.modules():
                for name, buf in list(module._buffers.items()):
                    if buf is not None:  # constructed buffers (rotary inv_freq, ...) are part of the final footprint
                        module._buffers[name] = buf.to(dev)
                        ledger.add_final(buf.nbytes)
        model.tie_weights()
    finally:
        if ckpt is not None:
            ckpt.close()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise Fp8StreamError(f"internal: parameter '{left[0]}' was not loaded")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    ledger.sample()
    report = LoadReport(
        device=str(dev), scheme=scheme, peak_bytes=ledger.peak(), final_bytes=final_bytes,
        full_precision_bytes=full_precision, staging_bytes=staging, load_seconds=seconds,
        quantized_tensors=n_quant, kept_tensors=n_kept, peak_measured_by=ledger.measured_by,
        host_rss_anon_peak_delta_bytes=ledger.rss_peak, load_format=load_format,
        quantized_modules=quantized, kept_modules=kept_modules,
    )
    log.debug("Peak device memory while loading weights: %.2f GiB", report.peak_bytes / 2**30)
    log.info(report.summary())
    model.config.dtype = dtype
    _attach_generation_config(model, path)
    model.fp8stream_report = report
    return model


def _attach_generation_config(model, path: Path) -> None:
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            log.warning("%s: ignored (%s)", path / "generation_config.json", str(e).splitlines()[0])
