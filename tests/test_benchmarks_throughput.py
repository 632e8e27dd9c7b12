"""Quick path of the throughput benchmark: tiny random model, batch 1, a few tokens.

One run covers every system (one engine each, in-process engine core, eager mode: the
fastest start-up; timings from such runs are not meaningful and are not asserted)."""
import json
import subprocess
import sys

import pytest

from benchmarks.machine import engine_dtype
from benchmarks.systems import ALL_SYSTEMS
from benchmarks.tiny_model import build_tiny_model

pytestmark = pytest.mark.engine

FIELDS = {"system", "batch_size", "temperature", "tokens_per_s", "speedup", "acceptance_rate",
          "mean_accepted_length", "ideal_speedup", "peak_memory_mb", "kv_blocks"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("throughput")
    model = build_tiny_model(tmp / "tiny", layers=4, hidden=64, vocab_size=512)
    out = tmp / "res" / "throughput.json"
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--model", str(model),
           "--exit-layer", "1", "--num-speculative-tokens", "2", "--batch-sizes", "1",
           "--temperatures", "0,0.8", "--prompt-sets", "code,nl", "--systems", ",".join(ALL_SYSTEMS),
           "--max-tokens", "8", "--repeats", "1", "--warmup", "1", "--prompts-per-cell", "1",
           "--prompt-chars", "300", "--max-model-len", "512", "--kv-cache-gib", "0.25",
           "--enforce-eager", "--fixed-drafting", "--in-process-engine", "--timeout", "300",
           "--work-dir", str(tmp / "work"), "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return r, out


def test_runs_every_system(run):
    r, out = run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == []
    systems = {row["system"] for row in data["results"]}
    assert systems == set(ALL_SYSTEMS)


def test_schema_and_baseline(run):
    _, out = run
    data = json.loads(out.read_text())
    rows = data["results"]
    # every system (vLLM ones and transformers ones), 2 prompt sets x 2 temperatures each
    assert len(rows) == len(ALL_SYSTEMS) * 4
    for row in rows:
        assert FIELDS <= row.keys()
        assert row["tokens_per_s"] > 0 and row["peak_memory_mb"] > 0
    for row in rows:
        if row["system"] == "vllm":
            assert row["speedup"] == 1.0
            assert row["kv_blocks"] > 0
            assert row["acceptance_rate"] is None
        if row["system"] == "layerskip-off":  # drafting switched off at run time: no drafts
            assert row["acceptance_rate"] is None
    # (n-gram may find nothing to draft in a few tokens of a random model: no assertion)
    for name in ("vllm-draft-truncated", "layerskip"):
        greedy = [r for r in rows if r["system"] == name and r["temperature"] == 0]
        assert all(r["mean_accepted_length"] is not None for r in greedy), name
        assert all(0 <= r["acceptance_rate"] <= 1 for r in greedy), name
    for row in rows:
        if row["system"] in ("vllm-draft-truncated", "layerskip") and row["temperature"] == 0:
            assert row["ideal_speedup"] is not None and row["ideal_speedup"] > 0
    assert "1" in data["calibration"]
    assert data["settings"]["dtype"] == engine_dtype()  # "auto", resolved for this machine


def test_markdown_and_chart(run):
    _, out = run
    md = out.with_suffix(".md").read_text()
    assert md.startswith("| system |") and "layerskip" in md
    assert out.with_suffix(".png").stat().st_size > 1000
