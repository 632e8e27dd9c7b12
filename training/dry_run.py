"""Training throughput of candidate Llama shapes on a --tokens corpus: plan a run before
spending it.

    python -m training.dry_run --tokens DIR --shape 16x384x1024 --shape 20x384x704 \\
        [--batch-size 16 --seq-len 512 --steps 4 --preset pretraining]

A shape is LAYERSxHIDDENxMLP (embeddings tied, heads = HIDDEN // 64). Each runs the real
training step of `training.pretrain` (layer dropout, early-exit loss, AdamW, bf16 autocast
where the hardware has it) on blocks of the corpus, with the recipe's plan sampled across
a run of --plan-steps, after one warm-up step. Prints one JSON line per shape: parameters
(unique, tied embeddings once), bf16 safetensors MiB, seconds per step and tokens/s, and
the process's CPU seconds per step (on a shared machine, wall time / CPU time shows how
much of the step other processes took)."""
from __future__ import annotations

import argparse
import json
import time

import torch

from .cli import run_cli
from .data import pack_stream
from .errors import ConfigError
from .layer_dropout import sample_keep_mask
from .layerskip_model import LayerSkipLM
from .models import build_llama
from .recipe import PRESETS, step_plan
from .token_corpus import load_token_corpus
from .trainer import make_optimizer, single_step, use_bf16


def parse_shape(spec: str) -> tuple[int, int, int]:
    try:
        layers, hidden, mlp = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--shape must be LAYERSxHIDDENxMLP (e.g. 16x384x1024), got {spec!r}") from None
    if min(layers, hidden, mlp) < 1 or hidden % 64:
        raise ConfigError(f"--shape {spec}: sizes must be positive and HIDDEN a multiple of 64")
    return layers, hidden, mlp


def unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def time_shape(tokenizer, blocks: torch.Tensor, shape: tuple[int, int, int], args) -> dict:
    layers, hidden, mlp = shape
    torch.manual_seed(0)
    model = build_llama(tokenizer, layers, hidden, len(tokenizer), hidden // 64, mlp,
                        max(2048, args.seq_len), tie_embeddings=True)
    skipper = LayerSkipLM(model.train())
    opt = make_optimizer(skipper.parameters(), lr=3e-4, weight_decay=0.0)
    recipe = PRESETS[args.preset]
    bf16 = use_bf16(None, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    times, cpu = [], []
    for i in range(args.steps + 1):  # step 0 warms up
        step = (i * args.plan_steps) // (args.steps + 1)
        plan = step_plan(recipe, step, args.plan_steps, layers)
        ids = blocks[torch.randint(0, len(blocks), (args.batch_size,), generator=gen)]  # [b, s]
        keep = sample_keep_mask(plan.drop_probs, len(ids), gen) if recipe.layer_dropout_max > 0 else None
        t0, c0 = time.perf_counter(), time.process_time()
        single_step(skipper, opt, ids, keep, plan.exit_weights, bf16)
        if i:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    n = unique_params(model)
    sec = sum(times) / len(times)
    return {"shape": f"{layers}x{hidden}x{mlp}", "params": n, "bf16_mib": round(2 * n / 2**20, 1),
            "bf16_autocast": bf16, "batch": args.batch_size, "seq_len": args.seq_len,
            "s_per_step": round(sec, 3), "tokens_per_s": round(args.batch_size * args.seq_len / sec),
            "cpu_s_per_step": round(sum(cpu) / len(cpu), 3), "threads": torch.get_num_threads(),
            "step_times": [round(t, 3) for t in times]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.dry_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", required=True, metavar="DIR")
    p.add_argument("--shape", action="append", required=True, metavar="LxDxF")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=4, help="timed steps per shape (after one warm-up)")
    p.add_argument("--plan-steps", type=int, default=10000, help="run length the recipe plan is sampled from")
    p.add_argument("--preset", default="pretraining", choices=list(PRESETS))
    args = p.parse_args(argv)
    shapes = [parse_shape(s) for s in args.shape]
    tokenizer, stream = load_token_corpus(args.tokens)
    blocks = pack_stream(stream[: 256 * args.seq_len], args.seq_len, "--tokens")  # [n, s]
    for shape in shapes:
        print(json.dumps(time_shape(tokenizer, blocks, shape, args)), flush=True)


if __name__ == "__main__":
    run_cli(main)
