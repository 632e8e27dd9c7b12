"""A/B timing of the two parts of the training step the speed-up changes, interleaved in
one process so both sides see the same machine load (a shared CPU makes whole-step runs
minutes apart incomparable):

  * the LM-head loss of the `code-finetuning` step (final layer + 2 early exits), forward
    and backward, unchunked vs chunked;
  * one AdamW step over the model's parameters, per-tensor vs fused.

    python -m benchmarks.train_speed_parts --model .cache/models/smollm2 --reps 3
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from training.early_exit_loss import head_ce
from training.models import load_model
from training.trainer import make_optimizer


def head_loss(model, hiddens, ids, chunk):
    """Sum of next-token CE over the given hidden states through the model's head."""
    return sum(head_ce(model, model.model.norm(h), ids, chunk) for h in hiddens)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--exits", type=int, default=3, help="head read-outs per step (final + early)")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    model, _ = load_model(args.model)
    weight = model.lm_head.weight
    torch.manual_seed(0)
    b, s, d = args.batch_size, args.seq_len, weight.shape[1]
    hiddens = [torch.randn(b, s, d, requires_grad=True) for _ in range(args.exits)]
    ids = torch.randint(0, weight.shape[0], (b, s))

    def loss_step(chunk):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = head_loss(model, hiddens, ids, chunk)
            loss.backward()
            weight.grad = None
        return run

    params = list(model.parameters())
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    optims = {fused: make_optimizer(params, 1e-5, 0.0, fused=fused) for fused in (False, True)}
    times = {"loss_unchunked": [], "loss_chunked": [], "adamw_plain": [], "adamw_fused": []}
    for _ in range(args.reps):  # interleaved A/B
        times["loss_unchunked"].append(timed(loss_step(0)))
        times["loss_chunked"].append(timed(loss_step(args.chunk)))
        times["adamw_plain"].append(timed(optims[False].step))
        times["adamw_fused"].append(timed(optims[True].step))
    out = {k: {"min_s": round(min(v), 3), "all_s": [round(t, 3) for t in v]}
           for k, v in times.items()}
    out["settings"] = {"batch_size": b, "seq_len": s, "exits": args.exits, "chunk": args.chunk,
                       "threads": torch.get_num_threads()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
