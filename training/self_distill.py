"""Self-distillation data: the model's own sampled continuations of training-split prompts.

    python -m training.self_distill --model DIR --data PATH... --output FILE.jsonl
        [--num-sequences 480] [--prompt-tokens 64] [--new-tokens 192] [--temperature 1.0]

Why: the early-exit loss teaches exit l to predict the next token of the data. A draft is
judged by something else, agreement with the model's own last layer. On text the model
sampled itself (temperature 1, no top-k/top-p) the next token is drawn from the last layer's
distribution, so the cross entropy of an exit on it is, in expectation, the cross entropy
against the last layer: the exits learn to agree, and the last layer is trained towards
what it already predicts instead of towards another corpus. Mix it with real data by
passing both to `--data` of training.finetune (.jsonl records with a "text" field).

Prompts are windows of --prompt-tokens ids at a seeded random offset of each --data file
(files in a seeded random order, cycled until --num-sequences): pass the training split
only, so that no held-out text is completed. All prompts have the same length, so batches
need no padding. The output is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch

from .cli import run_cli
from .data import collect_files, read_documents
from .errors import ConfigError, DataError
from .models import load_model


def prompt_windows(texts: list[str], tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` windows of `length` ids, one per document in a seeded order, cycling."""
    rng = random.Random(seed)
    docs = [ids for ids in (tokenizer(t).input_ids for t in texts) if len(ids) >= length]
    if not docs:
        raise DataError(f"--data: no document has --prompt-tokens {length} tokens")
    rng.shuffle(docs)
    windows = []
    while len(windows) < count:
        ids = docs[len(windows) % len(docs)]
        start = rng.randrange(len(ids) - length + 1)
        windows.append(ids[start : start + length])
    return windows


@torch.no_grad()
def sample_continuations(model, prompts: list[list[int]], new_tokens: int, temperature: float,
                         batch_size: int, eos_id: int | None, progress: bool = True):
    """Yields (prompt, continuation) id lists; a continuation ends at the first EOS."""
    from tqdm import tqdm

    bar = tqdm(total=len(prompts), desc="self-distill", unit="seq", disable=not progress)
    for i in range(0, len(prompts), batch_size):
        batch = torch.tensor(prompts[i : i + batch_size])      # [b, p], no padding needed
        out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, pad_token_id=eos_id)
        for prompt, row in zip(batch.tolist(), out[:, batch.shape[1]:].tolist()):
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            yield prompt, row
        bar.update(len(batch))
    bar.close()


def sample_with_vllm(model_dir: str, prompts: list[list[int]], new_tokens: int,
                     temperature: float, seed: int, dtype: str):
    """The same samples from a plain vLLM engine: continuous batching over every prompt,
    several times the throughput of transformers' generate on a CPU. (vLLM stops at EOS and
    does not return it.)"""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, dtype=dtype, seed=seed, max_model_len=len(prompts[0]) + new_tokens,
              max_num_seqs=64, enforce_eager=True, kv_cache_memory_bytes=1 << 30)
    params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, max_tokens=new_tokens,
                            seed=seed)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    for prompt, out in zip(prompts, outs):
        yield prompt, list(out.outputs[0].token_ids)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.self_distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--data", nargs="+", required=True, help="training-split files for the prompts")
    p.add_argument("--output", required=True, metavar="FILE.jsonl")
    p.add_argument("--num-sequences", type=int, default=480)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=192)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                   help="vllm: much faster on many prompts (an engine process; ~30 s to start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    for flag in ("num_sequences", "prompt_tokens", "new_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.temperature > 0:
        raise ConfigError(f"--temperature must be > 0 (sampling), got {args.temperature}")
    out = Path(args.output)
    if out.suffix != ".jsonl":
        raise ConfigError(f"--output must end in .jsonl (training --data reads it), got {out}")
    model, tokenizer = load_model(args.model, weights=args.engine == "transformers")
    texts = list(read_documents(collect_files(args.data)))
    prompts = prompt_windows(texts, tokenizer, args.num_sequences, args.prompt_tokens, args.seed)
    if args.engine == "vllm":
        samples = sample_with_vllm(args.model, prompts, args.new_tokens, args.temperature,
                                   args.seed, args.dtype)
    else:
        torch.manual_seed(args.seed)
        samples = sample_continuations(model.to(getattr(torch, args.dtype)).eval(), prompts,
                                       args.new_tokens, args.temperature, args.batch_size,
                                       tokenizer.eos_token_id, not args.no_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    tokens = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for prompt, row in samples:
                tokens += len(row)
                f.write(json.dumps({"text": tokenizer.decode(prompt + row)}) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{out}: {len(prompts)} sequences, {tokens} sampled tokens "
          f"(+ {len(prompts) * args.prompt_tokens} prompt tokens)")


if __name__ == "__main__":
    run_cli(main)
