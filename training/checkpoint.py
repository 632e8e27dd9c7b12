"""Output directory safety, periodic checkpoints and resume.

Layout of --output:
    config.json, model.safetensors, tokenizer files      final model (written last)
    checkpoints/step-000100/                             periodic checkpoints:
        config.json, model.safetensors, tokenizer files    the model so far
        trainer_state.pt                                   optimizer, scheduler, RNG (weights_only)
        trainer_state.json                                 step, tokens seen

Every save goes to a hidden temp directory first and is renamed into place, so an
interrupted save never leaves a half-written checkpoint or model behind."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, OutputError

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"


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
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    hf_model.config.save_pretrained(tmp)
    _save_weights(model_state, tmp / WEIGHTS)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / STATE)
    (tmp / STATE_JSON).write_text(json.dumps({"step": step, **info}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def save_final(output: str, hf_model, model_state: dict, tokenizer) -> None:
    """Write the final model into --output, each file moved into place atomically and
    config.json last, so a directory with config.json always holds a complete model."""
    out = Path(output)
    tmp = out / f".tmp-final-{os.getpid()}"
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
