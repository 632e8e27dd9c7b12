"""CLI behaviour: resume equals an uninterrupted run, every bad input gives one clear
error and loses nothing, fine-tuning of Llama and Qwen2, torchrun with DDP and FSDP."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import finetune, pretrain
from training.cli import run_cli

STDLIB = Path(os.__file__).parent
DATA = [str(STDLIB / "json")]
ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "2", "--hidden-size", "32", "--vocab-size", "300", "--seq-len", "32",
        "--batch-size", "4", "--seed", "1", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(main, argv, capsys):
    """Run a CLI main in-process; returns (exit code, stderr)."""
    try:
        run_cli(lambda: main(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def pretrain_args(out, steps=6, *extra):
    return ["--data", *DATA, "--output", str(out), "--steps", str(steps), *TINY, *extra]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    run_cli(lambda: pretrain.main(pretrain_args(out, 4)))
    return out


@pytest.mark.slow
def test_resume_after_interrupt_equals_uninterrupted(tmp_path, capsys):
    flags = ["--save-every", "4", "--grad-accum", "2", "--layer-dropout-max", "0.5",
             "--layer-dropout-time-scale", "constant", "--rotation-period", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli(pretrain.main, pretrain_args(full, 10, *flags), capsys)[0] == 0
    assert cli(pretrain.main, pretrain_args(cut, 10, *flags, "--stop-after", "6"), capsys)[0] == 0
    assert not (cut / "model.safetensors").exists()  # "killed" after step 6
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-000004"]
    assert cli(pretrain.main, pretrain_args(cut, 10, *flags, "--resume"), capsys)[0] == 0
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoints_are_complete_and_rotated(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(pretrain.main, pretrain_args(out, 7, "--save-every", "2", "--keep-checkpoints", "2"), capsys)[0] == 0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000004", "step-000006"]  # older ones rotated out, no temp dirs left
    assert {"config.json", "model.safetensors", "trainer_state.pt", "tokenizer.json"} <= {
        p.name for p in (out / "checkpoints" / "step-000006").iterdir()}


@pytest.mark.parametrize("flags, message", [
    (["--layer-dropout-max", "1.0"], "--layer-dropout-max must be in [0, 1)"),
    (["--layer-dropout-max", "-0.1"], "--layer-dropout-max must be in [0, 1)"),
    (["--early-exit-scale", "-1"], "--early-exit-scale must be >= 0"),
    (["--rotation-period", "0"], "--rotation-period must be >= 1"),
    (["--preset", "nope"], "--preset must be one of"),
])
def test_bad_recipe_flags(tmp_path, capsys, flags, message):
    code, err = cli(pretrain.main, pretrain_args(tmp_path / "o", 2, *flags), capsys)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_missing_and_empty_data(tmp_path, capsys):
    args = pretrain_args(tmp_path / "o", 2)
    args[1] = str(tmp_path / "missing")
    code, err = cli(pretrain.main, args, capsys)
    assert code == 2 and "--data" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.py").write_text("")
    args[1] = str(tmp_path / "empty")
    code, err = cli(pretrain.main, args, capsys)
    assert code == 2 and "no text" in err
    assert not (tmp_path / "o").exists()


def test_non_empty_output_is_not_touched(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = cli(pretrain.main, pretrain_args(out, 2), capsys)
    assert code == 2 and "--output" in err and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
    assert cli(pretrain.main, pretrain_args(out, 2, "--overwrite"), capsys)[0] == 0
    assert (out / "model.safetensors").exists() and not (out / "precious.txt").exists()


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(pretrain.main, pretrain_args(out, 4, "--save-every", "2", "--stop-after", "2"), capsys)[0] == 0
    weights = out / "checkpoints" / "step-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = cli(pretrain.main, pretrain_args(out, 4, "--save-every", "2", "--resume"), capsys)
    assert code == 2 and "corrupt" in err and err.count("\n") == 1
    assert weights.stat().st_size == 100  # nothing deleted or replaced
    code, err = cli(pretrain.main, pretrain_args(tmp_path / "none", 4, "--resume"), capsys)
    assert code == 2 and "no checkpoint" in err


def test_unsupported_architecture(tmp_path, capsys):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    code, err = cli(finetune.main, ["--model", str(bad), "--data", *DATA, "--output",
                                    str(tmp_path / "o"), "--steps", "2"], capsys)
    assert code == 2 and "unsupported architecture GPT2LMHeadModel" in err


def test_cli_subprocess_prints_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.pretrain", *pretrain_args(tmp_path / "o", 2),
                           "--rotation-period", "0"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --rotation-period must be >= 1, got 0"


def test_finetune_llama_and_qwen2(tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from training.metadata import read_layerskip_metadata

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=3, num_attention_heads=2,
                                        num_key_value_heads=1, max_position_embeddings=128))
    qwen.save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    for name, src in (("llama", tiny_model), ("qwen2", tmp_path / "qwen")):
        out = tmp_path / f"ft-{name}"
        code, err = cli(finetune.main, ["--model", str(src), "--data", *DATA, "--output", str(out),
                                        "--steps", "3", "--seq-len", "32", "--batch-size", "2",
                                        "--preset", "task-finetuning", "--no-progress"], capsys)
        assert code == 0, err
        assert AutoModelForCausalLM.from_pretrained(out).config.architectures[0].startswith(name[:4].capitalize())
        meta = read_layerskip_metadata(out)
        assert meta["recipe"]["curriculum"] == "gradual" and meta["training"]["mode"] == "finetune"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes(tmp_path, mode):
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29600 + (mode == "fsdp")), "-m", "training.pretrain", *pretrain_args(out, 4),
           "--layer-dropout-max", "0.7", "--layer-dropout-time-scale", "constant", "--save-every", "2"]
    if mode == "fsdp":
        cmd.append("--fsdp")
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").exists() and (out / "checkpoints" / "step-000002").exists()
    state = load_file(out / "model.safetensors")
    assert state["model.embed_tokens.weight"].shape == (300, 32)  # full, unsharded weights
