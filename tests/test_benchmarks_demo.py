"""Quick path of the demo: a tiny model trained for a few steps, one prompt, a few tokens;
a second invocation reuses the model."""
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]


TINY = ["--layers", "2", "--hidden-size", "64", "--vocab-size", "512", "--steps", "3",
        "--seq-len", "64", "--batch-size", "4", "--train-files", "10"]


def test_demo_builds_then_reuses(tmp_path):
    model = tmp_path / "demo"
    cmd = [sys.executable, "-m", "benchmarks.demo", "--model-dir", str(model), *TINY,
           "--num-prompts", "1", "--max-tokens", "8", "--in-process-engine", "--timeout", "300"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Building the demo model" in r.stdout
    for text in ("plain vLLM", "LayerSkip", "speedup", "acceptance", "identical"):
        assert text in r.stdout
    assert "train" in r.stderr          # the training progress bar
    r2 = subprocess.run(cmd + ["--build-only"], capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "Reusing the demo model" in r2.stdout
