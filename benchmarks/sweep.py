"""Sweep LayerSkip's exit_layer x num_speculative_tokens (and optionally the draft head's
vocabulary subset and the confidence threshold) and name the fastest setting.

    python -m benchmarks.sweep --model DIR [--exit-layers 2,3,4] [--num-speculative-tokens 2,3,4,6]
        [--draft-vocab-sizes 0,8192] [--confidence-thresholds 0,0.5] [--batch-size 1] [--write]

Plain vLLM runs once as the reference; every grid point is one LayerSkip engine on the same
prompts (greedy, code prompts by default). Writes a JSON, a Markdown table and a heatmap PNG;
``--write`` stores the best setting in the checkpoint's LayerSkip metadata.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import report
from benchmarks.report import point_label
from benchmarks.prompts import PROMPT_SETS
from benchmarks.runner import WorkerError, default_work_dir, run_worker
from benchmarks.systems import num_layers, write_truncated_copy
from benchmarks.throughput import _int_list, add_engine_args, check_common, make_cells, vllm_spec

SWEEP_SYSTEMS = ("layerskip", "vllm-draft-truncated")
# Grid dimensions beyond (E, K): LayerSkip setting -> the value that means "off".
EXTRA_SETTINGS = {"draft_vocab_size": 0, "draft_confidence_threshold": 0.0}


def _number_list(flag, kind, low, high):
    def parse(text):
        try:
            vals = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            vals = []
        if not vals or any(not low <= v <= high for v in vals):
            raise argparse.ArgumentTypeError(
                f"{flag}: comma-separated numbers in [{low}, {high}], got {text!r}")
        return vals
    return parse


def default_exit_layers(L: int) -> list[int]:
    return sorted({max(1, round(L * f)) for f in (1 / 6, 1 / 4, 1 / 3, 1 / 2)} - {L})


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("--exit-layers", type=_int_list("--exit-layers"), default=None,
                    help="default: about L/6, L/4, L/3, L/2")
    ap.add_argument("--num-speculative-tokens", type=_int_list("--num-speculative-tokens"),
                    default=[2, 3, 4, 6])
    ap.add_argument("--draft-vocab-sizes", type=_number_list("--draft-vocab-sizes", int, 0, 1 << 24),
                    default=[0], help="draft head over the N most frequent ids; 0 = full (default)")
    ap.add_argument("--confidence-thresholds",
                    type=_number_list("--confidence-thresholds", float, 0.0, 0.99), default=[0.0],
                    help="stop a request's draft below this probability; 0 = fixed K (default)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--prompt-set", choices=PROMPT_SETS, default="code")
    ap.add_argument("--system", choices=SWEEP_SYSTEMS, default="layerskip",
                    help="what to sweep (vllm-draft-truncated: the stock early-exit draft)")
    ap.add_argument("--write", action="store_true",
                    help="store the best exit_layer / num_speculative_tokens in the checkpoint")
    ap.add_argument("--json", default=None, help="default: <work dir>/sweep.json")
    ap.add_argument("--plot", default=None, help="default: JSON path with .png")
    return ap


def main(argv=None) -> int:
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    args.fixed_drafting = True  # comparing settings: every grid point drafts every step
    check_common(args)
    L = num_layers(args.model)
    exits = args.exit_layers or default_exit_layers(L)
    bad = [e for e in exits if not 1 <= e < L]
    if bad:
        raise SystemExit(f"--exit-layers: each must be between 1 and {L - 1} for this {L}-layer model, got {bad}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    work = Path(args.work_dir) if args.work_dir else default_work_dir(Path(args.model).name)
    model = Path(args.model).resolve()
    cells = make_cells(args, [args.batch_size], [args.temperature], [args.prompt_set])
    grid_pts = [(e, k, {"draft_vocab_size": v, "draft_confidence_threshold": t})
                for e in exits for k in args.num_speculative_tokens
                for v in args.draft_vocab_sizes for t in args.confidence_thresholds]
    if args.system != "layerskip" and len(grid_pts) > len(exits) * len(args.num_speculative_tokens):
        raise SystemExit("--draft-vocab-sizes / --confidence-thresholds are LayerSkip settings: "
                         "use them with --system layerskip")
    grid, errors = [], []
    with tqdm(total=len(grid_pts) + 1, desc="sweep", unit="engine") as bar:
        bar.set_postfix_str("vllm")
        try:
            base = run_worker(vllm_spec(args, "vllm", model, cells, 1, 1, None, args.batch_size),
                              work, "sweep-vllm", args.timeout)["cells"][0]
        except WorkerError as err:
            raise SystemExit(f"plain vLLM failed, nothing to compare against:\n{err}")
        bar.update()
        for e, k, extra in grid_pts:
            point = {"exit_layer": e, "num_speculative_tokens": k, **extra}
            name = point_label(point).replace(" ", "-").lower() + f"-k{k}"
            bar.set_postfix_str(f"{point_label(point)} K={k}")
            trunc = (write_truncated_copy(model, e, work / f"truncated-e{e}")
                     if args.system == "vllm-draft-truncated" else None)
            settings = {key: v for key, v in extra.items() if v != EXTRA_SETTINGS[key]}
            try:
                c = run_worker(vllm_spec(args, args.system, model, cells, e, k, trunc,
                                         args.batch_size, settings or None), work,
                               f"sweep-{name}", args.timeout)["cells"][0]
                point.update(tokens_per_s=round(c["tokens_per_s"], 2),
                             speedup=round(c["tokens_per_s"] / base["tokens_per_s"], 3),
                             acceptance_rate=c["acceptance_rate"],
                             mean_accepted_length=c["mean_accepted_length"])
            except WorkerError as err:
                point["error"] = str(err).splitlines()[0]
                errors.append(point)
                bar.write(f"{point_label(point)} K={k}: FAILED\n{err}")
            grid.append(point)
            bar.update()
    done = [g for g in grid if g.get("speedup") is not None]
    best = max(done, key=lambda g: g["speedup"]) if done else None
    out = {"system": args.system, "baseline_tokens_per_s": round(base["tokens_per_s"], 2),
           "batch_size": args.batch_size, "temperature": args.temperature,
           "prompt_set": args.prompt_set, "max_tokens": args.max_tokens, "dtype": args.dtype,
           "num_layers": L, "grid": grid,
           "best": {k: best[k] for k in ("exit_layer", "num_speculative_tokens", *EXTRA_SETTINGS,
                                         "speedup")}
           if best else None}
    json_path = Path(args.json) if args.json else work / "sweep.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(report.sweep_table(grid))
    png = Path(args.plot) if args.plot else json_path.with_suffix(".png")
    report.sweep_heatmap(grid, png, f"{args.system} speedup vs vllm (batch {args.batch_size}, "
                                    f"T={args.temperature:g}, {args.prompt_set})")
    print(report.sweep_table(grid))
    if best is None:
        print("no grid point ran; nothing to recommend", file=sys.stderr)
        return 1
    print(f"best: exit_layer={best['exit_layer']} num_speculative_tokens="
          f"{best['num_speculative_tokens']} ({best['speedup']:.2f}x vs vllm)")
    if args.write:
        if args.system != "layerskip":
            raise SystemExit("--write stores a LayerSkip setting: use it with --system layerskip")
        from training.metadata import write_layerskip_metadata

        write_layerskip_metadata(model, {"exit_layer": best["exit_layer"],
                                         "num_speculative_tokens": best["num_speculative_tokens"],
                                         **{key: best[key] for key in EXTRA_SETTINGS
                                            if best[key] != EXTRA_SETTINGS[key]},
                                         "sweep": {"speedup": best["speedup"],
                                                   "batch_size": args.batch_size,
                                                   "temperature": args.temperature}})
        print(f"wrote the best setting to {model / 'config.json'} (\"layerskip\")")
    print(f"wrote {json_path}, {png}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
