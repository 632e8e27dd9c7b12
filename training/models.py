"""Loading and building the transformers models the recipe wraps."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .errors import ModelError
from .integrity import check_model_files
from .layerskip_model import SUPPORTED_ARCHITECTURES


def check_model_dir(model_dir: str, flag: str = "--model") -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"{flag}: {model_dir} is not a model directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{flag}: cannot read {path}: {exc}") from None
    archs = config.get("architectures") or [config.get("model_type", "?")]
    if not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise ModelError(f"{flag}: unsupported architecture {'/'.join(map(str, archs))} "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if not any(Path(model_dir).glob("*.safetensors")):
        raise ModelError(f"{flag}: {model_dir} has no .safetensors weights (only safetensors are read)")
    try:
        check_model_files(Path(model_dir))
    except ValueError as exc:  # names the damaged or mismatched file
        raise ModelError(f"{flag}: {exc}") from None
    return config


def load_model(model_dir: str, flag: str = "--model", weights: bool = True):
    """Model (float32, safetensors only; None unless `weights`) and tokenizer from a local
    directory."""
    check_model_dir(model_dir, flag)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                     use_safetensors=True) if weights else None
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{flag}: cannot load {model_dir}: {str(exc).splitlines()[0]}") from None
    return model, tokenizer


def build_llama(tokenizer, num_layers: int, hidden_size: int, vocab_size: int, heads: int,
                intermediate_size: int, max_positions: int, tie_embeddings: bool) -> LlamaForCausalLM:
    """A freshly initialised Llama (initialisation follows the global torch seed)."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5)
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config)
