"""Token ids ranked by frequency: the vocabulary subset the draft's LM head covers.

    python -m training.token_ranking --model DIR --data PATH... [--max-ids N]

Tokenizes the data with the checkpoint's own tokenizer and stores the ids that occur, most
frequent first, in config.json as `layerskip.draft_vocab`, where the vLLM plugin's
`draft_vocab_size` setting reads them. `training.pretrain` / `training.finetune` write the
ranking of their training data themselves; this command is for checkpoints trained
elsewhere (or to rank on data closer to what will be served).
"""
from __future__ import annotations

import argparse

import torch

from .cli import run_cli
from .data import load_texts
from .errors import ConfigError
from .metadata import write_layerskip_metadata

DRAFT_VOCAB_KEY = "draft_vocab"  # the plugin's settings.DRAFT_VOCAB_KEY


def rank_tokens(token_ids: torch.Tensor, vocab_size: int, max_ids: int | None = None) -> list[int]:
    """Ids that occur in token_ids (any shape), by count descending, ties by id."""
    counts = torch.bincount(token_ids.flatten(), minlength=vocab_size)[:vocab_size]  # [V]
    order = torch.argsort(-counts, stable=True)  # ties keep id order
    ranked = order[: int((counts > 0).sum())].tolist()
    return ranked[:max_ids] if max_ids else ranked


def coverage(token_ids: torch.Tensor, ranking: list[int], sizes: list[int]) -> dict[int, float]:
    """Share of the tokens that the top-n ids cover, for each n in sizes."""
    position = {t: i for i, t in enumerate(ranking)}
    ranks = torch.tensor([position.get(int(t), len(ranking)) for t in token_ids.flatten()])
    return {n: float((ranks < n).float().mean()) for n in sizes}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.token_ranking", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, tokenizer)")
    ap.add_argument("--data", nargs="+", required=True, help="files, directories or globs")
    ap.add_argument("--max-ids", type=int, default=None, help="keep at most this many ids")
    args = ap.parse_args(argv)
    if args.max_ids is not None and args.max_ids < 1:
        raise ConfigError(f"--max-ids must be >= 1, got {args.max_ids}")

    from transformers import AutoConfig, AutoTokenizer

    from .models import check_model_dir

    check_model_dir(args.model)
    vocab_size = AutoConfig.from_pretrained(args.model).vocab_size
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = [t for doc in tokenizer(load_texts(args.data), add_special_tokens=False)["input_ids"]
           for t in doc]
    tokens = torch.tensor(ids, dtype=torch.int64)
    ranking = rank_tokens(tokens, vocab_size, args.max_ids)
    write_layerskip_metadata(args.model, {DRAFT_VOCAB_KEY: ranking})
    sizes = [n for n in (1024, 4096, 8192, 16384) if n < len(ranking)]
    shares = ", ".join(f"top {n}: {share:.1%}" for n, share in coverage(tokens, ranking, sizes).items())
    print(f"{args.model}: ranked {len(ranking)} of {vocab_size} token ids over {len(ids)} tokens"
          + (f" ({shares} of them)" if shares else ""))


if __name__ == "__main__":
    run_cli(main)
