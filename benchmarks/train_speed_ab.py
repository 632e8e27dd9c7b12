"""Whole trainer steps, old vs new settings, alternated step by step in one process so both
see the same machine load: "before" = unchunked LM-head loss + per-tensor AdamW, "after"
= chunked loss + fused AdamW. Each side has its own copy of the model and optimizer and
runs the same batches and dropout masks.

    python -m benchmarks.train_speed_ab --model .cache/models/smollm2 --steps 3
"""
from __future__ import annotations

import argparse
import copy
import json
import time

from benchmarks.prompts import training_files
from training.data import load_texts, pack
from training.layer_dropout import sample_keep_mask
from training.layerskip_model import DEFAULT_LOSS_CHUNK, LayerSkipLM
from training.models import load_model
from training.recipe import PRESETS, step_plan
from training.trainer import _dropout_generator, make_optimizer, single_step


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (after 1 warm-up)")
    args = p.parse_args(argv)
    hf_model, tokenizer = load_model(args.model)
    blocks = pack(load_texts([str(f) for f in training_files()[:40]]), tokenizer, args.seq_len)
    sides = {}
    for name, chunk, fused in (("before", 0, False), ("after", DEFAULT_LOSS_CHUNK, True)):
        m = copy.deepcopy(hf_model).train()
        sides[name] = (LayerSkipLM(m, loss_chunk=chunk),
                       make_optimizer(m.parameters(), 1e-5, 0.0, fused=fused))
    recipe, b = PRESETS["code-finetuning"], args.batch_size
    times = {name: [] for name in sides}
    losses = {name: [] for name in sides}
    for i in range(args.steps + 1):
        plan = step_plan(recipe, i, 90, hf_model.config.num_hidden_layers)
        ids = blocks[(i * b) % (len(blocks) - b):][:b]  # [b, s]
        keep = sample_keep_mask(plan.drop_probs, b, _dropout_generator(0, i, 0, 0))
        for name, (model, opt) in sides.items():
            t0 = time.perf_counter()
            loss = single_step(model, opt, ids, keep, plan.exit_weights, bf16=True)
            if i:  # step 0 warms up
                times[name].append(round(time.perf_counter() - t0, 2))
                losses[name].append(round(loss, 5))
    tokens = b * args.seq_len
    out = {name: {"s_per_step": round(sum(t) / len(t), 2), "step_times": t,
                  "tokens_per_s": round(tokens * len(t) / sum(t), 1), "losses": losses[name]}
           for name, t in times.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
