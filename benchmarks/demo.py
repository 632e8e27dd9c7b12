"""Demo: plain vLLM against LayerSkip on a few code prompts, side by side.

    python -m benchmarks.demo                 (what `make demo` runs)
    python -m benchmarks.demo --base smollm2  (SmolLM2-135M-Instruct, trained with the recipe)

Uses the LayerSkip code model shipped in the repository (models/layerskip-code-32m, see its
model card) when it is there: no training, about a minute. Otherwise, or with --model-dir /
--rebuild, builds a demo-size LayerSkip model with the training module into
.cache/models/demo (a few minutes on a laptop-class CPU, with a progress bar) and reuses it
after. Then completes held-out code prompts greedily with plain vLLM and with LayerSkip, and
prints the texts, whether they are identical, tokens/s and the speedup. LayerSkip runs twice
in one engine: as users get it (the adaptive switch drafts only where it measures drafting
faster; the demo says what it measured) and drafting on every step (the acceptance rate, and
the identity check over drafted tokens). Each figure is the median of --repeats runs.

--base smollm2 uses SmolLM2-135M-Instruct, imported from the GGUF in its PyPI wheel and
trained with the LayerSkip recipe: the build of `python -m benchmarks.reference --base
smollm2` (.cache/models/smollm2-layerskip) when there, else its own smaller build in
.cache/models/smollm2-demo (24 steps x 8 x 256 tokens: about 10 minutes on 2 CPU cores, see
benchmarks/reference_smollm2.py; --rebuild trains it again, never the reference build).
Exit layer and draft length come from the checkpoint unless --exit-layer /
--num-speculative-tokens are given (the 60-step reference build calibrated to exit 1, K 1,
as no exit agrees enough yet to pay for drafting; try --exit-layer 24
--num-speculative-tokens 2: identical text, 50% acceptance, 0.89x on 2 cores).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from benchmarks import reference_smollm2 as smol
from benchmarks.prompts import load_prompts, training_files
from benchmarks.machine import add_dtype_flag
from benchmarks.measure import cell_key
from benchmarks.runner import WorkerError, run_worker
from benchmarks.systems import read_config, resolve_spec, vllm_engine_kwargs

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models" / "layerskip-code-32m"
MODELS = Path(".cache") / "models"  # where benchmarks.reference builds too
DEMO_DIR = MODELS / "demo"
# ~3.5M parameters, 0.8M training tokens. Meant to fit in 10 minutes on 2 CPU cores; not
# yet timed on an idle machine (see the report) -- lower --steps if it does not.
DEMO_SHAPE = {"layers": 6, "hidden_size": 192, "vocab_size": 2048, "steps": 400,
              "seq_len": 128, "batch_size": 16}
# The LayerSkip engine's two timed runs, in the order they run: as users get it, then
# drafting on every step.
LAYERSKIP_MODES = ("adaptive", "always")
MODE_NAMES = {"adaptive": "adaptive (default)", "always": "drafting every step"}
TINY_ONLY = ("layers", "hidden_size", "vocab_size")  # --base smollm2 keeps SmolLM2's shape


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", choices=["shipped", "smollm2"], default="shipped",
                    help="shipped: the shipped model, else a tiny demo build (default); smollm2: "
                         "SmolLM2-135M-Instruct trained with the recipe (see above)")
    ap.add_argument("--model-dir", default=None,
                    help=f"default: the shipped model if present, else {DEMO_DIR} (built once); "
                         f"smollm2: {MODELS / smol.LAYERSKIP} if built, else {MODELS / smol.DEMO}")
    ap.add_argument("--rebuild", action="store_true", help="train the demo model again")
    g = ap.add_argument_group("demo model (used only when it is built)")
    for key, val in DEMO_SHAPE.items():
        also = "" if key in TINY_ONLY else f", smollm2 {smol.DEMO_SIZE[key]}"
        g.add_argument("--" + key.replace("_", "-"), type=int, help=f"default: {val}{also}")
    g.add_argument("--train-files", type=int, default=0,
                   help="train on the first N training-split files only (0 = all)")
    add_dtype_flag(ap)
    ap.add_argument("--num-prompts", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of the prompts per engine and mode; the median counts")
    ap.add_argument("--exit-layer", type=int, default=None, help="default: model metadata")
    ap.add_argument("--num-speculative-tokens", type=int, default=None)
    ap.add_argument("--compiled", action="store_true",
                    help="torch.compile the engines, as vLLM does by default: faster decoding, "
                         "but 1-2 minutes more start-up per engine (the demo's default is eager)")
    ap.add_argument("--in-process-engine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build-only", action="store_true", help="build or reuse the model, then stop")
    ap.add_argument("--timeout", type=float, default=900)
    return ap


def parse_args(argv=None):
    """The flags, with the demo-model sizes of the chosen --base filled in."""
    ap = build_parser()
    args = ap.parse_args(argv)
    sizes = DEMO_SHAPE
    if args.base == "smollm2":
        given = ["--" + k.replace("_", "-") for k in TINY_ONLY if getattr(args, k) is not None]
        if given:
            ap.error(f"{', '.join(given)}: --base smollm2 keeps SmolLM2-135M's shape")
        sizes = smol.DEMO_SIZE
    for key, val in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    return args


def model_ready(d: Path) -> bool:
    try:
        return bool(list(d.glob("*.safetensors"))) and "layerskip" in read_config(d)
    except (OSError, ValueError):
        return False


def pick_model_dir(model_dir: str | None, rebuild: bool, shipped: Path = SHIPPED_DIR,
                   build: Path = DEMO_DIR) -> Path:
    """--model-dir if given; else `shipped`, a finished model the demo never retrains (unless
    --rebuild); else the demo's own build."""
    if model_dir is not None:
        return Path(model_dir)
    return shipped if model_ready(shipped) and not rebuild else build


def model_dirs(base: str) -> tuple[Path, Path]:
    """(the finished model used as it is, the demo's own build) of a --base."""
    if base == "smollm2":  # the reference build is 30+ minutes of training: never redone here
        return MODELS / smol.LAYERSKIP, MODELS / smol.DEMO
    return SHIPPED_DIR, DEMO_DIR


def prepare_model(args) -> Path:
    """The model directory to run, built first when it must be."""
    ready, build = model_dirs(args.base)
    out = pick_model_dir(args.model_dir, args.rebuild, ready, build)
    if out == ready:
        what = ("the shipped model", "its README is the model card") if args.base == "shipped" \
            else ("the reference build", "python -m benchmarks.reference --base smollm2")
        print(f"Using {what[0]} in {out} ({what[1]}).")
    elif model_ready(out) and not args.rebuild:
        print(f"Reusing the demo model in {out} (--rebuild to train it again).")
    elif args.base == "smollm2":
        smol.build_demo(args, out, MODELS / smol.BASE)
    else:
        build_model(args, out)
    return out


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


def smollm2_header(cfg: dict) -> str:
    t = cfg.get("layerskip", {}).get("training", {})
    size = " x ".join(str(t.get(k, "?")) for k in ("batch_size", "seq_len"))
    return (f"SmolLM2-135M-Instruct, imported from GGUF, trained with the LayerSkip recipe for "
            f"{t.get('steps', '?')} steps ({size} tokens each)")


def model_len(out: Path, cfg: dict, prompts: list[str], max_tokens: int) -> int:
    """max_model_len: the longest prompt in this model's tokens plus max_tokens, rounded up to
    256 and at least the 1024 the demo always used, within the model's context."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    need = max(len(tok(p)["input_ids"]) for p in prompts) + max_tokens
    limit = cfg.get("max_position_embeddings") or need
    if need > limit:
        raise SystemExit(f"a prompt plus --max-tokens {max_tokens} is {need} tokens, more than "
                         f"this model's context ({limit}); lower --max-tokens")
    return min(limit, max(1024, -(-need // 256) * 256))


def _quote(text: str, mark: str) -> str:
    return textwrap.indent(text, mark, lambda line: True)  # blank lines keep their mark


def show(prompts, plain: list[str], skip: dict[str, list[str]]) -> dict[str, int]:
    """Print each prompt's tail and plain vLLM's completion, and LayerSkip's in each drafting
    mode where it differs. Returns, per mode, how many completions were identical."""
    same = dict.fromkeys(skip, 0)
    for i, (p, a) in enumerate(zip(prompts, plain)):
        tail = "\n".join(p.rstrip("\n").splitlines()[-4:])
        print(f"\n=== prompt {i + 1} (last lines) " + "=" * 40)
        print(_quote(tail, "  | "))
        print("--- vLLM " + "-" * 30)
        print(_quote(a, "  > "))
        for mode, texts in skip.items():
            if texts[i] == a:
                same[mode] += 1
                print(f"--- LayerSkip, {MODE_NAMES[mode]}: identical text")
            else:
                print(f"--- LayerSkip, {MODE_NAMES[mode]} (differs) " + "-" * 16)
                print(_quote(texts[i], "  > "))
    return same


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def summary(plain: dict, adaptive: dict, always: dict, same: dict[str, int], n: int) -> list[str]:
    """The closing table: tokens/s of plain vLLM and of LayerSkip in both modes, what the
    adaptive switch chose and why, acceptance while drafting, and the identity counts."""
    base = plain["tokens_per_s"]

    def row(name, c):
        return f"  {name:<31}: {c['tokens_per_s']:8.1f} tokens/s   {c['tokens_per_s'] / base:.2f}x"

    drafted = adaptive.get("num_drafts", 0) / adaptive["batch_size"] / len(adaptive["times_s"])
    steps = drafted + adaptive.get("plain_steps_per_repeat", 0)
    cost = adaptive.get("switch_seconds_per_token") or {}
    rate = always.get("acceptance_rate")
    if cost.get("drafting") and cost.get("plain"):
        verdict = "drafts" if cost["drafting"] <= cost["plain"] else "decodes plainly"
        why = (f"    the switch measured, per token: drafting {_ms(cost['drafting'])}, plain "
               f"{_ms(cost['plain'])} -> {verdict} at batch {adaptive['batch_size']}")
    else:
        why = "    the switch has not measured both modes yet (too few steps)"
    return ["=" * 68,
            row("plain vLLM", plain),
            row("LayerSkip, " + MODE_NAMES["adaptive"], adaptive),
            f"    drafted on {drafted:.0f} of {steps:.0f} engine steps per run",
            why,
            row("LayerSkip, " + MODE_NAMES["always"], always),
            f"    acceptance {'-' if rate is None else f'{rate:.0%}'} of drafted tokens, "
            f"{always.get('mean_accepted_length') or 0:.2f} tokens per verification",
            "  identical (greedy)             : "
            + ", ".join(f"{same[m]}/{n} {MODE_NAMES[m]}" for m in LAYERSKIP_MODES),
            "=" * 68]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = prepare_model(args)
    if args.build_only:
        return 0
    e, k = resolve_spec(out, args.exit_layer, args.num_speculative_tokens)
    cfg = read_config(out)
    if args.base == "smollm2":
        print(smollm2_header(cfg))
    print(f"Model: Llama, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}; "
          f"LayerSkip exit_layer={e}, num_speculative_tokens={k}; greedy, "
          f"{args.max_tokens} new tokens per prompt, {args.dtype}, "
          f"{'compiled' if args.compiled else 'eager (--compiled for vLLM default)'} engines.")
    prompts = load_prompts("code", args.num_prompts)
    max_len = model_len(out, cfg, prompts, args.max_tokens)
    cell = {"prompt_set": "code", "batch_size": 1, "temperature": 0.0, "prompts": prompts,
            "keep_texts": True}
    # LayerSkip runs twice in one engine life: as users get it (the adaptive switch decides
    # whether drafting pays here), then drafting on every step, so that the identity check
    # and the acceptance always cover drafted and verified tokens.
    cells = {"vllm": [cell], "layerskip": [{**cell, "drafting": mode} for mode in LAYERSKIP_MODES]}
    res = {}
    from tqdm import tqdm
    for system in tqdm(["vllm", "layerskip"], desc="engines", unit="engine"):
        engine = vllm_engine_kwargs(system, out.resolve(), e, k, dtype=args.dtype,
                                    max_model_len=max_len, max_num_seqs=1,
                                    enforce_eager=not args.compiled)
        spec = {"kind": "vllm", "engine": engine, "cells": cells[system],
                "max_tokens": args.max_tokens, "repeats": args.repeats, "warmup": 1, "seed": 0,
                "in_process": args.in_process_engine}
        try:
            res[system] = run_worker(spec, DEMO_DIR.parent / "demo-logs", f"demo-{system}",
                                     args.timeout)
        except WorkerError as err:
            print(f"\n{system} failed:\n{err}", file=sys.stderr)
            return 1
    plain = res["vllm"]["texts"][cell_key(cell)]
    skip = {c["drafting"]: res["layerskip"]["texts"][cell_key(c)] for c in cells["layerskip"]}
    same = show(prompts, plain, skip)
    adaptive, always = res["layerskip"]["cells"]
    print("\n" + "\n".join(summary(res["vllm"]["cells"][0], adaptive, always, same, len(prompts))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
