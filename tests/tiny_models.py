"""Tiny checkpoints built on the spot: a byte-level BPE trained on the standard library's
source, and random-init Llama / Qwen2 decoders with peaked next-token distributions (so
greedy argmax margins dwarf float32 rounding and sampled tests have power)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

VOCAB_SIZE = 512


def stdlib_files(limit: int = 60) -> list[str]:
    root = Path(os.__file__).parent
    return sorted(str(p) for p in root.glob("*.py"))[:limit]


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(stdlib_files(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)


def write_model(
    out: Path,
    tokenizer_dir: Path,
    arch: str = "llama",
    num_layers: int = 4,
    seed: int = 0,
    init_std: float = 0.6,
    exit_layer: int | None = None,
    upper_scale: float = 1.0,
) -> Path:
    """Random-init decoder. With `exit_layer=E`, the output projections of layers >= E are
    scaled by `upper_scale`: 0 makes them add nothing to the residual stream (exiting at E
    then equals the full model), values in (0, 1) give partial early-exit agreement."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    config, cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = cls(config(**common)).eval()
    if exit_layer is not None:
        with torch.no_grad():
            for layer in model.model.layers[exit_layer:]:
                layer.self_attn.o_proj.weight.mul_(upper_scale)
                layer.mlp.down_proj.weight.mul_(upper_scale)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


if __name__ == "__main__":  # python tests/tiny_models.py OUT_DIR [arch]
    base = Path(sys.argv[1])
    write_tokenizer(base / "tokenizer")
    write_model(base / "model", base / "tokenizer", arch=sys.argv[2] if len(sys.argv) > 2 else "llama")
