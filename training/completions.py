"""Greedy completions of held-out prompts and how repetitive they are.

    python -m training.completions --model DIR [DIR ...] --data PATH... --json OUT
        [--num-prompts 8] [--prompt-tokens 64] [--max-new-tokens 64]

Each prompt is the first --prompt-tokens tokens of one --data file (files in sorted order).
Every model completes every prompt greedily (transformers' `generate`, float32), so a model
trained with the recipe can be set beside the checkpoint it started from. The repetition
figure is the share of distinct 4-grams among a completion's 4-grams (1.0: no 4-gram
repeats; a completion that loops over one line scores near 0), averaged over the prompts.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .cli import run_cli
from .data import collect_files, read_documents
from .errors import ConfigError
from .models import load_model


def distinct_ngram_share(ids: list[int], n: int = 4) -> float:
    """|distinct n-grams| / |n-grams| of a sequence (1.0 when it has no n-gram at all)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def prompts_from(files: list[str], tokenizer, num_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """The first `prompt_tokens` ids of each file long enough, up to `num_prompts` of them."""
    prompts = []
    for text in read_documents(collect_files(files)):
        ids = tokenizer(text).input_ids
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == num_prompts:
            break
    return prompts


@torch.no_grad()
def complete(model_dir: str, files: list[str], num_prompts: int, prompt_tokens: int,
             max_new_tokens: int) -> dict:
    model, tokenizer = load_model(model_dir)
    model.eval()
    rows = []
    for prompt in prompts_from(files, tokenizer, num_prompts, prompt_tokens):
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
        ids = out[0, len(prompt):].tolist()
        rows.append({"prompt": tokenizer.decode(prompt), "completion": tokenizer.decode(ids),
                     "distinct_4gram_share": round(distinct_ngram_share(ids), 4)})
    if not rows:
        raise ConfigError(f"--data: no file has {prompt_tokens} tokens for a prompt")
    mean = sum(r["distinct_4gram_share"] for r in rows) / len(rows)
    return {"model": model_dir, "distinct_4gram_share": round(mean, 4), "completions": rows}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.completions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, metavar="DIR")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--json", required=True, metavar="OUT")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    for flag in ("num_prompts", "prompt_tokens", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    reports = [complete(d, args.data, args.num_prompts, args.prompt_tokens, args.max_new_tokens)
               for d in args.model]
    Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")
    for r in reports:
        print(f"{r['model']}: distinct 4-gram share {r['distinct_4gram_share']:.3f} "
              f"over {len(r['completions'])} greedy completions")


if __name__ == "__main__":
    run_cli(main)
