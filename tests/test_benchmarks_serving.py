"""Quick path of the serving benchmark: `vllm serve` with and without LayerSkip, 3 requests
at concurrency 1 and 2, bounded in time."""
import json
import subprocess
import sys

import pytest
from benchmarks.tiny_model import build_tiny_model

pytestmark = pytest.mark.engine


def test_serving_bounded(tmp_path):
    model = build_tiny_model(tmp_path / "tiny", layers=4, hidden=64, vocab_size=512)
    out = tmp_path / "serving.json"
    cmd = [sys.executable, "-m", "benchmarks.serving", "--model", str(model),
           "--exit-layer", "1", "--num-speculative-tokens", "2", "--systems", "vllm,layerskip",
           "--concurrency", "1,2", "--num-requests", "3", "--max-tokens", "8",
           "--prompt-chars", "300", "--max-model-len", "512", "--kv-cache-gib", "0.25",
           "--enforce-eager", "--fixed-drafting", "--startup-timeout", "240", "--level-timeout", "120",
           "--work-dir", str(tmp_path / "work"), "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=700)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["results"]
    assert {(x["system"], x["concurrency"]) for x in rows} == {
        (s, c) for s in ("vllm", "layerskip") for c in (1, 2)}
    for x in rows:
        assert x["completed"] == 3
        assert x["output_tokens_per_s"] > 0
        assert x["ttft_p50_ms"] > 0 and x["ttft_p99_ms"] >= x["ttft_p50_ms"]
        assert x["itl_p99_ms"] is not None
    # Drafting pinned on: the random model's drafts lose, and the adaptive switch would
    # (rightly) stop drafting at some levels.
    assert all(x["mean_accepted_length"] for x in rows if x["system"] == "layerskip")
    # the servers are gone
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(model) not in ps
