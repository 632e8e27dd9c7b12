"""Throughput of vLLM, vLLM's stock speculation, LayerSkip and transformers, in one run.

    python -m benchmarks.throughput --model DIR [--exit-layer E] [--num-speculative-tokens K]
        --batch-sizes 1,8,32 --json OUT

Every system decodes the same held-out prompts (code prefixes and natural-language
docstring/comment openings) for the same number of new tokens (``ignore_eos``), in the same
dtype, each in its own process (one engine at a time), warmed up, median of ``--repeats``.
With ``--rounds N`` the whole list of systems runs N times, in reverse order every other
round, and each figure is the median over rounds of what one round measured (a speedup is
taken within its round): on a shared machine a slow stretch then hits one round of a
system, not the system.
Writes OUT (JSON), OUT.md (Markdown table) and OUT.png (chart) unless told otherwise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks import ideal, report
from benchmarks.machine import add_dtype_flag, machine_info
from benchmarks.prompts import PROMPT_SETS, load_prompts
from benchmarks.runner import WorkerError, default_work_dir, run_worker
from benchmarks.systems import (ALL_SYSTEMS, HF_SYSTEMS, add_spec_flags, drafting_mode,
                                hf_generate_kwargs, num_layers, parse_systems, resolve_spec,
                                vllm_engine_kwargs, write_truncated_copy)

DRAFT_COST_RUN = "draft-step"   # plain vLLM on the truncated copy: the cost of a draft step


def _int_list(flag):
    def parse(text):
        try:
            vals = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            vals = []
        if not vals or any(v < 1 for v in vals):
            raise argparse.ArgumentTypeError(f"{flag}: comma-separated positive integers, got {text!r}")
        return vals
    return parse


def _float_list(text):
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"--temperatures: comma-separated numbers >= 0, got {text!r}")
    return vals


def _sets(text):
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals or any(v not in PROMPT_SETS for v in vals):
        raise argparse.ArgumentTypeError(f"--prompt-sets: allowed {', '.join(PROMPT_SETS)}, got {text!r}")
    return vals


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """Flags shared with the sweep."""
    ap.add_argument("--model", required=True, help="checkpoint directory (HF format)")
    ap.add_argument("--max-tokens", type=int, default=128, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up passes per cell")
    ap.add_argument("--prompts-per-cell", type=int, default=4,
                    help="prompts per measurement at small batch (batch 1 runs them in turn)")
    ap.add_argument("--prompt-chars", type=int, default=600, help="prompt length in characters")
    add_dtype_flag(ap)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size per engine")
    ap.add_argument("--enforce-eager", action="store_true", help="no torch.compile (faster start)")
    ap.add_argument("--fixed-drafting", action="store_true",
                    help="layerskip drafts every step (adaptive_drafting off)")
    ap.add_argument("--in-process-engine", action="store_true",
                    help="engine core in the worker process (faster start; for smoke tests)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per system")
    ap.add_argument("--work-dir", default=None, help="truncated copies, specs and logs")
    ap.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)
    add_spec_flags(ap)
    ap.add_argument("--batch-sizes", type=_int_list("--batch-sizes"), default=[1, 8, 32])
    ap.add_argument("--temperatures", type=_float_list, default=[0.0, 0.8])
    ap.add_argument("--prompt-sets", type=_sets, default=list(PROMPT_SETS))
    ap.add_argument("--systems", type=parse_systems, default=list(ALL_SYSTEMS),
                    help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every system this many times, order reversed every other round")
    ap.add_argument("--json", required=True, help="output JSON path")
    ap.add_argument("--markdown", default=None, help="default: JSON path with .md")
    ap.add_argument("--plot", default=None, help="default: JSON path with .png")
    return ap


def check_common(args) -> None:
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise SystemExit(f"--model: {model} is not a checkpoint directory (no config.json)")
    for flag, v in (("--max-tokens", args.max_tokens), ("--repeats", args.repeats),
                    ("--prompts-per-cell", args.prompts_per_cell)):
        if v < 1:
            raise SystemExit(f"{flag} must be >= 1, got {v}")


def make_cells(args, batch_sizes, temperatures, prompt_sets, keep_texts=False) -> list[dict]:
    cells = []
    for ps in prompt_sets:
        for b in batch_sizes:
            prompts = load_prompts(ps, max(b, args.prompts_per_cell), args.prompt_chars)
            for t in temperatures:
                cells.append({"prompt_set": ps, "batch_size": b, "temperature": t,
                              "prompts": prompts, "keep_texts": keep_texts})
    return cells


def vllm_spec(args, system, model, cells, e, k, truncated, max_num_seqs,
              layerskip_settings: dict | None = None) -> dict:
    engine = vllm_engine_kwargs(system, model, e, k, dtype=args.dtype,
                                max_model_len=args.max_model_len, max_num_seqs=max_num_seqs,
                                truncated_dir=truncated, enforce_eager=args.enforce_eager,
                                seed=args.seed, kv_cache_gib=args.kv_cache_gib,
                                adaptive_drafting=not args.fixed_drafting,
                                layerskip_settings=layerskip_settings)
    return {"kind": "vllm", "engine": engine, "drafting": drafting_mode(system),
            "cells": cells, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
            "in_process": args.in_process_engine}


def hf_spec(args, system, cells, e, k) -> dict:
    return {"kind": "hf", "model": str(args.model), "dtype": args.dtype,
            "generate": hf_generate_kwargs(system, e, k), "cells": cells,
            "max_tokens": args.max_tokens, "repeats": args.repeats, "warmup": args.warmup,
            "seed": args.seed}


def run_systems(args, systems, cells, e, k, work: Path, progress) -> tuple[dict, list]:
    """{system: worker result} for every system that ran, and the errors of those that did not."""
    model = Path(args.model).resolve()
    max_b = max(c["batch_size"] for c in cells)
    truncated = None
    if "vllm-draft-truncated" in systems or DRAFT_COST_RUN in systems:
        truncated = write_truncated_copy(model, e, work / f"truncated-e{e}")
    results, errors = {}, []
    for system in systems:
        progress.set_postfix_str(system)
        if system == DRAFT_COST_RUN:
            spec = vllm_spec(args, "vllm", truncated, draft_cost_cells(cells), e, k, None, max_b)
        elif system in HF_SYSTEMS:
            hf_cells = [c for c in cells if c["batch_size"] == 1]
            if not hf_cells:
                progress.write(f"{system}: skipped (transformers systems run at batch 1 only)")
                progress.update()
                continue
            spec = hf_spec(args, system, hf_cells, e, k)
        else:
            spec = vllm_spec(args, system, model, cells, e, k, truncated, max_b)
        t0 = time.time()
        try:
            results[system] = run_worker(spec, work, system, args.timeout)
            progress.write(f"{system}: done in {time.time() - t0:.0f} s")
        except WorkerError as err:
            errors.append({"system": system, "error": str(err).splitlines()[0]})
            progress.write(f"{system}: FAILED\n{err}")
        progress.update()
    return results, errors


def draft_costs(results: dict) -> dict:
    """{batch_size: draft-step time / full-step time}: the plain run on the truncated copy
    against the plain run on the full model, on the same cells."""
    if "vllm" not in results or DRAFT_COST_RUN not in results:
        return {}
    full = {(c["prompt_set"], c["temperature"], c["batch_size"]): c["tokens_per_s"]
            for c in results["vllm"]["cells"]}
    out = {}
    for c in results[DRAFT_COST_RUN]["cells"]:
        ref = full.get((c["prompt_set"], c["temperature"], c["batch_size"]))
        if ref:
            out[c["batch_size"]] = ref / c["tokens_per_s"]
    return out


def draft_cost_cells(cells: list[dict]) -> list[dict]:
    """Cells for the draft-cost run: one prompt set (code if measured), lowest temperature."""
    sets = [c["prompt_set"] for c in cells]
    ps = "code" if "code" in sets else sets[0]
    t = min(c["temperature"] for c in cells)
    return [c for c in cells if c["prompt_set"] == ps and c["temperature"] == t]


# The project's targets (greedy, code prompts; issues 11 and 12): a system's speed over
# another's at one batch size, and the ratio it must reach (">" strictly above).
TARGETS = (
    ("layerskip", "vllm", 1, ">=", 1.5),
    ("layerskip", "vllm-draft-truncated", 1, ">=", 1.25),
    ("layerskip", "vllm-ngram", 1, ">", 1.0),
    ("layerskip", "hf-early-exit", 1, ">", 1.0),
    ("layerskip", "vllm", 32, ">=", 1.0),
    *(("layerskip-off", "vllm", b, ">=", 0.98) for b in (1, 8, 32)),
)


def check_targets(rows: list[dict]) -> dict:
    """Each target the rows allow a verdict on: {label: {"value": ratio, "ok": bool}}.

    The ratio is of the two rows' speedups over plain vLLM, each taken within its round (the
    rows' tokens/s are medians over rounds, so their ratio would mix rounds that ran at
    different machine speeds)."""
    speedups = {(r["system"], r["batch_size"]): r["speedup"] for r in rows
                if r["temperature"] == 0 and r.get("prompt_set") == "code"}
    out = {}
    for system, against, b, op, bound in TARGETS:
        mine, theirs = speedups.get((system, b)), speedups.get((against, b))
        if mine and theirs:
            ratio = mine / theirs
            label = f"batch{b}_{system}_vs_{against}{op}{bound:g}".replace("-", "_")
            out[label] = {"value": round(ratio, 3), "ok": ratio > bound if op == ">" else ratio >= bound}
    return out


def build_rows(results: dict, costs: dict, e: int, k: int, L: int,
               adaptive: bool = False) -> list[dict]:
    """With `adaptive`, LayerSkip's ideal is the better of drafting's ideal and plain
    decoding (1.0), since its switch may choose either."""
    base = {(c["prompt_set"], c["temperature"], c["batch_size"]): c["tokens_per_s"]
            for c in results.get("vllm", {}).get("cells", [])}
    rows = []
    for system, res in results.items():
        if system == DRAFT_COST_RUN:
            continue
        for c in res["cells"]:
            key = (c["prompt_set"], c["temperature"], c["batch_size"])
            ref = base.get(key)
            if system in ("vllm-draft-truncated", "layerskip"):
                cost = costs.get(c["batch_size"])
            elif system == "vllm-ngram":
                cost = 0.0   # a table look-up: free next to a forward pass
            elif system == "hf-early-exit":
                cost = res.get("draft_cost")
            else:
                cost = None
            rows.append({
                "system": system, "prompt_set": c["prompt_set"], "batch_size": c["batch_size"],
                "temperature": c["temperature"], "tokens_per_s": round(c["tokens_per_s"], 2),
                "speedup": round(c["tokens_per_s"] / ref, 3) if ref else None,
                "acceptance_rate": c.get("acceptance_rate"),
                "mean_accepted_length": c.get("mean_accepted_length"),
                "ideal_speedup": _ideal(system, c, k, cost, adaptive),
                "drafts_per_step": c.get("drafts_per_step"),
                # verification steps that checked drafts, over the timed repeats (and rounds):
                # with the adaptive switch on, how often it drafted
                "num_drafts": c.get("num_drafts"),
                "draft_cost": cost,
                "peak_memory_mb": res.get("peak_memory_mb"), "kv_blocks": res.get("kv_blocks"),
                "exit_layer": e if system in ("vllm-draft-truncated", "layerskip",
                                              "hf-early-exit") else None,
                "num_speculative_tokens": k if system in ("vllm-draft-truncated", "layerskip",
                                                          "vllm-ngram") else None,
                "times_s": c["times_s"]})
    return rows


def _ideal(system: str, cell: dict, k: int, cost, adaptive: bool) -> float | None:
    drafting = ideal.ideal_speedup(cell.get("mean_accepted_length"),
                                   cell.get("drafts_per_step") or k, cost)
    if adaptive and system == "layerskip":
        return max(1.0, drafting or 0.0)
    return drafting


def merge_rounds(per_round: list[list[dict]]) -> list[dict]:
    """One row per system and cell from the rows of each round: the timings and draft counts
    of all rounds, every other figure the median of the rounds' (a speedup is taken within
    its round; whole numbers stay whole)."""
    groups: dict[tuple, list[dict]] = {}
    for rows in per_round:
        for r in rows:
            key = (r["system"], r["prompt_set"], r["batch_size"], r["temperature"])
            groups.setdefault(key, []).append(r)
    merged = []
    for rows in groups.values():
        row = dict(rows[0], rounds=len(rows), times_s=[t for r in rows for t in r["times_s"]])
        for field in rows[0]:
            # Rounds without a figure (None: e.g. no acceptance where nothing was drafted)
            # do not count; a figure from any round does.
            values = [r.get(field) for r in rows]
            values = [v for v in values if type(v) in (int, float)]
            if not values:
                continue
            if field == "num_drafts":
                row[field] = sum(values)
            elif all(type(v) is int for v in values):
                row[field] = statistics.median_low(values)
            else:
                row[field] = statistics.median(values)
        merged.append(row)
    return merged


def calibration_summary(costs: dict, e: int, L: int) -> dict:
    return {str(b): {"draft_cost": round(c, 4), "layers_only_ratio": round(e / L, 4),
                     "overhead_fraction": round(ideal.overhead_fraction(c, e, L), 4)}
            for b, c in sorted(costs.items())}


def main(argv=None) -> int:
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    check_common(args)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    e, k = resolve_spec(args.model, args.exit_layer, args.num_speculative_tokens)
    L = num_layers(args.model)
    systems = list(args.systems)
    if "vllm" not in systems:
        systems.insert(0, "vllm")      # every speedup is relative to plain vLLM
    if {"vllm-draft-truncated", "layerskip"} & set(systems):
        systems.insert(systems.index("vllm") + 1, DRAFT_COST_RUN)
    work = Path(args.work_dir) if args.work_dir else default_work_dir(Path(args.model).name)
    cells = make_cells(args, args.batch_sizes, args.temperatures, args.prompt_sets)
    print(f"model {args.model}: {L} layers, exit_layer {e}, K {k}, dtype {args.dtype}, "
          f"{args.max_tokens} new tokens, batch sizes {args.batch_sizes}, "
          f"temperatures {args.temperatures}, prompts {args.prompt_sets}")
    per_round, errors, round_costs = [], [], []
    with tqdm(total=len(systems) * args.rounds, desc="systems", unit="system") as bar:
        for round_ in range(args.rounds):
            order = systems if round_ % 2 == 0 else systems[::-1]
            results, failed = run_systems(args, order, cells, e, k, work, bar)
            errors += [dict(x, round=round_) for x in failed]
            costs = draft_costs(results)
            round_costs.append(costs)
            per_round.append(build_rows(results, costs, e, k, L, adaptive=not args.fixed_drafting))
    rows = merge_rounds(per_round)
    costs = {b: statistics.median(c[b] for c in round_costs if b in c)
             for b in {b for c in round_costs for b in c}}
    out = {"results": rows, "errors": errors,
           "settings": {"model": str(args.model), "num_layers": L, "exit_layer": e,
                        "num_speculative_tokens": k, "dtype": args.dtype,
                        "max_tokens": args.max_tokens, "repeats": args.repeats,
                        "warmup": args.warmup, "prompts_per_cell": args.prompts_per_cell,
                        "rounds": args.rounds,
                        "batch_sizes": args.batch_sizes, "temperatures": args.temperatures,
                        "prompt_sets": args.prompt_sets, "enforce_eager": args.enforce_eager,
                        "machine": machine_info()},
           "calibration": calibration_summary(costs, e, L),
           "targets": check_targets(rows),
           "startup_s": {s: r.get("startup_s") for s, r in results.items()},
           "pinning": {s: r.get("pinning") for s, r in results.items()}}
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    md = Path(args.markdown) if args.markdown else json_path.with_suffix(".md")
    md.write_text(report.throughput_table(rows))
    if rows:
        report.throughput_chart(rows, Path(args.plot) if args.plot else json_path.with_suffix(".png"))
    print(report.throughput_table(rows))
    print(f"wrote {json_path}, {md}")
    if errors:
        print("failed: " + "; ".join(f"{x['system']}: {x['error']}" for x in errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
