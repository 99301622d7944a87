"""Time to a ready model on the CPU as a user measures it (issue 19): the CLI's wall time in a fresh process against
a bare `import torch, transformers` and against the cost every transformers-based loader pays first (that import,
plus the model class built on the meta device), interleaved in one run so a busy CI machine slows all alike."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "bench"))
from tiny_models import make_checkpoint  # noqa: E402
from user_time import run  # noqa: E402

# Issue 19's target is 1.0 s over the bare import, measured on the 2-core CI box (medians of 9 interleaved rounds):
# +0.65..0.70 s (qwen3_moe, llama) on 2026-12-07 01:00 UTC, +1.6..1.8 s before the GC changes (cli.console_main,
# _gc.py). The same code measured +1.1..1.8 s on a slower box later that day (bare import 2.3-3.5 s instead of 1.7 s),
# so the target is a benchmark (bench/user_time.py --device cpu, BENCHMARKS.md "CLI start-up") and this test keeps a
# regression ceiling: 1.5 s on a box whose import takes 1.7 s, growing in proportion on a slower one. The bound
# against hf_modeling below is the sharp one (it does not move with the box: both pay transformers' modeling import).
EXTRA_OVER_IMPORT_S = 1.5
REFERENCE_IMPORT_S = 1.7
# The CLI builds the same model class hf_modeling does and does its load besides; it still ends sooner (-1.1 s
# measured) because its process pays no cyclic collections over the imports nor at exit. Slack for a noisy run.
EXTRA_OVER_HF_MODELING_S = -0.3


def test_cli_load_costs_little_over_importing_torch_and_transformers(tmp_path):
    path, _ = make_checkpoint("qwen3_moe", tmp_path / "moe")
    walls = {"import": [], "hf_modeling": [], "cli": []}
    for _ in range(3):
        for mode in walls:
            row = run(mode, str(path), "cpu", timeout=120)
            assert row["rc"] == 0, row
            walls[mode].append(row["wall_s"])
    med = {mode: statistics.median(w) for mode, w in walls.items()}
    slower = max(1.0, med["import"] / REFERENCE_IMPORT_S)
    assert med["cli"] - med["import"] <= EXTRA_OVER_IMPORT_S * slower, walls
    assert med["cli"] - med["hf_modeling"] <= EXTRA_OVER_HF_MODELING_S, walls
