"""What buys the most exit agreement per CPU-minute on SmolLM2-135M (issue 9, item 2).

    python -m benchmarks.recipe_study [--variants paper,window,...] [--steps 60]

Every variant fine-tunes the untouched import (`.cache/models/smollm2`, built by
`python -m benchmarks.reference --base smollm2`) with the same steps, batch, seed and
schedule, changing one thing against the paper's recipe (preset continual-pretraining on
standard-library code, lr 1e-4; window-no-dropout changes one thing against window):

    paper      the preset as published: every exit, rotational curriculum
    window     the early-exit loss trains exits 16..26 only (the range a draft would use)
    window-no-dropout  window, and no layer dropout (what the dropout costs the last layer)
    distill    data: the model's own samples of training-split prompts (training.self_distill)
    mix        data: code and those samples, half and half
    low-lr     lr 5e-5

Then `training.evaluate` on the held-out split (loss, top-1 accuracy and agreement with the
model's own last layer at every exit) and `training.completions` (distinct-4-gram share of
greedy completions). Output under --output (default .cache/models/study): one model
directory per variant (reused when built), study.json, study.md and study.png (agreement
by exit, one curve per variant). Nothing else may run beside it: the training minutes are
part of the result.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.prompts import heldout_files
from benchmarks.reference import data_files, is_built, schedule_flags

CODE, DISTILL, MIX = "code", "distill", "mix"
VARIANTS: dict[str, tuple[str, list[str]]] = {   # name -> (data, extra training flags)
    "paper": (CODE, []),
    "window": (CODE, ["--min-exit-layer", "16", "--max-exit-layer", "26"]),
    "window-no-dropout": (CODE, ["--min-exit-layer", "16", "--max-exit-layer", "26",
                                 "--layer-dropout-max", "0"]),
    "distill": (DISTILL, []),
    "mix": (MIX, []),
    "low-lr": (CODE, ["--lr", "5e-5"]),
}
REPORT_EXITS = (18, 20, 22, 24, 26, 28)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.recipe_study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=".cache/models/smollm2", help="the untouched import")
    ap.add_argument("--output", default=".cache/models/study")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-blocks", type=int, default=32)
    ap.add_argument("--train-files", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    return args


def run(cmd: list[str], what: str) -> float:
    """Minutes `cmd` took; exits with one line naming `what` if it failed."""
    t0 = time.time()
    if subprocess.call(cmd) != 0:
        raise SystemExit(f"error: {what} failed: {' '.join(cmd[:4])} ...")
    return (time.time() - t0) / 60


def distill_data(args, root: Path) -> tuple[Path, float | None]:
    """Self-distillation samples, as many sequences as the training steps consume."""
    path = root / "self-distill.jsonl"
    if path.is_file():
        return path, None
    minutes = run([sys.executable, "-m", "training.self_distill", "--model", args.base,
                   "--data", *data_files(args), "--output", str(path),
                   "--num-sequences", str(args.steps * args.batch_size),
                   "--new-tokens", str(args.seq_len - 64), "--batch-size", "32"],
                  "training.self_distill")
    return path, minutes


def same_size(files: list[str], like: Path) -> list[str]:
    """The first of `files` whose sizes add up to about the size of `like` (bytes stand in
    for tokens: both are code, in one tokenizer)."""
    budget, picked = like.stat().st_size, []
    for f in files:
        if budget <= 0:
            break
        picked.append(f)
        budget -= Path(f).stat().st_size
    return picked


def train_variant(args, name: str, out: Path, data: list[str]) -> float | None:
    """Minutes the training took (kept beside the model, so a cached variant reports them)."""
    stamp = out.parent / f"{name}-train-minutes.json"
    if is_built(out):
        print(f"{out}: cached", flush=True)
        return json.loads(stamp.read_text()) if stamp.is_file() else None
    kind, flags = VARIANTS[name]
    cmd = [sys.executable, "-m", "training.finetune", "--model", args.base, "--data", *data,
           "--output", str(out), "--overwrite", "--preset", "continual-pretraining",
           *schedule_flags(args), "--calibration-blocks", "8", *flags]
    if args.no_progress:
        cmd.append("--no-progress")
    print(f"training {name}: data {kind}, flags {' '.join(flags) or '(paper)'}", flush=True)
    minutes = run(cmd, f"training {name}")   # the later flag wins: --lr in `flags` overrides
    stamp.write_text(json.dumps(round(minutes, 2)))
    return minutes


def measure(model: Path, root: Path, name: str, eval_blocks: int) -> dict:
    """Per-exit figures and the greedy completions' distinct-4-gram share of one model."""
    held = [str(p) for p in heldout_files()]
    per_exit, comp = root / f"{name}-per-exit.json", root / f"{name}-completions.json"
    if not per_exit.is_file():
        run([sys.executable, "-m", "training.evaluate", "--model", str(model), "--data", *held,
             "--json", str(per_exit), "--max-blocks", str(eval_blocks), "--seq-len", "256"],
            f"evaluating {name}")
    if not comp.is_file():
        run([sys.executable, "-m", "training.completions", "--model", str(model), "--data", *held,
             "--json", str(comp)], f"completions of {name}")
    layers = json.loads(per_exit.read_text())["layers"]
    return {"layers": layers, "distinct_4gram_share": json.loads(comp.read_text())[0]["distinct_4gram_share"]}


def summarise(untouched: dict, results: dict[str, dict]) -> list[dict]:
    """One row per variant: last-layer loss against the untouched import, agreement and its
    ratio to the untouched model's at each reported exit."""
    base = {r["layer"]: r for r in untouched["layers"]}
    last = max(base)
    rows = []
    for name, res in results.items():
        by = {r["layer"]: r for r in res["layers"]}
        rows.append({
            "variant": name,
            "last_loss": by[last]["loss"],
            "last_loss_change": by[last]["loss"] / base[last]["loss"] - 1,
            "last_accuracy": by[last]["accuracy"],
            "agreement": {e: by[e]["agreement"] for e in REPORT_EXITS},
            "agreement_ratio": {e: by[e]["agreement"] / base[e]["agreement"] for e in REPORT_EXITS},
            "distinct_4gram_share": res["distinct_4gram_share"],
            "train_minutes": res.get("train_minutes"),
        })
    return rows


def table(rows: list[dict]) -> str:
    head = ("| variant | last-layer loss (change) | last acc | "
            + " | ".join(f"agree @{e}" for e in REPORT_EXITS) + " | distinct 4-grams | train min |")
    lines = [head, "|" + "---|" * (5 + len(REPORT_EXITS))]
    for r in rows:
        agree = " | ".join(f"{r['agreement'][e]:.1%} ({r['agreement_ratio'][e]:.2f}x)"
                           for e in REPORT_EXITS)
        mins = "-" if r["train_minutes"] is None else f"{r['train_minutes']:.1f}"
        lines.append(f"| {r['variant']} | {r['last_loss']:.3f} ({r['last_loss_change']:+.1%}) | "
                     f"{r['last_accuracy']:.1%} | {agree} | {r['distinct_4gram_share']:.3f} | {mins} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in results.items():
        rows = [r for r in res["layers"] if r["layer"] >= 12]
        ax.plot([r["layer"] for r in rows], [r["agreement"] for r in rows],
                "k--" if name == "untouched" else "-", marker=".", label=name)
    ax.set(xlabel="exit layer", ylabel="agreement with the last layer",
           title="SmolLM2-135M: exit agreement per recipe variant (held-out code)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    if not is_built(Path(args.base), layerskip=False):
        raise SystemExit(f"error: --base {args.base} is not built; run "
                         f"`python -m benchmarks.reference --base smollm2` first")
    names = args.variants.split(",")
    code = data_files(args)
    distill, distill_minutes = (distill_data(args, root) if any(
        VARIANTS[n][0] != CODE for n in names) else (None, None))
    results = {"untouched": measure(Path(args.base), root, "untouched", args.eval_blocks)}
    for name in names:
        kind = VARIANTS[name][0]
        data = {CODE: code, DISTILL: [str(distill)],
                MIX: [*same_size(code, distill), str(distill)]}[kind]
        minutes = train_variant(args, name, root / name, data)
        results[name] = measure(root / name, root, name, args.eval_blocks)
        results[name]["train_minutes"] = minutes
    rows = summarise(results["untouched"], results)
    report = {"settings": vars(args), "self_distill_minutes": distill_minutes, "rows": rows}
    (root / "study.json").write_text(json.dumps(report, indent=2) + "\n")
    (root / "study.md").write_text(table(rows) + "\n")
    plot(results, root / "study.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
