"""Quick paths of benchmarks.overhead and benchmarks.step_profile on a tiny model, engines in
process (the fastest start)."""
import json
import subprocess
import sys

import pytest
from benchmarks.tiny_model import build_tiny_model

pytestmark = pytest.mark.engine


def test_overhead_reports_every_ratio(tmp_path):
    model = build_tiny_model(tmp_path / "tiny", layers=4, hidden=64, vocab_size=512)
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, "-m", "benchmarks.overhead", "--model", str(model), "--exit-layer", "2",
           "--num-speculative-tokens", "2", "--batch-sizes", "2", "--rounds", "1",
           "--max-tokens", "24", "--enforce-eager", "--in-process-engine", "--silent-upper",
           "--work-dir", str(tmp_path), "--json", str(out), "--md", str(tmp_path / "overhead.md")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    for key in ("control_ratio", "forced_off_ratio", "split_speedup", "stock_speedup", "split_verify_cost",
                "stock_verify_cost", "split_draft_cost", "split_of_ideal", "split_of_step_ideal", "adaptive_ratio"):
        assert row[key] > 0, key
    # The ideal at the engine steps the batch took is at most the mean-acceptance one (the
    # slowest request sets the steps), and a drafting step holds at most the whole batch.
    for path in ("split", "stock", "adaptive"):
        assert 0 < row[f"{path}_batch_fill"] <= 1
        assert row[f"{path}_step_ideal"] <= row[f"{path}_ideal"] * 1.01
    # Layers >= 2 silenced: every draft is accepted, K + 1 = 3 tokens per verification
    # (less the end of each request, where fewer than K drafts are left to make).
    for path in ("split", "stock", "adaptive"):
        assert 2.5 <= row[f"{path}_accepted_length"] <= 3.0, row
    assert "| 2 |" in (tmp_path / "overhead.md").read_text()
    # The same engine switched verification at run time: only the split runs reused states.
    runs = json.loads(out.read_text())["runs"]["2"]
    assert runs["layerskip/always"][0]["reused_tokens"] > 0
    assert runs["layerskip/always-stock-verify"][0]["reused_tokens"] == 0
    assert runs["layerskip/always-stock-verify"][0]["draft_steps"] > 0
    assert runs["layerskip/always-adaptive-verify"][0]["draft_steps"] > 0
    # Every life recorded its pinning: none here, as the worker runs in the life's own process
    # (--in-process-engine). Pinning a worker process's helpers is tested in
    # test_benchmarks_unit (test_pinning_moves_unbound_threads_off_a_bound_child).
    meta = json.loads(out.read_text())["meta"]
    assert meta["in_process_engine"] and meta["pinning"] == {"vllm": {}, "vllm-control": {}, "layerskip": {}}


def test_mode_groups_time_every_layerskip_mode_turn_about():
    from benchmarks.overhead import ENGINES, mode_groups

    assert mode_groups(ENGINES["layerskip"][1]) == [
        ["off", "always", "always-stock-verify", "always-adaptive-verify", "adaptive"]]
    assert mode_groups([None]) == [[None]]


def test_step_profile_times_each_hook_and_idle_steps_skip_the_speculative_path(tmp_path):
    model = build_tiny_model(tmp_path / "tiny", layers=4, hidden=64, vocab_size=512)
    out = tmp_path / "profile.json"
    cmd = [sys.executable, "-m", "benchmarks.step_profile", "--model", str(model),
           "--exit-layer", "2", "--num-speculative-tokens", "2", "--batch-sizes", "2",
           "--repeats", "1", "--max-tokens", "16", "--enforce-eager", "--in-process-engine",
           "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["hook"]: row for row in json.loads(out.read_text())["tables"]["2"]}
    for mode in ("off", "always", "always-stock-verify"):
        assert rows["wall time"][mode] > 0 and rows["runner.execute_model"][f"{mode} calls"] == 1
        # Drafting: (nearly) every step drafts; not the steps whose requests all finished.
        assert (rows["drafter.propose"][f"{mode} calls"] == 0) == (mode == "off")
    # Drafting off: vLLM's non-speculative path, no spec-decode metadata, no rejection sampler.
    assert rows["runner._calc_spec_decode_metadata"]["off calls"] == 0
    assert rows["rejection_sampler.forward"]["off calls"] == 0
    assert rows["runner._calc_spec_decode_metadata"]["always calls"] > 0
    # Only split verification runs the upper half on its own.
    assert rows["drafter.upper_layers"]["always calls"] > 0
    assert rows["drafter.upper_layers"]["always-stock-verify calls"] == 0
