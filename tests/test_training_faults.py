"""Faults: a run SIGKILLed while writing a checkpoint resumes to the weights of an
uninterrupted run, and damaged or mismatched model files (truncated or garbage
safetensors, a config.json that does not fit the weights) give one error naming the file."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import checkpoint as ckpt
from training import evaluate, finetune, pretrain
from training.cli import run_cli
from training.integrity import describe_mismatch

from test_training_cli import DATA, ENV, ROOT, cli, pretrain_args

RUN = ["--save-every", "2", "--grad-accum", "2", "--layer-dropout-max", "0.5",
       "--layer-dropout-time-scale", "constant", "--rotation-period", "2"]


def _pretrain_cmd(out, *extra):
    return [sys.executable, "-m", "training.pretrain", *pretrain_args(out, 8, *RUN), *extra]


def _wait_for(pattern_root: Path, pattern: str, proc, deadline_s: float = 180) -> Path:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        hits = sorted(pattern_root.glob(pattern)) if pattern_root.is_dir() else []
        if hits:
            return hits[0]
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} under {pattern_root} within {deadline_s}s")


@pytest.mark.slow
def test_sigkill_while_writing_checkpoint_resumes_to_same_weights(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    # Both runs in subprocesses with the same environment (thread counts), so the
    # comparison can be bitwise.
    uninterrupted = subprocess.Popen(_pretrain_cmd(full), cwd=ROOT, env=ENV, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed = subprocess.Popen(_pretrain_cmd(cut), cwd=ROOT, env={**ENV, ckpt.PAUSE_HOOK: "4"},
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(cut / "checkpoints", f"{ckpt.TMP}step-000004-*/{ckpt.WEIGHTS}", killed)
        os.kill(killed.pid, signal.SIGKILL)
        assert killed.wait(timeout=30) == -signal.SIGKILL
    finally:
        killed.kill()
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.communicate()[0][-3000:]

    # The half-written step 4 is only a temp dir, which resume must not take for a checkpoint.
    entries = sorted(p.name for p in (cut / "checkpoints").iterdir())
    partial = [e for e in entries if e.startswith(f"{ckpt.TMP}step-000004-")]
    assert entries[-1] == "step-000002" and len(partial) == 1
    assert not (cut / "checkpoints" / partial[0] / ckpt.STATE).exists()  # killed mid-write
    assert [step for step, _ in ckpt.checkpoint_dirs(str(cut))] == [2]
    assert not (cut / "model.safetensors").exists()

    resumed = subprocess.run([*_pretrain_cmd(cut), "--resume"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [p for p in (cut / "checkpoints").iterdir() if p.name.startswith(ckpt.TMP)]
    assert not [p for p in cut.iterdir() if p.name.startswith(ckpt.TMP)]
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stale_temps_are_not_checkpoints_and_get_removed(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-000002", ".tmp-step-000004-123", ".tmp-old-step-000001-9"):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"x")
    (tmp_path / ".tmp-final-7").mkdir()
    (tmp_path / "config.json").write_text("{}")
    assert [(s, p.name) for s, p in ckpt.checkpoint_dirs(str(tmp_path))] == [(2, "step-000002")]
    removed = ckpt.remove_stale_temps(str(tmp_path))
    assert sorted(p.name for p in removed) == [".tmp-final-7", ".tmp-old-step-000001-9",
                                               ".tmp-step-000004-123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.json"]
    assert [p.name for p in root.iterdir()] == ["step-000002"]


def test_describe_mismatch():
    expected = {"model.embed_tokens.weight": (300, 32), "model.layers.0.mlp.up_proj.weight": (64, 32),
                "model.layers.1.mlp.up_proj.weight": (64, 32), "model.norm.weight": (32,)}
    config = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64}
    assert describe_mismatch(expected, dict(expected), config) is None
    extra = {**expected, "lm_head.weight": (300, 32)}  # e.g. a stored copy of tied embeddings
    assert describe_mismatch(expected, extra, config) is None
    three = {**expected, "model.layers.2.mlp.up_proj.weight": (64, 32)}
    assert describe_mismatch(expected, three, config) == (
        "num_hidden_layers is 2 in the config, the weights hold 3 layers")
    wide = {**expected, "model.embed_tokens.weight": (300, 48)}
    assert describe_mismatch(expected, wide, config).startswith("hidden_size is 32 in the config, 48")
    norm = {**expected, "model.norm.weight": (31,)}
    assert "model.norm.weight has shape [31]" in describe_mismatch(expected, norm, config)
    lacking = {k: v for k, v in expected.items() if k != "model.norm.weight"}
    assert describe_mismatch(expected, lacking, config) == "the weights lack model.norm.weight"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _edit_config(**changes):
    def edit(path: Path) -> None:
        config_path = path.parent / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **changes}))
    return edit


def _more_layers(path: Path) -> None:
    config = json.loads((path.parent / "config.json").read_text())
    _edit_config(num_hidden_layers=config["num_hidden_layers"] + 1)(path)


# (damage applied to a model.safetensors, words the error must contain, file it must name)
DAMAGE = {
    "truncated": (_truncate, "truncated or corrupt", "model.safetensors"),
    "garbage": (_garbage, "truncated or corrupt", "model.safetensors"),
    "hidden-size": (_edit_config(hidden_size=64), "hidden_size is 64 in the config", "config.json"),
    "layers": (_more_layers, "num_hidden_layers is", "config.json"),
}


def _assert_one_error(code, err, path: Path, words: str, name: str):
    """Exit 2 and one `error: ` line, the last (progress bars of loading may precede it)."""
    assert code == 2, err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err, err
    assert words in last and str(path.parent / name) in last, err


@pytest.fixture()
def damaged_model(llama_dir, tmp_path, request):
    damage, words, name = DAMAGE[request.param]
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    damage(model / "model.safetensors")
    return model, words, name


@pytest.mark.parametrize("damaged_model", list(DAMAGE), indirect=True)
def test_finetune_and_evaluate_name_the_damaged_file(damaged_model, tmp_path, capsys):
    model, words, name = damaged_model
    code, err = cli(finetune.main, ["--model", str(model), "--data", *DATA, "--output",
                                    str(tmp_path / "o"), "--steps", "2"], capsys)
    _assert_one_error(code, err, model / "model.safetensors", words, name)
    assert not (tmp_path / "o").exists()
    code, err = cli(evaluate.main, ["--model", str(model), "--data", *DATA, "--json",
                                    str(tmp_path / "r.json")], capsys)
    _assert_one_error(code, err, model / "model.safetensors", words, name)
    assert not (tmp_path / "r.json").exists()


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A tiny pretraining run stopped after its step-2 checkpoint."""
    out = tmp_path_factory.mktemp("faults") / "run"
    run_cli(lambda: pretrain.main(pretrain_args(out, 4, "--save-every", "2", "--stop-after", "2")))
    return out


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_resume_names_the_damaged_checkpoint_file(checkpointed_run, tmp_path, capsys, kind):
    damage, words, name = DAMAGE[kind]
    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    weights = out / "checkpoints" / "step-000002" / "model.safetensors"
    damage(weights)
    before = {p: p.read_bytes() for p in weights.parent.iterdir()}
    code, err = cli(pretrain.main, pretrain_args(out, 4, "--save-every", "2", "--resume"), capsys)
    _assert_one_error(code, err, weights, words, name)
    assert err.startswith("error: --resume: ")
    assert {p: p.read_bytes() for p in weights.parent.iterdir()} == before  # nothing touched


def test_finetune_resume_with_another_base_model(llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ft"
    args = ["--data", *DATA, "--output", str(out), "--steps", "4", "--seq-len", "32",
            "--batch-size", "2", "--save-every", "2", "--no-progress"]
    assert cli(finetune.main, ["--model", str(llama_dir), *args, "--stop-after", "2"], capsys)[0] == 0
    other = tmp_path / "other"
    shutil.copytree(llama_dir, other)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.model.layers = model.model.layers[:3]
    model.config.num_hidden_layers = 3
    model.save_pretrained(other)
    capsys.readouterr()
    code, err = cli(finetune.main, ["--model", str(other), *args, "--resume"], capsys)
    weights = out / "checkpoints" / "step-000002" / "model.safetensors"
    _assert_one_error(code, err, weights, "num_hidden_layers is 3 in the config, the weights hold 4",
                      "model.safetensors")


def test_evaluate_subprocess_error_has_no_traceback(llama_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    _truncate(model / "model.safetensors")
    proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--model", str(model),
                           "--data", *DATA, "--json", str(tmp_path / "r.json")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        l for l in proc.stderr.strip().splitlines() if l.startswith("error: --model: ")]
    assert f"{model / 'model.safetensors'} is truncated or corrupt" in proc.stderr
