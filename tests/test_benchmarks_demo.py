"""Quick path of the demo: a tiny model trained for a few steps, one prompt, a few tokens;
a second invocation reuses the model. And, without engines or training, how --base smollm2
picks, builds and sizes its model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import demo
from benchmarks import reference_smollm2 as smol


TINY = ["--layers", "2", "--hidden-size", "64", "--vocab-size", "512", "--steps", "3",
        "--seq-len", "64", "--batch-size", "4", "--train-files", "10"]


@pytest.mark.engine
@pytest.mark.slow
def test_demo_builds_then_reuses(tmp_path):
    model = tmp_path / "demo"
    cmd = [sys.executable, "-m", "benchmarks.demo", "--model-dir", str(model), *TINY,
           "--num-prompts", "1", "--max-tokens", "8", "--in-process-engine", "--timeout", "300"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Building the demo model" in r.stdout
    for text in ("plain vLLM", "LayerSkip, adaptive (default)", "engine steps per run",
                 "LayerSkip, drafting every step", "acceptance", "identical (greedy)"):
        assert text in r.stdout
    # Drafting on every step drafted, so the identity check covered verified drafts.
    assert "1/1 drafting every step" in r.stdout and "acceptance - " not in r.stdout
    assert "train" in r.stderr          # the training progress bar
    r2 = subprocess.run(cmd + ["--build-only"], capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "Reusing the demo model" in r2.stdout


# ----- --base smollm2, no engine, no training, no network ----------------------------

def fake_model(d: Path, steps: int = 24) -> Path:
    """What model_ready / is_built accept: weights and a config with LayerSkip metadata."""
    d.mkdir(parents=True, exist_ok=True)  # a rebuild replaces it
    (d / "model.safetensors").write_bytes(b"")
    meta = {"training": {"steps": steps, "batch_size": 8, "seq_len": 256}}
    (d / "config.json").write_text(json.dumps({"layerskip": meta}))
    return d


@pytest.fixture
def models(tmp_path, monkeypatch):
    """demo.MODELS in tmp_path; building the SmolLM2 demo model only records the call."""
    monkeypatch.setattr(demo, "MODELS", tmp_path)
    built = []

    def build_demo(args, out, base):
        built.append((out, base, args.steps))
        fake_model(out, args.steps)

    monkeypatch.setattr(smol, "build_demo", build_demo)
    monkeypatch.setattr(demo, "build_model", lambda *a: pytest.fail("built the tiny model"))
    return tmp_path, built


def prepare(*argv):
    return demo.prepare_model(demo.parse_args(["--base", "smollm2", *argv]))


def test_smollm2_builds_its_demo_model_once(models, capsys):
    root, built = models
    assert prepare() == root / "smollm2-demo"
    assert built == [(root / "smollm2-demo", root / "smollm2", 24)]
    assert prepare() == root / "smollm2-demo" and len(built) == 1  # reused
    assert "Reusing the demo model" in capsys.readouterr().out
    assert prepare("--rebuild", "--steps", "3") == root / "smollm2-demo"
    assert built[-1] == (root / "smollm2-demo", root / "smollm2", 3)


def test_smollm2_prefers_the_reference_build_and_never_retrains_it(models, capsys):
    root, built = models
    fake_model(root / "smollm2-demo")
    ref = fake_model(root / "smollm2-layerskip", steps=60)
    before = (ref / "config.json").read_text()
    assert prepare() == ref and not built
    assert "Using the reference build" in capsys.readouterr().out
    # --rebuild retrains the demo's own model; the reference build stays as it was.
    assert prepare("--rebuild") == root / "smollm2-demo"
    assert [b[0] for b in built] == [root / "smollm2-demo"]
    assert prepare("--model-dir", str(ref), "--rebuild") == ref and len(built) == 1
    assert (ref / "config.json").read_text() == before


def test_smollm2_model_dir_overrides(models, tmp_path):
    root, built = models
    fake_model(root / "smollm2-layerskip")
    mine = fake_model(tmp_path / "mine")
    assert prepare("--model-dir", str(mine)) == mine and not built
    assert prepare("--model-dir", str(tmp_path / "new")) == tmp_path / "new"
    assert built == [(tmp_path / "new", root / "smollm2", 24)]


def test_smollm2_flags_and_header():
    args = demo.parse_args(["--base", "smollm2"])
    assert (args.steps, args.batch_size, args.seq_len) == (24, 8, 256)
    shipped = demo.parse_args([])  # today's defaults
    assert (shipped.base, shipped.layers, shipped.steps, shipped.batch_size) == ("shipped", 6, 400, 16)
    with pytest.raises(SystemExit):
        demo.parse_args(["--base", "smollm2", "--hidden-size", "64"])
    cfg = {"layerskip": {"training": {"steps": 60, "batch_size": 8, "seq_len": 256}}}
    assert demo.smollm2_header(cfg) == ("SmolLM2-135M-Instruct, imported from GGUF, trained "
                                        "with the LayerSkip recipe for 60 steps (8 x 256 tokens each)")


def test_build_demo_trains_with_the_recipe_into_place(tmp_path, monkeypatch, capsys):
    """The fine-tuning command (recipe on, 16 calibration blocks, progress bar) and the
    model directory appearing only once built; training.finetune itself is faked."""
    imported, cmds = [], []
    monkeypatch.setattr(smol, "import_base", lambda gguf, out, rebuild: imported.append(
        (gguf, out, rebuild)))

    def call(cmd):
        cmds.append(cmd)
        fake_model(Path(cmd[cmd.index("--output") + 1]))
        return 0

    monkeypatch.setattr(smol.subprocess, "call", call)
    args = demo.parse_args(["--base", "smollm2", "--train-files", "2"])
    out = tmp_path / "smollm2-demo"
    smol.build_demo(args, out, tmp_path / "smollm2")
    assert imported == [(None, tmp_path / "smollm2", False)]  # cached import kept
    (cmd,) = cmds
    assert cmd[1:3] == ["-m", "training.finetune"]
    flag = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert flag("--model") == str(tmp_path / "smollm2")
    assert (flag("--steps"), flag("--batch-size"), flag("--seq-len")) == ("24", "8", "256")
    assert (flag("--preset"), flag("--lr")) == ("continual-pretraining", "0.0001")
    assert flag("--calibration-blocks") == "16"
    assert len(cmd[cmd.index("--data") + 1:cmd.index("--output")]) == 2  # --train-files 2
    assert "--no-progress" not in cmd and "--early-exit-scale" not in cmd
    assert demo.model_ready(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-demo"]  # no .tmp-* left
    printed = capsys.readouterr().out
    assert "49,152 training tokens, about 4-6 min" in printed and "calibration" in printed


def test_max_model_len_fits_prompt_and_new_tokens():
    cfg = demo.read_config(demo.SHIPPED_DIR)
    prompts = ["def f(x):\n    return x\n" * 20]
    assert demo.model_len(demo.SHIPPED_DIR, cfg, prompts, 64) == 1024  # as before
    n = demo.model_len(demo.SHIPPED_DIR, cfg, prompts, 1200)
    assert n % 256 == 0 and 1200 < n <= cfg["max_position_embeddings"]
    with pytest.raises(SystemExit, match="more than this model's context"):
        demo.model_len(demo.SHIPPED_DIR, cfg, prompts, cfg["max_position_embeddings"])


def test_summary_says_what_the_switch_measured_and_chose():
    plain = {"tokens_per_s": 100.0}
    cell = {"batch_size": 1, "times_s": [1.0, 1.0], "tokens_per_s": 90.0, "num_drafts": 20,
            "plain_steps_per_repeat": 180.0,
            "switch_seconds_per_token": {"drafting": 0.015, "plain": 0.006}}
    always = {"tokens_per_s": 80.0, "acceptance_rate": 0.35, "mean_accepted_length": 1.7}
    lines = demo.summary(plain, cell, always, {"adaptive": 3, "always": 2}, 3)
    text = "\n".join(lines)
    assert "0.90x" in text and "0.80x" in text
    assert "drafted on 10 of 190 engine steps per run" in text
    assert "drafting 15.0 ms, plain 6.0 ms -> decodes plainly at batch 1" in text
    assert "acceptance 35% of drafted tokens, 1.70 tokens per verification" in text
    assert "3/3 adaptive (default), 2/3 drafting every step" in text
    cell["switch_seconds_per_token"] = {"drafting": 0.004, "plain": 0.006}
    assert "-> drafts at batch 1" in "\n".join(demo.summary(plain, cell, always, {"adaptive": 3, "always": 3}, 3))
    cell["switch_seconds_per_token"] = {"drafting": None, "plain": 0.006}
    assert "has not measured both modes" in "\n".join(demo.summary(plain, cell, always, {"adaptive": 3, "always": 3}, 3))


def test_layerskip_cells_are_keyed_and_read_by_mode():
    from benchmarks.measure import cell_key, switch_stats

    cell = {"prompt_set": "code", "temperature": 0.0, "batch_size": 1}
    assert cell_key(cell) == "code/0.0/1"
    assert cell_key({**cell, "drafting": "always"}) == "code/0.0/1/always"
    before = {"plain_steps": 10}
    after = {"plain_steps": 70, "drafting": "adaptive",
             "seconds_per_token_by_batch_bucket": {"1": {"drafting": 0.01, "plain": 0.02}}}
    assert switch_stats(before, after, 1, 3) == {
        "drafting": "adaptive", "plain_steps_per_repeat": 20.0,
        "switch_seconds_per_token": {"drafting": 0.01, "plain": 0.02}}
    after["seconds_per_token_by_batch_bucket"] = {8: {"drafting": None, "plain": 0.02}}
    assert switch_stats(before, after, 5, 1)["switch_seconds_per_token"] == {"drafting": None, "plain": 0.02}
    assert switch_stats(before, after, 1, 1)["switch_seconds_per_token"] == {"drafting": None, "plain": None}
