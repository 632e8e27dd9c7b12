"""Demo: plain vLLM against LayerSkip on a few code prompts, side by side.

    python -m benchmarks.demo            (what `make demo` runs)

Uses the LayerSkip code model shipped in the repository (models/layerskip-code-32m, see its
model card) when it is there: no training, about a minute. Otherwise, or with --model-dir /
--rebuild, builds a demo-size LayerSkip model with the training module into
.cache/models/demo (a few minutes on a laptop-class CPU, with a progress bar) and reuses it
after. Then completes held-out code prompts greedily with plain vLLM and with LayerSkip, prints both
texts, whether they are identical, tokens/s, the speedup and the acceptance rate.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from benchmarks.prompts import load_prompts, training_files
from benchmarks.runner import WorkerError, run_worker
from benchmarks.systems import read_config, resolve_spec, vllm_engine_kwargs

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models" / "layerskip-code-32m"
DEMO_DIR = Path(".cache") / "models" / "demo"
# ~3.5M parameters, 0.8M training tokens. Meant to fit in 10 minutes on 2 CPU cores; not
# yet timed on an idle machine (see the report) -- lower --steps if it does not.
DEMO_SHAPE = {"layers": 6, "hidden_size": 192, "vocab_size": 2048, "steps": 400,
              "seq_len": 128, "batch_size": 16}


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None,
                    help=f"default: the shipped model if present, else {DEMO_DIR} (built once)")
    ap.add_argument("--rebuild", action="store_true", help="train the demo model again")
    g = ap.add_argument_group("demo model (used only when it is built)")
    for key, val in DEMO_SHAPE.items():
        g.add_argument("--" + key.replace("_", "-"), type=int, default=val)
    g.add_argument("--train-files", type=int, default=0,
                   help="train on the first N training-split files only (0 = all)")
    ap.add_argument("--num-prompts", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--exit-layer", type=int, default=None, help="default: model metadata")
    ap.add_argument("--num-speculative-tokens", type=int, default=None)
    ap.add_argument("--compiled", action="store_true",
                    help="torch.compile the engines, as vLLM does by default: faster decoding, "
                         "but 1-2 minutes more start-up per engine (the demo's default is eager)")
    ap.add_argument("--in-process-engine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build-only", action="store_true", help="build or reuse the model, then stop")
    ap.add_argument("--timeout", type=float, default=900)
    return ap


def model_ready(d: Path) -> bool:
    try:
        return bool(list(d.glob("*.safetensors"))) and "layerskip" in read_config(d)
    except (OSError, ValueError):
        return False


def pick_model_dir(model_dir: str | None, rebuild: bool, shipped: Path = SHIPPED_DIR) -> Path:
    """--model-dir if given; else the shipped model (unless --rebuild); else the demo build."""
    if model_dir is not None:
        return Path(model_dir)
    return shipped if model_ready(shipped) and not rebuild else DEMO_DIR


def build_model(args, out: Path) -> None:
    files = [str(p) for p in training_files()]
    if args.train_files:
        files = files[: args.train_files]
    cmd = [sys.executable, "-m", "training.pretrain", "--data", *files, "--output", str(out),
           "--layers", str(args.layers), "--hidden-size", str(args.hidden_size),
           "--vocab-size", str(args.vocab_size), "--steps", str(args.steps),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--seed", "0",
           "--lr", "1e-3", "--warmup-steps", str(max(1, args.steps // 20)), "--overwrite"]
    print(f"Building the demo model in {out} ({args.layers} layers, hidden {args.hidden_size}, "
          f"{args.steps} steps on {len(files)} Python source files)...", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd)
    if rc != 0 or not model_ready(out):
        raise SystemExit(f"training the demo model failed (exit {rc}); command: "
                         f"python -m training.pretrain ... --output {out}")
    print(f"Demo model built in {time.time() - t0:.0f} s.\n")


def show(prompts, plain, skip) -> int:
    same = 0
    for i, (p, a, b) in enumerate(zip(prompts, plain, skip), 1):
        tail = "\n".join(p.rstrip("\n").splitlines()[-4:])
        print(f"\n=== prompt {i} (last lines) " + "=" * 40)
        print(textwrap.indent(tail, "  | "))
        print("--- vLLM " + "-" * 30)
        print(textwrap.indent(a, "  > "))
        if a == b:
            same += 1
            print("--- LayerSkip: identical text")
        else:
            print("--- LayerSkip (differs) " + "-" * 16)
            print(textwrap.indent(b, "  > "))
    return same


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = pick_model_dir(args.model_dir, args.rebuild)
    if out == SHIPPED_DIR:
        print(f"Using the shipped model in {out} (its README is the model card).")
    elif args.rebuild or not model_ready(out):
        build_model(args, out)
    else:
        print(f"Reusing the demo model in {out} (--rebuild to train it again).")
    if args.build_only:
        return 0
    e, k = resolve_spec(out, args.exit_layer, args.num_speculative_tokens)
    cfg = read_config(out)
    print(f"Model: Llama, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}; "
          f"LayerSkip exit_layer={e}, num_speculative_tokens={k}; greedy, "
          f"{args.max_tokens} new tokens per prompt, bfloat16, "
          f"{'compiled' if args.compiled else 'eager (--compiled for vLLM default)'} engines.")
    prompts = load_prompts("code", args.num_prompts)
    cell = {"prompt_set": "code", "batch_size": 1, "temperature": 0.0, "prompts": prompts,
            "keep_texts": True}
    res = {}
    from tqdm import tqdm
    for system in tqdm(["vllm", "layerskip"], desc="engines", unit="engine"):
        engine = vllm_engine_kwargs(system, out.resolve(), e, k, dtype="bfloat16",
                                    max_model_len=1024, max_num_seqs=1,
                                    enforce_eager=not args.compiled)
        spec = {"kind": "vllm", "engine": engine, "cells": [cell], "max_tokens": args.max_tokens,
                "repeats": 1, "warmup": 1, "seed": 0, "in_process": args.in_process_engine}
        try:
            res[system] = run_worker(spec, DEMO_DIR.parent / "demo-logs", f"demo-{system}",
                                     args.timeout)
        except WorkerError as err:
            print(f"\n{system} failed:\n{err}", file=sys.stderr)
            return 1
    plain, skip = (res[s]["texts"]["code/0.0/1"] for s in ("vllm", "layerskip"))
    same = show(prompts, plain, skip)
    a, b = (res[s]["cells"][0] for s in ("vllm", "layerskip"))
    rate = b.get("acceptance_rate")
    print("\n" + "=" * 68)
    print(f"  plain vLLM : {a['tokens_per_s']:8.1f} tokens/s")
    print(f"  LayerSkip  : {b['tokens_per_s']:8.1f} tokens/s   speedup {b['tokens_per_s'] / a['tokens_per_s']:.2f}x")
    print(f"  acceptance : {'-' if rate is None else f'{rate:.0%}'} of drafted tokens"
          f" (mean accepted length {b.get('mean_accepted_length') or 0:.2f} tokens per step)")
    print(f"  identical  : {same}/{len(prompts)} completions (greedy)")
    print("=" * 68)
    return 0


if __name__ == "__main__":
    sys.exit(main())
