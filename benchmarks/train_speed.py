"""Training throughput of the LayerSkip step, side by side (CPU or GPU).

    python -m benchmarks.train_speed --model DIR [--side NAME=SETTINGS ...] [--steps 3]
    python -m benchmarks.train_speed --model DIR --parts [--reps 3]

Each side is one set of trainer settings with its own copy of the model and optimizer:
`chunk=N` (LM-head loss chunk, 0 = unchunked), `fused=0|1` (AdamW), `compile=0|1`
(compiled decoder layers), `compile_loss=0|1` (each loss chunk compiled), e.g. `--side before=chunk=0,fused=0 --side after=`. The sides
run exactly the trainer's optimizer step (recipe plan, layer-dropout masks, autocast,
LayerSkip loss, backward, clipping, AdamW) on the same batches and masks, alternated step
by step, so that a shared machine's load hits them alike; each reports tokens/s, seconds
per step and its losses (equal across sides up to bf16 rounding: the settings change speed,
not what is computed). One side (the default: the trainer's defaults) is a plain
throughput measurement; `--profile FILE` writes torch.profiler's table of one step of the
first side.

`--parts` times the two pieces those settings change, interleaved: the LM-head loss of a
step (forward + backward over --exits read-outs), unchunked vs chunked, and one AdamW step,
per-tensor vs fused.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import time

import torch

from benchmarks.prompts import training_files
from training.data import load_texts, pack
from training.early_exit_loss import head_ce
from training.errors import ConfigError
from training.layer_dropout import sample_keep_mask
from training.layerskip_model import DEFAULT_LOSS_CHUNK, LayerSkipLM
from training.models import load_model
from training.recipe import PRESETS, step_plan
from training.trainer import _dropout_generator, make_optimizer, single_step, use_bf16

SIDE_DEFAULTS = {"chunk": DEFAULT_LOSS_CHUNK, "fused": 1, "compile": 0, "compile_loss": 0}


def parse_side(text: str) -> tuple[str, dict]:
    """'NAME=key=value,key=value' -> (NAME, settings over SIDE_DEFAULTS)."""
    name, _, spec = text.partition("=")
    if not name:
        raise ConfigError(f"--side must be NAME=SETTINGS (e.g. after=chunk=1024,fused=1), got {text!r}")
    settings = dict(SIDE_DEFAULTS)
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in SIDE_DEFAULTS or not value.isdigit():
            raise ConfigError(f"--side {name}: settings are {', '.join(SIDE_DEFAULTS)} with integer "
                              f"values, got {item!r}")
        settings[key] = int(value)
    return name, settings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--side", action="append", default=[], metavar="NAME=SETTINGS")
    p.add_argument("--preset", default="code-finetuning", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, tracing)")
    p.add_argument("--total-steps", type=int, default=90, help="T the recipe's schedules assume")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--files", type=int, default=40, help="first N standard-library files")
    p.add_argument("--profile", metavar="FILE", help="write torch.profiler's table of one step")
    p.add_argument("--parts", action="store_true", help="time the loss and AdamW parts instead")
    p.add_argument("--exits", type=int, default=3, help="--parts: head read-outs per step")
    p.add_argument("--reps", type=int, default=3, help="--parts: interleaved repetitions")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    args.sides = [parse_side(s) for s in args.side] or [("default", dict(SIDE_DEFAULTS))]
    return args


def run_sides(args, hf_model, blocks: torch.Tensor) -> dict:
    recipe, b = PRESETS[args.preset], args.batch_size
    bf16 = use_bf16(args.bf16, torch.device("cpu"))
    sides = {}
    for name, s in args.sides:
        m = copy.deepcopy(hf_model).train()
        sides[name] = (LayerSkipLM(m, loss_chunk=s["chunk"], compile_layers=bool(s["compile"]),
                                   compile_loss=bool(s["compile_loss"])),
                       make_optimizer(m.parameters(), 1e-5, 0.0, fused=bool(s["fused"])))
    times = {name: [] for name in sides}
    losses = {name: [] for name in sides}

    def batch(i: int):
        plan = step_plan(recipe, i, args.total_steps, hf_model.config.num_hidden_layers)
        ids = blocks[(i * b) % max(1, len(blocks) - b):][:b]  # [b, s]
        keep = None
        if recipe.layer_dropout_max > 0:
            keep = sample_keep_mask(plan.drop_probs, len(ids), _dropout_generator(0, i, 0, 0))
        return ids, keep, plan.exit_weights

    for i in range(args.warmup + args.steps):
        ids, keep, weights = batch(i)
        for name, (model, opt) in sides.items():
            t0 = time.perf_counter()
            loss = single_step(model, opt, ids, keep, weights, bf16)
            if i >= args.warmup:
                times[name].append(round(time.perf_counter() - t0, 3))
                losses[name].append(round(loss, 5))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        model, opt = next(iter(sides.values()))
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            single_step(model, opt, *batch(0), bf16)
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    tokens = b * args.seq_len
    return {"bf16": bf16, "sides": {
        name: {"settings": dict(args.sides)[name], "s_per_step": round(sum(t) / len(t), 3),
               "tokens_per_s": round(tokens * len(t) / sum(t), 1), "step_times": t,
               "losses": losses[name]} for name, t in times.items()}}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_parts(args, model) -> dict:
    weight = model.lm_head.weight
    torch.manual_seed(0)
    b, s, d = args.batch_size, args.seq_len, weight.shape[1]
    hiddens = [torch.randn(b, s, d, requires_grad=True) for _ in range(args.exits)]  # [b, s, d] each
    ids = torch.randint(0, weight.shape[0], (b, s))

    def loss_step(chunk):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = sum(head_ce(model, model.model.norm(h), ids, chunk) for h in hiddens)
            loss.backward()
            weight.grad = None
        return run

    params = list(model.parameters())
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    optims = {fused: make_optimizer(params, 1e-5, 0.0, fused=fused) for fused in (False, True)}
    parts = {"loss_unchunked": loss_step(0), "loss_chunked": loss_step(DEFAULT_LOSS_CHUNK),
             "adamw_plain": optims[False].step, "adamw_fused": optims[True].step}
    times = {k: [] for k in parts}
    for _ in range(args.reps):  # interleaved A/B
        for k, fn in parts.items():
            times[k].append(_timed(fn))
    return {k: {"min_s": round(min(v), 3), "all_s": [round(t, 3) for t in v]} for k, v in times.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    hf_model, tokenizer = load_model(args.model)
    if args.parts:
        result = {"parts": run_parts(args, hf_model)}
    else:
        blocks = pack(load_texts([str(p) for p in training_files()[: args.files]]), tokenizer,
                      args.seq_len)  # [n, s]
        result = run_sides(args, hf_model, blocks)
    result.update(model=args.model, preset=args.preset, batch_size=args.batch_size,
                  seq_len=args.seq_len, threads=torch.get_num_threads(),
                  peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
