"""`--timeline`: device memory, host RSS and bytes loaded against time, as JSON and a PNG (matplotlib)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .errors import Fp8StreamError
from .report import LoadReport


def write_timeline(png: Path, samples: list[tuple[float, int, int, int]], report: LoadReport) -> Path:
    """Write PNG and, next to it, the same data as JSON (`<name>.json`). Returns the JSON path."""
    data = {
        "columns": ["seconds", "device_bytes", "host_rss_anon_bytes", "loaded_bytes"],
        "samples": [list(s) for s in samples],
        "lines": {"full_precision_bytes": report.full_precision_bytes, "final_bytes": report.final_bytes,
                  "final_plus_staging_bytes": report.final_bytes + report.staging_bytes},
        "report": asdict(report),
    }
    out_json = png.with_suffix(".json")
    try:
        out_json.write_text(json.dumps(data))
    except OSError as e:
        raise Fp8StreamError(f"{out_json}: cannot write the timeline ({e.strerror or e})") from None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Fp8StreamError(f"{png}: drawing the timeline needs matplotlib (pip install matplotlib); its data is in {out_json}") from None

    gib = 2**30
    t = [s[0] for s in samples]
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    ax.plot(t, [s[1] / gib for s in samples], label=f"device memory allocated ({report.device})", lw=2)
    ax.plot(t, [s[2] / gib for s in samples], label="host anonymous RSS", lw=1.5)
    ax.plot(t, [s[3] / gib for s in samples], label="checkpoint bytes loaded", lw=1.5, ls="--")
    for value, label, style, dy in ((report.full_precision_bytes, "full precision", ":", 3), (report.final_bytes, "final FP8", "-.", -10),
                                    (report.final_bytes + report.staging_bytes, "final + staging bound", "--", 3)):
        ax.axhline(value / gib, color="gray", ls=style, lw=1)
        ax.annotate(f"{label} {value / gib:.2f} GiB", (0, value / gib), textcoords="offset points", xytext=(4, dy), fontsize=8, color="dimgray")
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since the first weight was read")
    ax.set_ylabel("GiB")
    ax.set_title(f"fp8stream {report.scheme}: peak {report.peak_bytes / gib:.2f} GiB, final {report.final_bytes / gib:.2f} GiB, "
                 f"{report.load_seconds:.2f} s")
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(png)
    except OSError as e:
        raise Fp8StreamError(f"{png}: cannot write the timeline ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return out_json
