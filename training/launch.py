"""What finetune and pretrain share around the training loop: validate everything before
touching the output directory, load data (--data texts or a --tokens corpus), split off
held-out data, then train."""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Callable

import torch

from . import checkpoint as ckpt
from .data import load_texts, pack, pack_stream, split_heldout
from .distributed import barrier, init_distributed, shutdown
from .errors import DataError
from .recipe import recipe_from_args
from .token_corpus import load_token_corpus, read_manifest
from .trainer import config_from_args, train


@dataclass
class Corpus:
    """The training data: texts (--data) or a pre-tokenized stream with its tokenizer (--tokens)."""
    texts: list[str] | None = None
    tokenizer: object | None = None
    stream: torch.Tensor | None = None  # [N] ids, documents joined with EOS


# (corpus, resume_checkpoint or None) -> (hf_model, tokenizer, extra metadata)
ModelFactory = Callable[[Corpus, "ckpt.Path | None"], tuple]


def load_corpus(args: argparse.Namespace) -> Corpus:
    if getattr(args, "tokens", None):
        tokenizer, stream = load_token_corpus(args.tokens)
        return Corpus(tokenizer=tokenizer, stream=stream)
    return Corpus(texts=load_texts(args.data))


def pack_corpus(corpus: Corpus, tokenizer, seq_len: int) -> torch.Tensor:
    """[n, seq_len] blocks; a --tokens corpus must have been tokenized by the model's tokenizer."""
    if corpus.stream is None:
        return pack(corpus.texts, tokenizer, seq_len)
    if tokenizer.get_vocab() != corpus.tokenizer.get_vocab():
        raise DataError("--tokens: the corpus was tokenized with another tokenizer than the "
                        "model's (a --resume checkpoint or --model must use the corpus's tokenizer)")
    return pack_stream(corpus.stream, seq_len, "--tokens")


def corpus_meta(args: argparse.Namespace) -> dict:
    if not getattr(args, "tokens", None):
        return {}
    m = read_manifest(args.tokens)
    return {"tokens_corpus": {"tokens": m["tokens"], "tokens_sha256": m["tokens_sha256"]}}


def run_training(args: argparse.Namespace, make_model: ModelFactory) -> None:
    recipe = recipe_from_args(args)
    cfg = config_from_args(args)
    ckpt.prepare_output(cfg.output, cfg.overwrite, cfg.resume)
    env = init_distributed(args.device)
    try:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        latest = ckpt.checkpoint_dirs(cfg.output)[-1][1] if cfg.resume else None
        if latest is not None:
            ckpt.verify_checkpoint(latest)
            if env.is_main:
                ckpt.remove_stale_temps(cfg.output)
        corpus = load_corpus(args)
        hf_model, tokenizer, extra = make_model(corpus, latest)
        recipe.check_depth(hf_model.config.num_hidden_layers)
        blocks = pack_corpus(corpus, tokenizer, cfg.seq_len)  # [n, s]
        del corpus
        train_blocks, heldout = split_heldout(blocks, cfg.heldout_fraction)
        if cfg.overwrite and not cfg.resume and env.is_main:
            ckpt.clear_output(cfg.output)
        elif env.is_main:
            ckpt.Path(cfg.output).mkdir(parents=True, exist_ok=True)
        barrier(env)
        if env.is_main:
            print(f"data: {len(train_blocks)} training + {len(heldout)} held-out sequences "
                  f"of {cfg.seq_len} tokens; recipe: {recipe.to_dict()}")
        train(hf_model, tokenizer, train_blocks, heldout, recipe, cfg, env,
              {**extra, **corpus_meta(args), "data_sequences": len(train_blocks)})
    finally:
        shutdown(env)
