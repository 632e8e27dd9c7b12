"""Output directory safety, periodic checkpoints and resume.

Layout of --output:
    config.json, model.safetensors, tokenizer files      final model (written last)
    checkpoints/step-000100/                             periodic checkpoints:
        config.json, model.safetensors, tokenizer files    the model so far
        trainer_state.pt                                   optimizer, scheduler, RNG (weights_only)
        trainer_state.json                                 step, tokens seen

Every save goes to a hidden temp directory first and is renamed into place, and a
checkpoint is deleted only after being renamed to a temp name, so every `step-*`
directory is complete even if the process is killed at any point (a killed save leaves
only `.tmp-*` entries, which --resume ignores and removes).

Test hook: with LAYERSKIP_TEST_PAUSE_SAVE_AT=N in the environment, the save of step N
sleeps for a minute between writing the weights and the rename, so that tests can
SIGKILL a run in the middle of writing a checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, OutputError
from .integrity import check_model_files, describe_mismatch, model_shapes

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
TMP = ".tmp-"
PAUSE_HOOK = "LAYERSKIP_TEST_PAUSE_SAVE_AT"


def prepare_output(output: str, overwrite: bool, resume: bool) -> None:
    """Refuse to touch a non-empty output unless --overwrite or --resume. Nothing is
    deleted here: --overwrite clears the directory only once training is set up."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--output: {output} exists and is not a directory")
    if resume:
        if not checkpoint_dirs(output):
            raise CheckpointError(f"--resume: no checkpoint in {Path(output) / CHECKPOINTS}")
        return
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(f"--output: {output} is not empty; pass --overwrite to replace it "
                          f"or --resume to continue its checkpoints")


def clear_output(output: str) -> None:
    path = Path(output)
    if path.is_dir():
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)


def checkpoint_dirs(output: str) -> list[tuple[int, Path]]:
    root = Path(output) / CHECKPOINTS
    found = []
    for d in root.glob("step-*") if root.is_dir() else []:
        try:
            found.append((int(d.name.split("-", 1)[1]), d))
        except ValueError:
            continue
    return sorted(found)


def remove_stale_temps(output: str) -> list[Path]:
    """Delete what killed saves left behind (temp checkpoints, a temp final model);
    returns what was removed."""
    out = Path(output)
    stale = [*out.glob(f"{TMP}*"), *(out / CHECKPOINTS).glob(f"{TMP}*")]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return stale


def _discard(path: Path) -> None:
    """Rename to a temp name, then delete: a kill mid-delete leaves no partial step-*."""
    doomed = path.with_name(f"{TMP}old-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _test_pause(step: int) -> None:
    if os.environ.get(PAUSE_HOOK) == str(step):
        time.sleep(60)


def _save_weights(state_dict: dict, path: Path) -> None:
    # safetensors refuses tensors that share storage (tied embeddings): store copies.
    seen, tensors = set(), {}
    for name, t in state_dict.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        tensors[name] = t.clone().contiguous() if key in seen else t.contiguous()
        seen.add(key)
    save_file(tensors, str(path), metadata={"format": "pt"})


def save_checkpoint(output: str, step: int, hf_model, model_state: dict, tokenizer,
                    trainer_state: dict, info: dict, keep: int) -> Path:
    root = Path(output) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f"{TMP}step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    hf_model.config.save_pretrained(tmp)
    _save_weights(model_state, tmp / WEIGHTS)
    _test_pause(step)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / STATE)
    (tmp / STATE_JSON).write_text(json.dumps({"step": step, **info}, indent=2) + "\n")
    if final.exists():
        _discard(final)
    os.replace(tmp, final)
    for _, old in checkpoint_dirs(output)[:-keep]:
        _discard(old)
    return final


def verify_checkpoint(path: Path) -> None:
    """Fail early, naming the file, if a checkpoint's weights are damaged or do not fit
    its config.json (load_checkpoint reads the rest)."""
    try:
        check_model_files(path)
    except ValueError as exc:
        raise CheckpointError(f"--resume: {exc}") from None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(model state dict, trainer state, info) of a checkpoint, or one CheckpointError."""
    try:
        info = json.loads((path / STATE_JSON).read_text())
        model_state = load_file(str(path / WEIGHTS))
        trainer_state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        if not isinstance(trainer_state, dict) or "optimizer" not in trainer_state:
            raise ValueError("trainer_state.pt lacks the optimizer state")
    except Exception as exc:  # any failure here means the files are unusable
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"--resume: checkpoint {path} is corrupt or incomplete ({reason})") from None
    return model_state, trainer_state, info


def check_fits_model(path: Path, model_state: dict, hf_model) -> None:
    """The checkpoint's weights must fit the model being trained (finetune builds it from
    --model, which may differ from the run that wrote the checkpoint)."""
    found = {k: tuple(v.shape) for k, v in model_state.items()}
    problem = describe_mismatch(model_shapes(hf_model), found, hf_model.config.to_dict())
    if problem:
        raise CheckpointError(f"--resume: {path / WEIGHTS} does not fit the model being "
                              f"trained: {problem}")


def save_final(output: str, hf_model, model_state: dict, tokenizer) -> None:
    """Write the final model into --output, each file moved into place atomically and
    config.json last, so a directory with config.json always holds a complete model."""
    out = Path(output)
    tmp = out / f"{TMP}final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_model.config.save_pretrained(tmp)
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(tmp)
    _save_weights(model_state, tmp / WEIGHTS)
    tokenizer.save_pretrained(tmp)
    files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
    for f in files:
        os.replace(f, out / f.name)
    tmp.rmdir()
