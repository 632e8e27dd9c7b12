"""A tiny random-initialised Llama checkpoint for quick-path tests and smoke runs.

Not a trained model: it exercises the benchmark machinery (engines, metrics, reports) in
seconds without the training module. Byte-level BPE tokenizer trained on a few training-split
files, Llama weights from `LlamaForCausalLM` random init, a "layerskip" metadata block.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.prompts import training_files


def build_tokenizer(out_dir: Path, vocab_size: int, num_files: int = 40):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    files = [str(p) for p in training_files()[:num_files]]
    tok.train(files, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir, layers: int = 4, hidden: int = 64, vocab_size: int = 2048,
                     exit_layer: int = 1, num_speculative_tokens: int = 2, seed: int = 0,
                     max_position_embeddings: int = 2048) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, vocab_size)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 32), max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    conf_path = out / "config.json"
    conf = json.loads(conf_path.read_text())
    conf["layerskip"] = {"exit_layer": exit_layer, "num_speculative_tokens": num_speculative_tokens,
                         "recipe": None, "calibration": None}
    conf_path.write_text(json.dumps(conf, indent=2) + "\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--exit-layer", type=int, default=1)
    a = ap.parse_args(argv)
    print(build_tiny_model(a.output, a.layers, a.hidden_size, a.vocab_size, a.exit_layer))


if __name__ == "__main__":
    main()
