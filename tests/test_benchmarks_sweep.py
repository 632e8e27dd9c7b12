"""Quick path of the sweep: a 2 x 2 grid (exit layer x confidence threshold) on a tiny
model, best setting written back."""
import json
import subprocess
import sys

import pytest
from benchmarks.tiny_model import build_tiny_model

pytestmark = pytest.mark.engine


def test_sweep_2x2_writes_best(tmp_path):
    model = build_tiny_model(tmp_path / "tiny", layers=4, hidden=64, vocab_size=512)
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, "-m", "benchmarks.sweep", "--model", str(model),
           "--exit-layers", "1,2", "--num-speculative-tokens", "2",
           "--confidence-thresholds", "0,0.3", "--max-tokens", "8",
           "--repeats", "1", "--warmup", "1", "--prompts-per-cell", "1", "--prompt-chars", "300",
           "--max-model-len", "512", "--kv-cache-gib", "0.25", "--enforce-eager",
           "--in-process-engine", "--timeout", "300", "--work-dir", str(tmp_path / "work"),
           "--json", str(out), "--write"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert len(data["grid"]) == 4
    assert sorted({g["draft_confidence_threshold"] for g in data["grid"]}) == [0.0, 0.3]
    assert all(g.get("speedup") for g in data["grid"])
    best = data["best"]
    assert best["speedup"] == max(g["speedup"] for g in data["grid"])
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "best: exit_layer=" in r.stdout
    meta = json.loads((model / "config.json").read_text())["layerskip"]
    assert meta["exit_layer"] == best["exit_layer"]
    assert meta["num_speculative_tokens"] == best["num_speculative_tokens"]
    assert meta.get("draft_confidence_threshold", 0.0) == best["draft_confidence_threshold"]
