"""Time to a ready model on the CPU as a user measures it (issue 19): the CLI's wall time in a fresh process against
the cost every transformers-based loader pays first (import torch + transformers, the model class built on the meta
device), interleaved in one run. A ratio of two fresh-process timings, with slack for a busy CI machine."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "bench"))
from tiny_models import make_checkpoint  # noqa: E402
from user_time import run  # noqa: E402

EXTRA_BOUND_S = 1.0


def test_cli_load_costs_at_most_a_second_over_transformers_own_setup(tmp_path):
    path, _ = make_checkpoint("qwen3_moe", tmp_path / "moe")
    walls = {"hf_modeling": [], "cli": []}
    for _ in range(3):
        for mode in walls:
            row = run(mode, str(path), "cpu", timeout=120)
            assert row["rc"] == 0, row
            walls[mode].append(row["wall_s"])
    extra = statistics.median(walls["cli"]) - statistics.median(walls["hf_modeling"])
    assert extra <= EXTRA_BOUND_S, walls
