"""Pretrain a Llama from scratch with the LayerSkip recipe.

    python -m training.pretrain --data PATH... --output DIR --layers N --hidden-size D \\
        --vocab-size V --steps N --seq-len T --batch-size B --seed S [recipe flags]
    python -m training.pretrain --tokens CORPUS_DIR --output DIR --layers N ... (no --vocab-size)

With --data, a byte-level BPE tokenizer with V entries is first trained on the data; with
--tokens (the output of python -m training.corpus) the corpus's tokenizer and ids are used
as they are. The default preset is `pretraining` (time-scaled layer dropout, rotational
early-exit curriculum)."""
from __future__ import annotations

import argparse

from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .cli import run_cli
from .errors import ConfigError
from .launch import run_training
from .models import build_llama
from .recipe import add_recipe_flags
from .tokenizer import MIN_VOCAB, train_bpe_tokenizer
from .trainer import add_training_flags


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_flags(p)
    g = p.add_argument_group("architecture (Llama)")
    g.add_argument("--layers", type=int, required=True, metavar="N")
    g.add_argument("--hidden-size", type=int, required=True, metavar="D")
    g.add_argument("--vocab-size", type=int, metavar="V",
                   help="tokenizer entries; required with --data, taken from the corpus with --tokens")
    g.add_argument("--heads", type=int, help="attention heads (default: D // 64, at least 1)")
    g.add_argument("--intermediate-size", type=int, help="MLP width (default: 4 * D)")
    g.add_argument("--max-position-embeddings", type=int, default=2048)
    g.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--seq-len", type=int, required=True, metavar="T")
    add_recipe_flags(p, default_preset="pretraining")
    return p.parse_args(argv)


def _check_architecture(args) -> int:
    heads = args.heads or max(1, args.hidden_size // 64)
    if args.layers < 1:
        raise ConfigError(f"--layers must be >= 1, got {args.layers}")
    if args.hidden_size < 1 or args.hidden_size % heads:
        raise ConfigError(f"--hidden-size must be a positive multiple of --heads ({heads}), got {args.hidden_size}")
    if (args.hidden_size // heads) % 2:
        raise ConfigError("--hidden-size / --heads must be even (rotary embeddings)")
    if args.vocab_size is None and not args.tokens:
        raise ConfigError("--vocab-size is required with --data")
    if args.vocab_size is not None and args.vocab_size < MIN_VOCAB:
        raise ConfigError(f"--vocab-size must be >= {MIN_VOCAB}, got {args.vocab_size}")
    if args.max_position_embeddings < args.seq_len:
        raise ConfigError("--max-position-embeddings must be >= --seq-len")
    return heads


def main(argv=None) -> None:
    args = parse_args(argv)
    heads = _check_architecture(args)

    def make_model(corpus, resume_from):
        if resume_from is not None:  # same tokenizer and architecture as the interrupted run
            tokenizer = AutoTokenizer.from_pretrained(resume_from)
            model = LlamaForCausalLM(LlamaConfig.from_pretrained(resume_from))
        else:
            if corpus.tokenizer is None:
                tokenizer, vocab = train_bpe_tokenizer(corpus.texts, args.vocab_size), args.vocab_size
            else:
                tokenizer, vocab = corpus.tokenizer, len(corpus.tokenizer)
                if args.vocab_size not in (None, vocab):
                    raise ConfigError(f"--vocab-size {args.vocab_size} differs from the --tokens "
                                      f"tokenizer's {vocab} entries (leave --vocab-size out)")
            model = build_llama(tokenizer, args.layers, args.hidden_size, vocab, heads,
                                args.intermediate_size or 4 * args.hidden_size,
                                args.max_position_embeddings, args.tie_embeddings)
        return model, tokenizer, {"mode": "pretrain"}

    run_training(args, make_model)


if __name__ == "__main__":
    run_cli(main)
