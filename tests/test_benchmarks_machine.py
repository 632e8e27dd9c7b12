"""The machine a figure comes from, the dtype its engines run in, and how results reach
disk (benchmarks/machine.py, and benchmarks.overhead writing round by round). No engine."""
import json

import pytest


@pytest.mark.parametrize("avx512_bf16, amx, expected",
                         [(False, False, "float32"), (True, False, "bfloat16"),
                          (False, True, "bfloat16")])
def test_engine_dtype_auto_follows_the_cpu(monkeypatch, avx512_bf16, amx, expected):
    """auto is bfloat16 only where the CPU computes it (so is the trainer's autocast); a
    named dtype is kept; --dtype holds the resolved name, and a bad one is refused naming
    what is allowed."""
    import argparse
    import torch
    from benchmarks import machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert machine.engine_dtype() == machine.engine_dtype("auto") == expected
    assert machine.engine_dtype("float16") == "float16"
    assert machine.machine_info()["native_bf16"] == (expected == "bfloat16")
    # The trainer's autocast asks the same question (training/hardware.py), unless told.
    from training.trainer import use_bf16
    assert use_bf16(None, torch.device("cpu")) == (expected == "bfloat16")
    assert use_bf16(False, torch.device("cpu")) is False
    with pytest.raises(ValueError, match="auto, bfloat16, float32, float16"):
        machine.engine_dtype("int8")
    ap = argparse.ArgumentParser()
    machine.add_dtype_flag(ap)
    assert ap.parse_args([]).dtype == expected
    assert ap.parse_args(["--dtype", "auto"]).dtype == expected
    assert ap.parse_args(["--dtype", "float32"]).dtype == "float32"
    with pytest.raises(SystemExit):
        ap.parse_args(["--dtype", "int8"])


def test_overhead_writes_each_finished_round(tmp_path, monkeypatch):
    """benchmarks.overhead writes its results after every round: an engine that fails to
    start in round 2 leaves round 1's figures on disk, marked as 1 of 2 rounds."""
    from benchmarks import overhead
    lives = []  # engines started

    class FakeEngine:  # plain runs of 8 steps x 10 ms; LayerSkip's take 12 ms a step
        def __init__(self, engine_args, max_tokens):
            lives.append(engine_args)
            if len(lives) > len(overhead.ENGINES):
                raise RuntimeError("engine process failed to start")
            self.pinned = {}

        def run(self, batch, mode):
            if mode is None:
                return {"seconds": 0.01 * 8}
            drafting = mode != "off"
            return {"seconds": 0.012 * 8, "draft_seconds": 0.002 * 4 * drafting,
                    "draft_steps": 8 * drafting, "draft_tokens": 8 * batch * drafting,
                    "reused_tokens": 0}

        def close(self):
            pass

    monkeypatch.setattr(overhead, "EngineProcess", FakeEngine)
    monkeypatch.setattr(overhead, "resolve_spec", lambda model, e, k: (2, 2))
    out, md = tmp_path / "o.json", tmp_path / "o.md"
    argv = ["--model", "m", "--batch-sizes", "1,2", "--max-tokens", "8", "--repeats", "1",
            "--json", str(out), "--md", str(md)]
    with pytest.raises(RuntimeError, match="failed to start"):
        overhead.main(argv + ["--rounds", "2"])
    data = json.loads(out.read_text())
    assert (data["meta"]["rounds"], data["meta"]["rounds_asked"]) == (1, 2)
    assert [row["batch_size"] for row in data["rows"]] == [1, 2]
    assert data["rows"][0]["forced_off_ratio"] == pytest.approx(0.01 / 0.012)
    assert "1 lives each (of 2 asked)" in md.read_text()
    lives.clear()
    assert overhead.main(argv + ["--rounds", "1"]) == 0
    assert json.loads(out.read_text())["meta"]["rounds"] == 1
    assert "asked" not in md.read_text()


def test_draft_cost_runs_its_engines_in_the_machines_dtype(monkeypatch, tmp_path):
    """benchmarks.draft_cost takes --dtype (auto by default) to every engine it starts and
    records it with the machine (no engine: `measure` is replaced)."""
    from benchmarks import draft_cost, machine
    engines = []

    def fake_measure(model, e, k, vocab, batches, max_tokens, eager, dtype):
        engines.append((vocab, dtype))
        return [{"draft_vocab_size": vocab, "batch_size": b, "full_step_ms": 10.0,
                 "draft_step_ms": 4.0, "draft_cost": 0.4} for b in batches]

    monkeypatch.setattr(draft_cost, "measure", fake_measure)
    monkeypatch.setattr(draft_cost, "resolve_spec", lambda model, e, k: (3, k))
    monkeypatch.setattr(draft_cost, "num_layers", lambda model: 8)
    out = tmp_path / "cost.json"
    assert draft_cost.main(["--model", str(tmp_path), "--batch-sizes", "1,8", "--json", str(out)]) == 0
    auto = machine.engine_dtype()
    assert engines == [(0, auto), (8192, auto)]
    data = json.loads(out.read_text())
    assert data["dtype"] == auto and data["machine"].startswith(machine.machine_info()["processor"])
    engines.clear()
    draft_cost.main(["--model", str(tmp_path), "--draft-vocab-sizes", "0", "--dtype", "float32"])
    assert engines == [(0, "float32")]
