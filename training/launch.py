"""What finetune and pretrain share around the training loop: validate everything before
touching the output directory, load data, split off held-out data, then train."""
from __future__ import annotations

import argparse
import random
from typing import Callable

import torch

from . import checkpoint as ckpt
from .data import load_texts, pack, split_heldout
from .distributed import barrier, init_distributed, shutdown
from .recipe import recipe_from_args
from .trainer import config_from_args, train

# (texts, resume_checkpoint or None) -> (hf_model, tokenizer, extra metadata)
ModelFactory = Callable[[list[str], "ckpt.Path | None"], tuple]


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
        texts = load_texts(args.data)
        hf_model, tokenizer, extra = make_model(texts, latest)
        blocks = pack(texts, tokenizer, cfg.seq_len)  # [n, s]
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
              {**extra, "data_sequences": len(train_blocks)})
    finally:
        shutdown(env)
