"""Where vLLM's CPU engine puts its worker, and what that costs plain vLLM and LayerSkip.

    python -m benchmarks.layout --model DIR [--batch-sizes 1,8,32] [--rounds 2] [--repeats 3]
        [--max-tokens 96] [--dtype auto] [--enforce-eager] [--json OUT] [--md OUT] [--chart OUT]

vLLM's CPU worker binds its OpenMP threads to every core but the last
`VLLM_CPU_NUM_OF_RESERVED_CPU` (default on x86: one per worker), which it leaves to the
engine core and the front end. On a 2-core machine the model then computes on one core.
Three layouts, each with plain vLLM and with LayerSkip as users get it (the adaptive switch):

- ``default``: what `LLM(...)` and `vllm serve` do;
- ``no-reserved-core``: `VLLM_CPU_NUM_OF_RESERVED_CPU=0`; the worker's threads take every
  core and the engine core and front end share them;
- ``in-process``: `VLLM_ENABLE_V1_MULTIPROCESSING=0` with the `uni` executor: the engine
  core and the worker run in the caller's process, nothing polls beside the model
  (offline `LLM` only: `vllm serve` runs its engine core in a process of its own).

One engine alive at a time, each in its own process (benchmarks.overhead.EngineProcess);
each round starts every (layout, system) in turn, odd rounds in reverse order. Ratios are
taken within a round, then the median over rounds. Per layout the worker reports torch's
thread count and the cores its bound threads may run on.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from tqdm import tqdm

from benchmarks.machine import add_dtype_flag, describe, machine_info, write_results
from benchmarks.overhead import EngineProcess, median_run
from benchmarks.systems import add_spec_flags, resolve_spec

# layout -> (environment of the engine's process, engine core and worker in that process)
LAYOUTS = {
    "default": ({}, False),
    "no-reserved-core": ({"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, False),
    "in-process": ({}, True),
}
# system -> (LayerSkip settings or None, drafting mode set at run time)
SYSTEMS = {"vllm": (None, None), "layerskip": ({"verify_from_exit_states": True}, "adaptive")}
BASELINE = "default"


def lives(rounds: int) -> list[tuple[str, str]]:
    """(layout, system) in start order: every engine once a round, odd rounds reversed."""
    order = [(layout, system) for layout in LAYOUTS for system in SYSTEMS]
    return [pair for r in range(rounds) for pair in (order[::-1] if r % 2 else order)]


def summarise(runs: dict[str, list[float]], batch: int, max_tokens: int) -> list[dict]:
    """runs["layout/system"]: seconds per round. One row per layout: tokens/s (median over
    rounds) and, each taken within a round, the ratio to the default layout and LayerSkip's
    ratio to plain vLLM."""
    rounds = range(min(len(v) for v in runs.values()))
    med = lambda f: statistics.median(f(r) for r in rounds)  # noqa: E731
    rows = []
    for layout in LAYOUTS:
        row = {"batch_size": batch, "layout": layout}
        for system in SYSTEMS:
            seconds = runs[f"{layout}/{system}"]
            base = runs[f"{BASELINE}/{system}"]
            row[f"{system}_tokens_per_s"] = med(lambda r: batch * max_tokens / seconds[r])
            row[f"{system}_vs_default"] = med(lambda r: base[r] / seconds[r])
        row["layerskip_vs_vllm"] = med(
            lambda r: runs[f"{layout}/vllm"][r] / runs[f"{layout}/layerskip"][r])
        rows.append(row)
    return rows


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Model `{meta['model']}`, exit_layer {meta['exit_layer']}, K {meta['k']}, "
             f"{meta['dtype']}, {'eager' if meta['enforce_eager'] else 'compiled'}, greedy code "
             f"prompts, {meta['max_tokens']} new tokens; LayerSkip with the adaptive switch; one "
             f"engine alive at a time, {meta['rounds']} lives each (order reversed every other "
             f"round), median of {meta['repeats']} runs per life, median over lives; "
             f"{meta['machine']}.", "",
             "| batch | layout | worker threads / bound cores | vLLM tok/s | vs default | "
             "LayerSkip tok/s | vs default | LayerSkip / vLLM |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        worker = meta["workers"].get(r["layout"], {})
        cores = ",".join(map(str, worker.get("bound_cores", []))) or "not bound"
        where = f"{worker['torch_threads']} / {cores}" if worker else "-"
        lines.append(f"| {r['batch_size']} | {r['layout']} | {where} | {r['vllm_tokens_per_s']:.1f} | "
                     f"{r['vllm_vs_default']:.2f}x | {r['layerskip_tokens_per_s']:.1f} | "
                     f"{r['layerskip_vs_default']:.2f}x | {r['layerskip_vs_vllm']:.2f}x |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.8), squeeze=False)
    for ax, b in zip(axes[0], batches):
        sub = [r for r in rows if r["batch_size"] == b]
        for i, system in enumerate(SYSTEMS):
            xs = [j + (i - 0.5) * 0.38 for j in range(len(sub))]
            ax.bar(xs, [r[f"{system}_tokens_per_s"] for r in sub], 0.38, label=system)
        ax.set_xticks(range(len(sub)), [r["layout"] for r in sub], fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"batch {b}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.layout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    add_spec_flags(p)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--rounds", type=int, default=2, help="lives per (layout, system)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size and life")
    p.add_argument("--max-tokens", type=int, default=96)
    add_dtype_flag(p)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path)
    p.add_argument("--chart", type=Path)
    args = p.parse_args(argv)
    e, k = resolve_spec(args.model, args.exit_layer, args.num_speculative_tokens)
    batches = [int(x) for x in args.batch_sizes.split(",")]
    runs: dict[int, dict[str, list[float]]] = {b: {} for b in batches}
    workers: dict[str, dict] = {}
    for layout, system in tqdm(lives(args.rounds), desc="engine lives"):
        env, in_process = LAYOUTS[layout]
        layerskip, mode = SYSTEMS[system]
        engine = EngineProcess((args.model, e, k, layerskip, max(batches), args.dtype,
                                args.enforce_eager, in_process), args.max_tokens, env)
        try:
            workers[layout] = engine.worker
            for b in batches:
                engine.run(b, mode)  # warm-up: new batch shapes; the switch's first probe
                timed = [engine.run(b, mode) for _ in range(args.repeats)]
                runs[b].setdefault(f"{layout}/{system}", []).append(median_run(timed)["seconds"])
        finally:
            engine.close()
    rows = [row for b in batches for row in summarise(runs[b], b, args.max_tokens)]
    meta = {"model": args.model, "exit_layer": e, "k": k, "dtype": args.dtype,
            "enforce_eager": args.enforce_eager, "max_tokens": args.max_tokens,
            "rounds": args.rounds, "repeats": args.repeats, "layouts": LAYOUTS,
            "workers": workers, "machine": describe(machine_info())}
    write_results({"meta": meta, "rows": rows, "runs": runs}, to_markdown(meta, rows),
                  args.json, args.md)
    if args.chart:
        chart(rows, args.chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
