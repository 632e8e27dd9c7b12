"""Fast checks of the benchmark package's pure parts (no engine)."""
import json
from pathlib import Path
import subprocess
import sys

import pytest

from benchmarks import ideal, loadgen, prompts, report
from benchmarks.systems import parse_systems, resolve_spec, write_truncated_copy
from benchmarks.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("unit") / "tiny", layers=4, hidden=64,
                            vocab_size=512)


def test_heldout_split_is_deterministic_and_disjoint():
    train, held = prompts.training_files(), prompts.heldout_files()
    assert train and held
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(prompts.source_files())
    root = prompts.stdlib_root()
    assert all(prompts.is_heldout(p.relative_to(root).as_posix()) for p in held)
    assert prompts.heldout_files() == held


@pytest.mark.parametrize("kind", prompts.PROMPT_SETS)
def test_prompts_come_from_heldout_files(kind):
    ps = prompts.load_prompts(kind, 5)
    assert len(ps) == 5 and all(len(p) > 100 for p in ps)
    held_text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in prompts.heldout_files())
    if kind == "code":
        assert all(p in held_text for p in ps)
    with pytest.raises(ValueError, match="prompt set"):
        prompts.load_prompts("poetry", 1)


def test_truncated_copy_has_exactly_e_layers_and_loads(tiny, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = write_truncated_copy(tiny, 2, tmp_path / "trunc")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and "layerskip" not in cfg
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        layers = {int(k.split(".layers.")[1].split(".")[0]) for k in f.keys() if ".layers." in k}
        names = set(f.keys())
    assert layers == {0, 1}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 2
    assert write_truncated_copy(tiny, 2, tmp_path / "trunc") == out   # cached


def test_silenced_copy_exits_early_with_the_full_models_logits(tiny, tmp_path):
    """Upper layers with zeroed output projections add nothing: the full model's logits
    equal those of its first E layers, so every draft from exit E is accepted."""
    import torch
    from transformers import AutoModelForCausalLM

    out = write_truncated_copy(tiny, 2, tmp_path / "silent", silence_upper=True)
    cfg = json.loads((out / "config.json").read_text())
    full = json.loads((Path(tiny) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == full["num_hidden_layers"] and "layerskip" in cfg
    silent = AutoModelForCausalLM.from_pretrained(out).eval()
    first_two = AutoModelForCausalLM.from_pretrained(write_truncated_copy(tiny, 2, tmp_path / "trunc")).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny).eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, 12))
    with torch.no_grad():
        assert torch.allclose(silent(ids).logits, first_two(ids).logits, atol=1e-5)
        assert not torch.allclose(silent(ids).logits, original(ids).logits, atol=1e-3)


def test_resolve_spec_uses_metadata_and_checks_range(tiny):
    assert resolve_spec(tiny, None, None) == (1, 2)
    assert resolve_spec(tiny, 3, 5) == (3, 5)
    with pytest.raises(SystemExit, match="--exit-layer"):
        resolve_spec(tiny, 4, None)
    with pytest.raises(SystemExit, match="--systems"):
        parse_systems("vllm,turbo")


def test_ideal_speedup_and_overhead_split():
    assert ideal.ideal_speedup(3.0, 4, 0.25) == pytest.approx(1.5)
    assert ideal.ideal_speedup(None, 4, 0.25) is None
    assert ideal.ideal_speedup(2.0, 3, 0.0) == 2.0
    # pure weights: a draft step through E of L layers costs E/L -> no fixed overhead
    assert ideal.overhead_fraction(0.25, 3, 12) == pytest.approx(0.0)
    assert ideal.overhead_fraction(1.0, 3, 12) == pytest.approx(1.0)


def test_percentile():
    assert loadgen.percentile([1, 2, 3, 4], 50) == 2.5
    assert loadgen.percentile([], 99) is None


def test_report_renders(tmp_path):
    row = {"system": "vllm", "prompt_set": "code", "batch_size": 1, "temperature": 0.0,
           "tokens_per_s": 10.0, "speedup": 1.0, "acceptance_rate": None,
           "mean_accepted_length": None, "ideal_speedup": None, "peak_memory_mb": 100.0,
           "kv_blocks": 10}
    spec = dict(row, system="layerskip", speedup=1.5, acceptance_rate=0.8,
                mean_accepted_length=2.5, ideal_speedup=2.0)
    md = report.throughput_table([row, spec])
    assert "| layerskip | code | 1 | 0 | 10.0 | 1.50x | 80% | 2.50 | 2.00x | 75% |" in md
    assert report.throughput_chart([row, spec], tmp_path / "c.png").stat().st_size > 0
    grid = [{"exit_layer": e, "num_speculative_tokens": k, "speedup": 1.0 + e / 10 + k / 100}
            for e in (1, 2) for k in (2, 3)]
    assert report.sweep_heatmap(grid, tmp_path / "h.png").stat().st_size > 0
    subset = [dict(g, draft_vocab_size=256, draft_confidence_threshold=0.5) for g in grid]
    assert report.point_label(subset[0]) == "E1 v256 t0.5"
    assert report.sweep_heatmap(grid + subset, tmp_path / "h2.png").stat().st_size > 0
    assert "| 1 | 2 | 256 | 0.5 |" in report.sweep_table(subset)
    serving = [{"system": s, "concurrency": c, "output_tokens_per_s": 10.0 * c, "itl_p50_ms": 5.0,
                "itl_p99_ms": None if c == 8 else 9.0} for s in ("vllm", "layerskip") for c in (1, 8)]
    assert report.serving_chart(serving, tmp_path / "s.png").stat().st_size > 0


def test_an_adaptive_layerskip_ideal_is_never_below_plain():
    from benchmarks.throughput import build_rows

    cell = {"prompt_set": "code", "temperature": 0.0, "batch_size": 1, "tokens_per_s": 9.0,
            "times_s": [1.0], "mean_accepted_length": 1.5, "drafts_per_step": 2}
    results = {"vllm": {"cells": [dict(cell, tokens_per_s=10.0, mean_accepted_length=None)]},
               "layerskip": {"cells": [cell]}}
    ideal_of = lambda adaptive: {r["system"]: r["ideal_speedup"] for r in
                                 build_rows(results, {1: 0.5}, 2, 2, 4, adaptive)}["layerskip"]
    assert ideal_of(False) == pytest.approx(0.75)  # 1.5 tokens / (2 x 0.5 + 1) steps
    assert ideal_of(True) == 1.0  # the switch may decode plainly instead


def test_rounds_merge_to_medians_of_what_each_round_measured():
    from benchmarks.throughput import check_targets, merge_rounds

    def row(system, tps, speedup, times):
        return {"system": system, "prompt_set": "code", "batch_size": 1, "temperature": 0.0,
                "tokens_per_s": tps, "speedup": speedup, "acceptance_rate": None,
                "kv_blocks": 10, "num_drafts": 3, "times_s": times}

    # The machine ran at half speed during round 2: plain's and LayerSkip's tokens/s halve,
    # the speedup measured within the round stays.
    rounds = [[row("vllm", 20.0, 1.0, [1.0]), row("layerskip", 30.0, 1.5, [0.7])],
              [row("layerskip", 15.0, 1.5, [1.4]), row("vllm", 10.0, 1.0, [2.0])],
              [row("vllm", 19.0, 1.0, [1.1]), row("layerskip", 26.6, 1.4, [0.8])]]
    merged = {r["system"]: r for r in merge_rounds(rounds)}
    assert merged["layerskip"]["speedup"] == 1.5
    assert merged["layerskip"]["tokens_per_s"] == 26.6
    assert merged["vllm"]["tokens_per_s"] == 19.0
    assert merged["layerskip"]["times_s"] == [0.7, 1.4, 0.8]
    assert merged["layerskip"]["rounds"] == 3 and merged["layerskip"]["num_drafts"] == 9
    # Targets take the within-round speedup, not the ratio of medians over rounds (1.4 here).
    assert check_targets(list(merged.values()))["batch1_layerskip_vs_vllm>=1.5"]["value"] == 1.5
    two = merge_rounds(rounds[:2])[0]  # the median of two rounds is their mean: not for ints
    assert two["batch_size"] == 1 and isinstance(two["batch_size"], int) and two["kv_blocks"] == 10
    assert merged["layerskip"]["acceptance_rate"] is None


def test_rounds_merge_keeps_a_figure_the_first_round_lacked():
    """A round that drafted nothing has no acceptance (None); a later round's figure counts."""
    from benchmarks.throughput import merge_rounds

    def row(acceptance, drafts):
        return {"system": "layerskip", "prompt_set": "nl", "batch_size": 1, "temperature": 0.8,
                "acceptance_rate": acceptance, "num_drafts": drafts, "times_s": [1.0]}

    (merged,) = merge_rounds([[row(None, 0)], [row(0.5, 3)], [row(0.7, 2)]])
    assert merged["acceptance_rate"] == pytest.approx(0.6)  # median of the rounds that drafted
    assert merged["num_drafts"] == 5
    (one,) = merge_rounds([[row(None, 0)], [row(0.5, 3)]])
    assert one["acceptance_rate"] == 0.5


@pytest.mark.parametrize("argv, flag", [
    (["--batch-sizes", "1,x"], "--batch-sizes"),
    (["--temperatures", "-1"], "--temperatures"),
    (["--systems", "foo"], "--systems"),
    (["--rounds", "0"], "--rounds"),
])
def test_bad_flags_name_the_flag(tiny, tmp_path, argv, flag):
    r = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--model", str(tiny),
                        "--json", str(tmp_path / "o.json"), *argv], capture_output=True, text=True)
    assert r.returncode != 0
    assert flag in r.stderr


def test_readme_section_is_generated_between_markers(tiny, tmp_path):
    from benchmarks import readme
    from benchmarks.throughput import check_targets

    rows = [{"system": s, "prompt_set": "code", "batch_size": 1, "temperature": 0.0,
             "tokens_per_s": v, "speedup": v / 10, "acceptance_rate": None,
             "mean_accepted_length": None, "ideal_speedup": None, "peak_memory_mb": 1.0,
             "kv_blocks": 1} for s, v in (("vllm", 10.0), ("layerskip", 21.0),
                                          ("vllm-draft-truncated", 15.0), ("vllm-ngram", 21.0))]
    targets = check_targets(rows)
    assert targets["batch1_layerskip_vs_vllm>=1.5"] == {"value": 2.1, "ok": True}
    assert targets["batch1_layerskip_vs_vllm_draft_truncated>=1.25"] == {"value": 1.4, "ok": True}
    assert not targets["batch1_layerskip_vs_vllm_ngram>1"]["ok"]  # equal is not above
    assert len(targets) == 3  # no verdict without the rows
    tp = {"results": rows, "targets": targets, "calibration": {},
          "settings": {"model": str(tiny), "exit_layer": 1, "num_speculative_tokens": 2,
                       "dtype": "bfloat16", "max_tokens": 8, "repeats": 1, "warmup": 1,
                       "prompt_sets": ["code"], "machine": {"processor": "x", "cpu_count": 2}}}
    (tmp_path / "tp.json").write_text(json.dumps(tp))
    evaluation = tmp_path / "reference-eval"
    evaluation.mkdir()
    (evaluation / "decode_split.json").write_text(json.dumps(
        {"step_ms_full": 13.6, "step_ms_one_layer": 5.3, "per_layer_ms": 0.76, "fixed_ms": 4.5,
         "layers_share": 0.67, "batch_size": 1, "dtype": "bfloat16"}))
    (evaluation / "per_exit.png").write_bytes(b"png")
    md = tmp_path / "README.md"
    md.write_text("# Title\n\nintro\n")
    for _ in range(2):   # idempotent: the section is replaced, not appended twice
        readme.main(["--throughput", str(tmp_path / "tp.json"), "--readme", str(md),
                     "--docs-dir", str(tmp_path / "docs"), "--reference-eval", str(evaluation)])
    text = md.read_text()
    assert text.startswith("# Title") and text.count(readme.START) == 1
    assert "| layerskip | code | 1 |" in text and "4 layers" in text
    assert "decoder layers 67%" in text and "docs/per-exit.png" in text
    assert (tmp_path / "docs" / "per-exit.png").exists()


def test_overhead_summary_from_synthetic_rounds():
    """Ratios come from the runs as defined: within each round, then the median."""
    from benchmarks.overhead import summarise, to_markdown

    k, b, n = 2, 4, 101  # K, batch, new tokens per request
    plain = [{"seconds": 1.0}, {"seconds": 1.2}, {"seconds": 1.0}]
    # 51 draft rounds of K steps for the whole batch: 50 verifications per request, so
    # a = (n - 1) / 50 = 2 tokens each, and every drafting step held the whole batch.
    always = lambda s, d: {"seconds": s, "draft_seconds": d, "draft_steps": 51 * k,  # noqa: E731
                           "draft_tokens": b * 51 * k, "reused_tokens": 0}
    runs = {"vllm": plain,
            "vllm-control": [{"seconds": 1.1}, {"seconds": 1.2}, {"seconds": 0.9}],
            "layerskip/off": [{"seconds": 1.0}, {"seconds": 1.25}, {"seconds": 1.1}],
            "layerskip/adaptive": [{"seconds": 1.0}, {"seconds": 1.0}, {"seconds": 1.0}],
            "layerskip/always": [always(0.8, 0.2)] * 3,
            "layerskip/always-stock-verify": [always(1.0, 0.2)] * 3,
            "layerskip/always-adaptive-verify": [always(0.9, 0.2)] * 3}
    row = summarise(runs, b, k, n)
    assert row["forced_off_ratio"] == pytest.approx(0.96)  # median of 1.0, 0.96, 0.909
    assert row["adaptive_ratio"] == pytest.approx(1.0)  # median of 1.0, 1.2, 1.0
    assert row["control_ratio"] == pytest.approx(1.0)  # median of 0.909, 1.0, 1.111
    assert row["split_accepted_length"] == pytest.approx(2.0)
    assert row["split_batch_fill"] == pytest.approx(1.0)
    plain_step = 1.0 / n  # median round
    assert row["split_draft_cost"] == pytest.approx(0.2 / (51 * k) / plain_step)
    assert row["split_verify_cost"] == pytest.approx(0.6 / 51 / plain_step)
    assert row["stock_verify_cost"] > row["split_verify_cost"]
    assert row["split_speedup"] == pytest.approx(1.0 / 0.8)
    assert row["adaptive_speedup"] == pytest.approx(1.0 / 0.9)
    assert row["split_verify_cost"] < row["adaptive_verify_cost"] < row["stock_verify_cost"]
    c = row["split_draft_cost"]
    assert row["split_of_ideal"] == pytest.approx(1.25 / (2.0 / (k * c + 1)))
    # The batch took 51 verification steps where plain decoding took n = 101.
    assert row["split_step_ideal"] == pytest.approx(n / 51 / (k * c + 1))
    assert row["split_of_step_ideal"] == pytest.approx(1.25 / row["split_step_ideal"])
    assert "| 4 |" in to_markdown({"model": "m", "exit_layer": 1, "k": k, "dtype": "bf16",
                                   "enforce_eager": False, "max_tokens": n, "rounds": 3,
                                   "repeats": 3, "machine": "cpu"}, [row])


def test_engine_cores_split_by_affinity_masks():
    """A thread bound to part of the machine is a worker's; the rest of the machine is
    left to the other processes. Nothing bound, or workers on every core: nothing to do."""
    from benchmarks.affinity import split_cores

    cpus = {0, 1, 2, 3}
    assert split_cores(cpus, [cpus, {0, 1, 2}, cpus, {0, 1, 2}]) == ({0, 1, 2}, {3})
    assert split_cores(cpus, [cpus, cpus]) == (set(), cpus)
    assert split_cores({0, 1}, [{0}, {1}, {0, 1}]) == ({0, 1}, set())


def test_pinning_moves_unbound_threads_off_a_bound_child():
    """An engine-like process tree: a parent, and a child bound to one core as vLLM binds
    its worker. The child keeps its core; the parent's threads move to the others."""
    import os
    import subprocess
    import sys

    from benchmarks.affinity import pin_engine_processes

    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.skip("needs 2 cores to separate")  # CI and dev machines have 2
    bound = min(cpus)
    worker = f"import os, time; os.sched_setaffinity(0, {{{bound}}}); print(flush=True); time.sleep(60)"
    parent = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
              f"{worker!r}], stdout=subprocess.PIPE); c.stdout.readline(); print(c.pid, flush=True); "
              "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())  # the child is bound by now
        done = pin_engine_processes(proc.pid)
        assert done["worker_cores"] == [bound] and done["threads_pinned"] >= 1
        assert os.sched_getaffinity(proc.pid) == cpus - {bound}
        assert os.sched_getaffinity(child) == {bound}
    finally:
        for p in psutil_tree(proc.pid):
            p.kill()


def psutil_tree(pid):
    import psutil

    root = psutil.Process(pid)
    return [*root.children(recursive=True), root]


def test_demo_uses_the_shipped_model_unless_told_otherwise(tmp_path):
    from benchmarks.demo import DEMO_DIR, pick_model_dir
    from benchmarks.tiny_model import build_tiny_model

    shipped = tmp_path / "shipped"
    assert pick_model_dir(None, False, shipped) == DEMO_DIR  # nothing shipped: build one
    build_tiny_model(shipped, layers=2, hidden=64, vocab_size=512)
    assert pick_model_dir(None, False, shipped) == shipped
    assert pick_model_dir(None, True, shipped) == DEMO_DIR
    assert pick_model_dir(str(tmp_path / "mine"), False, shipped) == tmp_path / "mine"


def test_train_speed_sides_compute_the_same_step(tmp_path):
    """Two sides that differ only in speed settings (loss chunking, fused AdamW) run the
    same batches and masks: same losses, both timed. Bad side settings name the flag."""
    import json

    from benchmarks import train_speed
    from benchmarks.tiny_model import build_tiny_model
    from training.errors import ConfigError

    model = build_tiny_model(tmp_path / "tiny", layers=2, hidden=64, vocab_size=512)
    out = tmp_path / "speed.json"
    train_speed.main(["--model", str(model), "--side", "before=chunk=0,fused=0", "--side", "after=",
                      "--steps", "2", "--warmup", "0", "--files", "3", "--seq-len", "32",
                      "--batch-size", "2", "--json", str(out), "--preset", "pretraining"])
    sides = json.loads(out.read_text())["sides"]
    assert sides["before"]["settings"]["chunk"] == 0 and sides["after"]["settings"]["fused"] == 1
    assert sides["before"]["losses"] == pytest.approx(sides["after"]["losses"], rel=1e-2)
    assert all(s["tokens_per_s"] > 0 and len(s["step_times"]) == 2 for s in sides.values())
    with pytest.raises(ConfigError, match="--side x"):
        train_speed.parse_side("x=chunks=3")


def test_step_profile_reports_milliseconds_per_engine_step_per_hook():
    from benchmarks.step_profile import summarise

    def run(wall, steps, forward, propose=None):
        hooks = {"runner.execute_model": (wall * 0.9, steps), "runner._model_forward": (forward, steps)}
        if propose is not None:
            hooks["drafter.propose"] = (propose, steps)
        return {"seconds": wall, "hooks": hooks}

    runs = {"off": [run(1.0, 100, 0.8), run(1.2, 100, 0.9), run(1.1, 100, 0.85)],
            "always": [run(0.6, 30, 0.4, 0.15), run(0.9, 30, 0.5, 0.21), run(0.7, 30, 0.45, 0.18)]}
    rows = {row["hook"]: row for row in summarise(runs)}
    assert rows["wall time"]["off"] == pytest.approx(11.0)  # median of 10, 12, 11 ms per step
    assert rows["wall time"]["always"] == pytest.approx(0.7 / 30 * 1e3)
    assert rows["runner._model_forward"]["off"] == pytest.approx(8.5)
    assert rows["drafter.propose"]["always"] == pytest.approx(6.0)
    assert rows["drafter.propose"]["off"] == 0 and rows["drafter.propose"]["off calls"] == 0
    assert rows["drafter.propose"]["always calls"] == 1.0

