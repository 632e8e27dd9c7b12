"""Short soak: plain `vllm serve` and LayerSkip on the tiny Llama under 80 streamed requests
at concurrency 64 (greedy, seeded, top-p/top-k, stop strings, aborts, chunked prefill,
prefix hits, preemption, malformed requests), each sent twice. Every check of
`benchmarks.soak` must pass. Eager engines; about 2 minutes."""
import json
import subprocess
import sys

import pytest
from conftest import DRAFT_LEN, EXIT_LAYER

TIMEOUT_S = 480


@pytest.mark.engine
def test_soak_short(llama_dir, tmp_path):
    out = tmp_path / "soak"
    cmd = [sys.executable, "-m", "benchmarks.soak", "--model", str(llama_dir),
           "--exit-layer", str(EXIT_LAYER), "--num-speculative-tokens", str(DRAFT_LEN),
           "--fixed-drafting", "--num-requests", "80", "--concurrency", "64",
           "--max-tokens", "32", "--max-model-len", "512", "--max-num-batched-tokens", "256",
           "--enforce-eager", "--startup-timeout", "240", "--pass-timeout", "120",
           "--request-timeout", "90", "--out", str(out),
           # One primitive per new token count fills oneDNN's cache (default 1024 entries)
           # for hours; capped, the 5% memory check sees leaks rather than that warm-up
           # (test_plugin_memory.py, README soak section).
           "--onednn-primitive-cache", "64"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert (out / "soak.json").exists(), r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "soak.json").read_text())
    failed = [name for name, ok in report["checks"].items() if ok is False]
    assert not failed, f"failed checks: {failed}\n{report['notes']}\n{r.stdout[-4000:]}"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert report["checks"]["vllm.memory_stable"] is True
    assert report["checks"]["layerskip.memory_stable"] is True
    # The worker reports its per-request state, so this one must be checked, not skipped.
    assert report["checks"]["layerskip.no_live_request_state"] is True
    load = report["load"]
    assert load["long_prompts"] > 0 and load["shared_prefix_prompts"] > 0
    # The load ran at its concurrency. Not exactly 64 in every pass: a stream can end (a bad
    # request is refused at once) before the 64th opens; plain vLLM peaked at 63 once.
    assert all(p["peak_streams"] >= 60 for s in report["servers"].values() for p in s["passes"])
    assert max(p["peak_streams"] for s in report["servers"].values() for p in s["passes"]) == 64
    # the servers are gone
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(llama_dir) not in ps


@pytest.fixture(scope="module")
def tokenizer(tiny_root):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_root / "tokenizer")


def test_load_is_deterministic_and_in_range(tokenizer):
    from benchmarks.soak_load import KIND_WEIGHTS, LoadSettings, build_load, describe

    s = LoadSettings(num_requests=120, max_tokens=32, max_model_len=512,
                     max_num_batched_tokens=256, block_size=32)
    load = build_load(tokenizer, s, seed=3)
    same, other = build_load(tokenizer, s, seed=3), build_load(tokenizer, s, seed=4)
    assert [g.body for g in load.good] == [g.body for g in same.good]
    assert [g.body for g in load.good] != [g.body for g in other.good]
    d = describe(load, s)
    assert all(d["kinds"][k] > 0 for k in KIND_WEIGHTS)
    assert d["long_prompts"] > 0 and d["shared_prefix_prompts"] > 0 and d["stop_strings"] > 0
    assert d["planned_aborts"] == 12 and d["bad"] == 10
    assert all(g.prompt_tokens + g.body["max_tokens"] <= s.max_model_len for g in load.good)
    assert all(("seed" in g.body) == g.kind.startswith("seeded") for g in load.good)
    assert {b.name for b in load.bad} == {"invalid-json", "negative-max-tokens", "prompt-too-long",
                                          "unknown-model", "negative-temperature"}


def test_compare_counts_mismatches_and_missing(tokenizer):
    from benchmarks.soak_load import LoadSettings, build_load
    from benchmarks.soak_report import compare

    s = LoadSettings(num_requests=40, max_tokens=16, max_model_len=512,
                     max_num_batched_tokens=256, block_size=32, abort_fraction=0.0)
    load = build_load(tokenizer, s, seed=0)
    greedy = [g.rid for g in load.good if g.kind == "greedy"]
    ref = {g.rid: {"status": 200, "text": f"t{g.rid}", "finish_reason": "length"}
           for g in load.good}
    run = {**ref, greedy[0]: {**ref[greedy[0]], "text": "other"},
           greedy[1]: {"status": None, "error": "boom"}}
    c = compare(load, ref, [run], ("greedy",))
    assert (c["planned"], c["compared"], c["mismatches"], c["missing"]) == (
        len(greedy), len(greedy) - 1, 1, 1)


def test_metrics_parse_and_checks():
    from benchmarks.server import parse_metrics
    from benchmarks.soak_report import server_checks

    m = parse_metrics('# HELP x\nvllm:a_total{engine="0",model_name="m x"} 2.0\n'
                      'vllm:a_total{engine="1",model_name="m"} 3.0\nvllm:b 1e3\n')
    assert m == {"vllm:a_total": 5.0, "vllm:b": 1000.0}
    ok_pass = {"failed": 0, "aborted": 1, "bad_4xx": 2, "bad": 2}
    cmp_ok = {"planned": 3, "compared": 3, "mismatches": 0, "missing": 0}
    s = {"started": True, "passes": [ok_pass, ok_pass], "warmup": ok_pass,
         "memory_mib": {"after_warmup": 100.0, "after_load": 104.0},
         "metrics": {"preemptions": 3.0, "prefix_cache_hits": 64.0}, "seeded": cmp_ok,
         "greedy": cmp_ok, "health_at_end": 200, "idle_after_load": True,
         "spec": {"drafted": 10.0, "accepted": 11.0, "live_request_states": None}}
    checks = server_checks(s, planned_aborts=1)
    assert checks["spec_counters_consistent"] is False
    assert checks["no_live_request_state"] is None
    assert all(v for k, v in checks.items() if k not in ("spec_counters_consistent",
                                                         "no_live_request_state"))
    s["memory_mib"]["after_load"] = 110.0
    assert server_checks(s, planned_aborts=1)["memory_stable"] is False


def test_onednn_cache_option_reaches_both_servers_and_rejects_negatives(llama_dir):
    from benchmarks.soak import build_parser, server_env, validate

    args = build_parser().parse_args(["--model", str(llama_dir), "--onednn-primitive-cache", "64"])
    validate(args)
    assert server_env(args)["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    default = build_parser().parse_args(["--model", str(llama_dir)])
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in server_env(default)
    bad = build_parser().parse_args(["--model", str(llama_dir), "--onednn-primitive-cache", "-1"])
    with pytest.raises(SystemExit, match="--onednn-primitive-cache"):
        validate(bad)
