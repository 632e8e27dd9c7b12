"""Training throughput of the LayerSkip step on a local checkpoint (CPU or GPU).

    python -m benchmarks.train_speed --model .cache/models/smollm2 --steps 6 --warmup 2

Runs exactly the trainer's optimizer step (recipe step plan, layer-dropout masks,
autocast, LayerSkip loss, backward, clipping, AdamW) on packed standard-library code and
reports tokens/s, seconds per step and peak resident memory. `--profile FILE` writes the
operator table of one step from torch.profiler."""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from benchmarks.prompts import training_files
from training.data import load_texts, pack
from training.layer_dropout import sample_keep_mask
from training.layerskip_model import LayerSkipLM
from training.models import load_model
from training.recipe import PRESETS, step_plan
from training.trainer import _dropout_generator, make_optimizer, single_step, use_bf16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--preset", default="code-finetuning", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, caches)")
    p.add_argument("--total-steps", type=int, default=90, help="T the recipe's schedules assume")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="tokens per early-exit loss chunk (0 = unchunked; default: trainer's)")
    p.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--files", type=int, default=40, help="first N standard-library files")
    p.add_argument("--profile", metavar="FILE", help="write torch.profiler's table of one step")
    p.add_argument("--json", metavar="FILE")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    hf_model, tokenizer = load_model(args.model)
    blocks = pack(load_texts([str(p) for p in training_files()[: args.files]]), tokenizer,
                  args.seq_len)  # [n, s]
    need = (args.warmup + args.steps) * args.batch_size
    blocks = blocks.repeat((need + len(blocks) - 1) // len(blocks), 1)[:need]
    kwargs = {} if args.loss_chunk is None else {"loss_chunk": args.loss_chunk}
    model = LayerSkipLM(hf_model, **kwargs)
    optimizer = make_optimizer(model.parameters(), 1e-5, 0.0, fused=args.fused_adam)
    recipe = PRESETS[args.preset]
    bf16 = use_bf16(args.bf16, torch.device("cpu"))
    hf_model.train()

    def step(i: int) -> float:
        plan = step_plan(recipe, i, args.total_steps, model.num_layers)
        ids = blocks[i * args.batch_size:(i + 1) * args.batch_size]  # [b, s]
        keep = None
        if recipe.layer_dropout_max > 0:
            keep = sample_keep_mask(plan.drop_probs, len(ids), _dropout_generator(0, i, 0, 0))
        return single_step(model, optimizer, ids, keep, plan.exit_weights, bf16)

    for i in range(args.warmup):
        step(i)
    times, losses = [], []
    for i in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        losses.append(step(i))
        times.append(time.perf_counter() - t0)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step(args.warmup)
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            f.write(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=30,
                max_shapes_column_width=90))
    tokens = args.batch_size * args.seq_len
    per_step = sum(times) / len(times)
    result = {"model": args.model, "preset": args.preset, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "bf16": bf16, "loss_chunk": getattr(model, "loss_chunk", 0),
              "fused_adam": args.fused_adam, "threads": torch.get_num_threads(),
              "steps": args.steps, "s_per_step": round(per_step, 3),
              "tokens_per_s": round(tokens / per_step, 1),
              "step_times": [round(t, 3) for t in times], "losses": [round(l, 5) for l in losses],
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
