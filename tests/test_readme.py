"""The README's first lines are the two fresh-machine commands, and CI runs exactly the second."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[2] == "```bash" and lines[5] == "```"
    main_job, tests = lines[3], lines[4]
    assert main_job.endswith("fp8stream demo") and tests.endswith("python -m pytest -q")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
