"""The training loop shared by finetune and pretrain: recipe step plans, gradient
accumulation, autocast, warm-up + cosine LR, progress bar, checkpoints, resume, final
save and calibration of the recommended exit_layer / num_speculative_tokens."""
from __future__ import annotations

import argparse
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from functools import partial

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)
from tqdm import tqdm

from . import checkpoint as ckpt
from .calibrate import head_layers, recommend
from .data import batch_indices
from .distributed import DistEnv, all_reduce_mean, barrier, wrap
from .errors import ConfigError
from .evaluate import per_exit_stats
from .hardware import native_bf16
from .layer_dropout import sample_keep_mask
from .layerskip_model import DEFAULT_LOSS_CHUNK, LayerSkipLM
from .metadata import write_layerskip_metadata
from .token_ranking import DRAFT_VOCAB_KEY, rank_tokens
from .recipe import Recipe, step_plan
from .schedule import lr_factor


@dataclass
class TrainConfig:
    output: str
    steps: int
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    bf16: bool | None = None   # None = auto: on where the CPU/GPU has native bf16
    fsdp: bool = False
    resume: bool = False
    overwrite: bool = False
    heldout_fraction: float = 0.05
    calibration_blocks: int = 64
    loss_chunk: int = DEFAULT_LOSS_CHUNK  # tokens per LM-head loss chunk; 0 = unchunked
    compile: bool = False  # torch.compile each decoder layer (dynamic batch) and loss chunk
    stop_after: int = 0        # testing aid: stop after this step as if interrupted
    progress: bool = True

    def validate(self) -> "TrainConfig":
        for flag, value, low in (("--steps", self.steps, 1), ("--batch-size", self.batch_size, 1),
                                 ("--seq-len", self.seq_len, 2), ("--grad-accum", self.grad_accum, 1),
                                 ("--warmup-steps", self.warmup_steps, 0),
                                 ("--save-every", self.save_every, 0),
                                 ("--keep-checkpoints", self.keep_checkpoints, 1),
                                 ("--loss-chunk", self.loss_chunk, 0)):
            if value < low:
                raise ConfigError(f"{flag} must be >= {low}, got {value}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"--heldout-fraction must be in (0, 1), got {self.heldout_fraction}")
        return self


def add_training_flags(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", metavar="PATH",
                     help="files, directories (.py .txt .md .rst .jsonl) or globs")
    src.add_argument("--tokens", metavar="DIR",
                     help="a pre-tokenized corpus (python -m training.corpus): its tokenizer and ids")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--steps", type=int, required=True, metavar="N", help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="checkpoint every N steps (0 = never)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on where the hardware supports bf16)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP under torchrun")
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="tail of the data kept for calibration")
    p.add_argument("--calibration-blocks", type=int, default=64)
    p.add_argument("--loss-chunk", type=int, default=DEFAULT_LOSS_CHUNK, metavar="N",
                   help="tokens per chunk of the LM-head cross entropy, so [N, vocab] logits "
                        "are the most held at once; 0 = one unchunked pass (same loss, "
                        f"more memory and time; default {DEFAULT_LOSS_CHUNK})")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer and each chunk of the LM-head loss "
                        "(same math; 1.8x per step on SmolLM2-135M on a 2-core CPU, ~30 s of tracing "
                        "first)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags of `add_training_flags` carry the config's field names (`--no-progress`
    is the one negated flag)."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**values, progress=not args.no_progress).validate()


def use_bf16(requested: bool | None, device: torch.device) -> bool:
    """bf16 autocast as asked, or, when not asked, where `device` computes it natively."""
    return native_bf16(device) if requested is None else requested


def make_optimizer(params, lr: float, weight_decay: float, fused: bool = True):
    """AdamW. fused=True runs the whole update as one kernel per parameter group instead
    of ~6 elementwise passes per tensor (same update up to float rounding); FSDP keeps the
    plain implementation, whose sharded parameters the fused kernel may not take."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def single_step(model, optimizer, ids, keep, exit_weights, bf16: bool,
                max_grad_norm: float = 1.0) -> float:
    """One optimizer step on one micro-batch, as `train` takes it, without accumulation, LR
    schedule or distribution: what throughput measurements of the real step call."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, keep, exit_weights)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _dropout_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """Layer-dropout randomness is a pure function of (seed, step, micro-batch, rank), so
    a resumed run draws exactly the masks the uninterrupted run would have."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 101 + rank)


def _full_state(wrapped, optimizer):
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(wrapped, optimizer, options=opts)
    # LayerSkipLM holds the transformers model as `.model`: strip that prefix.
    return {k.removeprefix("model."): v for k, v in model_sd.items()}, optim_sd


def train(hf_model, tokenizer, train_blocks: torch.Tensor, heldout: torch.Tensor,
          recipe: Recipe, cfg: TrainConfig, env: DistEnv, extra_meta: dict) -> None:
    hf_model.to(env.device)
    skipper = LayerSkipLM(hf_model, always_call_layers=cfg.fsdp and env.enabled,
                          loss_chunk=cfg.loss_chunk, compile_layers=cfg.compile,
                          compile_loss=cfg.compile)
    model = wrap(skipper, env, cfg.fsdp)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay,
                               fused=not (cfg.fsdp and env.enabled))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_ratio=cfg.min_lr_ratio))
    num_layers = skipper.num_layers
    start = 0
    if cfg.resume:
        step, path = ckpt.checkpoint_dirs(cfg.output)[-1]
        model_sd, state, info = ckpt.load_checkpoint(path)
        ckpt.check_fits_model(path, model_sd, hf_model)
        set_state_dict(model, optimizer, model_state_dict={f"model.{k}": v for k, v in model_sd.items()},
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.seed(info.get("seed", cfg.seed) + step)
        start = step
    bf16 = use_bf16(cfg.bf16, env.device)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * env.world_size
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               disable=not (cfg.progress and env.is_main), dynamic_ncols=True)
    info = {"seed": cfg.seed, "recipe": recipe.to_dict()}
    hf_model.train()
    for step in bar:
        t0 = time.perf_counter()
        plan = step_plan(recipe, step, cfg.steps, num_layers)
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            idx = batch_indices(len(train_blocks), cfg.seed, step * cfg.grad_accum + micro,
                                cfg.batch_size, env.world_size, env.rank)
            ids = train_blocks[idx].to(env.device)  # [b, s]
            keep = None
            if recipe.layer_dropout_max > 0:
                keep = sample_keep_mask(plan.drop_probs, len(ids),
                                        _dropout_generator(cfg.seed, step, micro, env.rank))  # [L, b]
            # DDP: all-reduce gradients only on the last micro-batch of the step.
            last_micro = micro == cfg.grad_accum - 1
            with model.no_sync() if hasattr(model, "no_sync") and not last_micro else nullcontext():
                with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = model(ids, keep, plan.exit_weights)
                (loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = all_reduce_mean(step_loss, env)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        tok_s=f"{tokens_per_step / (time.perf_counter() - t0):.0f}")
        done = step + 1
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            model_sd, optim_sd = _full_state(model, optimizer)
            if env.is_main:
                state = {"optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                         "torch_rng": torch.get_rng_state()}
                ckpt.save_checkpoint(cfg.output, done, hf_model, model_sd, tokenizer, state,
                                     {**info, "tokens": done * tokens_per_step}, cfg.keep_checkpoints)
            barrier(env)
        if cfg.stop_after and done >= cfg.stop_after:
            bar.close()
            return
    bar.close()
    model_sd, _ = _full_state(model, optimizer)
    if env.is_main:
        draft_vocab = rank_tokens(train_blocks, hf_model.config.vocab_size)
        finish(hf_model, model_sd, tokenizer, heldout, recipe, cfg,
               extra_meta, draft_vocab)
    barrier(env)


def finish(hf_model, model_sd: dict, tokenizer, heldout: torch.Tensor, recipe: Recipe,
           cfg: TrainConfig, extra_meta: dict, draft_vocab: list[int]) -> None:
    """Save the final model, then calibrate on held-out data (the trained weights, no
    dropout) and store the recommendation in config.json."""
    ckpt.save_final(cfg.output, hf_model, model_sd, tokenizer)
    from .models import load_model
    model, _ = load_model(cfg.output, "--output")
    stats = per_exit_stats(model, heldout[: cfg.calibration_blocks].cpu())
    rec = recommend([row["agreement"] for row in stats], head=head_layers(model.config))
    rec["calibration"].update(heldout_sequences=min(len(heldout), cfg.calibration_blocks),
                              accuracy=[round(r["accuracy"], 4) for r in stats],
                              loss=[round(r["loss"], 4) for r in stats])
    write_layerskip_metadata(cfg.output, {**rec, DRAFT_VOCAB_KEY: draft_vocab,
                                          "recipe": recipe.to_dict(),
                                          "training": {"steps": cfg.steps, "seq_len": cfg.seq_len,
                                                       "batch_size": cfg.batch_size, "seed": cfg.seed,
                                                       **extra_meta}})
    print(f"saved {cfg.output}: exit_layer={rec['exit_layer']} "
          f"num_speculative_tokens={rec['num_speculative_tokens']} "
          f"expected_speedup={rec['calibration']['best_expected_speedup']}")
