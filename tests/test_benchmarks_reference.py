"""Quick path of the reference builder: both models (recipe and baseline) trained side by
side at a tiny size, evaluated per exit, then reused from the cache."""
import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]


TINY = ["--layers", "2", "--hidden-size", "64", "--vocab-size", "512", "--steps", "2",
        "--seq-len", "64", "--batch-size", "4", "--train-files", "10", "--eval-blocks", "4",
        "--no-split", "--no-progress"]


def test_reference_builds_both_then_reuses(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.reference", "--output", str(tmp_path), *TINY]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    ref = json.loads((tmp_path / "reference" / "config.json").read_text())["layerskip"]
    base = json.loads((tmp_path / "baseline" / "config.json").read_text())["layerskip"]
    assert ref["recipe"]["early_exit_scale"] > 0 and ref["recipe"]["layer_dropout_max"] > 0
    assert base["recipe"]["early_exit_scale"] == 0 and base["recipe"]["layer_dropout_max"] == 0
    # The baseline trained in its own process with its own log next to the models.
    assert (tmp_path / "baseline-train.log").exists()
    per_exit = json.loads((tmp_path / "reference-eval" / "per_exit.json").read_text())
    assert per_exit, "per-exit evaluation is empty"
    assert (tmp_path / "reference-eval" / "per_exit.png").stat().st_size > 0

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("cached") == 2, again.stdout
