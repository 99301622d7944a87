"""The load report: what a load cost and what it produced."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field

from .memory import gib


@dataclass
class LoadReport:
    device: str
    scheme: str
    peak_bytes: int  # device memory allocated during the load, at its highest (see peak_measured_by)
    final_bytes: int  # device memory the loaded model holds
    full_precision_bytes: int  # the model's parameters at the checkpoint's dtype
    staging_bytes: int  # the staging bound in force: peak <= final + staging
    load_seconds: float  # the whole load() call
    quantized_tensors: int
    kept_tensors: int
    peak_measured_by: str
    host_rss_anon_peak_delta_bytes: int  # process anonymous RSS growth during the load (cross-check on CPU)
    host_peak_bytes: int = 0  # process anonymous RSS at its highest during the load (pinned buffers included)
    pinned_host_bytes: int = 0  # the pinned read-ahead pool (CUDA)
    read_threads: int = 0
    load_format: str = "auto"
    read_bytes: int = 0  # checkpoint tensor bytes this process read from the files
    rank: int = 0  # tensor / expert parallel: this rank of world_size (every figure above is this rank's)
    world_size: int = 1
    tp: int = 1
    ep: int = 1
    setup_seconds: float = 0.0  # config, headers, meta model, plan, FP8 modules, schedule: before the first read
    streaming_seconds: float = 0.0  # the first read to the last weight on the device
    quantized_fraction: float = 0.0  # FP8 share of the >= 2-D weights outside the embeddings (elements)
    gate_up_fused: int = 0  # gated MLPs whose gate and up projections run as one GEMM (load's fuse_gate_up)
    qkv_fused: int = 0  # attentions whose q, k and v projections share one storage and GEMM (modules.SharedInput)
    quantized_modules: list[str] = field(default_factory=list)
    kept_modules: list[str] = field(default_factory=list)
    kept_sensitive: list[str] = field(default_factory=list)  # kept in the model dtype by keep_sensitive
    kept_sensitive_rule: str = ""  # why (empty when keep_sensitive is off)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def summary(self) -> str:
        over = self.peak_bytes - self.final_bytes
        where = f" rank {self.rank}/{self.world_size} (tp={self.tp}, ep={self.ep})" if self.world_size > 1 else ""
        return (
            f"fp8stream {self.scheme} on {self.device}{where}: full precision {gib(self.full_precision_bytes)} -> "
            f"final {gib(self.final_bytes)}, peak {gib(self.peak_bytes)} (final + {over / 2**20:.1f} MiB; "
            f"bound final + {self.staging_bytes / 2**20:.0f} MiB), {self.quantized_tensors} tensors quantized "
            f"({100 * self.quantized_fraction:.0f}% of the weights), "
            f"{self.kept_tensors} kept, {self.load_seconds:.2f} s (setup {self.setup_seconds:.2f} s, streaming "
            f"{self.streaming_seconds:.2f} s)"
        )


@functools.cache
def _bar_class():
    from tqdm import tqdm

    class Bar(tqdm):
        monitor_interval = 0  # tqdm's monitor: a daemon thread started by the first bar, even a disabled one, that lives on

    return Bar


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar that starts no thread (no thread of fp8stream's outlives a load)."""
    return _bar_class()(iterable, **kwargs)
