"""Where an engine step's time goes, hook by hook, with drafting off and on, in one engine life.

    python -m benchmarks.step_profile --model DIR [--exit-layer E] [--num-speculative-tokens K]
        [--batch-sizes 1,8,32] [--repeats 5] [--max-tokens 96] [--enforce-eager]
        [--json OUT] [--md OUT]

A sampling profiler (py-spy) slows a 2-core engine about 2x and gives shares; whole-run
ratios between engine lives scatter by +-10% on a shared machine. This measures the worker's
own hooks with a wall clock instead: one LayerSkip engine, the hooks listed in HOOKS wrapped
in the worker process (`collective_rpc`), drafting `off`, `always` (split verification) and
`always-stock-verify` timed turn about, run by run. Per mode it reports milliseconds per
engine step spent in each hook (the median over runs) and the calls per step, next to the
wall time per step. The hooks nest (`execute_model` holds `_model_forward`, which holds the
verification's `lower_layers` and `upper_layers`), so the rows do not add up; differences
between the two columns are what drafting costs where.

The hooks are vLLM runner internals (vLLM 0.32's V1 model runner) and our drafter's methods,
looked up by name; a name missing in the installed vLLM is skipped, not an error.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks.overhead import MODES
from benchmarks.prompts import load_prompts
from benchmarks.runner import engine_layout
from benchmarks.systems import add_spec_flags, resolve_spec
from benchmarks.machine import add_dtype_flag, describe, machine_info, write_results

# (object path from the worker, attribute) -> row name
HOOKS = {
    ("model_runner", "execute_model"): "runner.execute_model",
    ("model_runner", "sample_tokens"): "runner.sample_tokens",
    ("model_runner", "_update_states"): "runner._update_states",
    ("model_runner", "_prepare_inputs"): "runner._prepare_inputs",
    ("model_runner", "_build_attention_metadata"): "runner._build_attention_metadata",
    ("model_runner", "_calc_spec_decode_metadata"): "runner._calc_spec_decode_metadata",
    ("model_runner", "_model_forward"): "runner._model_forward",
    ("model_runner.model", "compute_logits"): "model.compute_logits",
    ("model_runner", "_sample"): "runner._sample",
    ("model_runner.rejection_sampler", "forward"): "rejection_sampler.forward",
    ("model_runner", "_bookkeeping_sync"): "runner._bookkeeping_sync",
    ("model_runner", "propose_draft_token_ids"): "runner.propose_draft_token_ids",
    ("model_runner.drafter", "propose"): "drafter.propose",
    ("model_runner.drafter", "_step_metadata"): "drafter._step_metadata",
    ("model_runner.drafter", "build_per_group_and_layer_attn_metadata"): "drafter.attn_metadata",
    ("model_runner.drafter", "lower_layers"): "drafter.lower_layers",
    ("model_runner.drafter", "_draft_tokens"): "drafter._draft_tokens",
    ("model_runner.drafter", "upper_layers"): "drafter.upper_layers",
    ("model_runner.drafter.exit_states", "plan"): "exit_states.plan",
}
STEP_HOOK = "runner.execute_model"


def install_clocks(worker) -> list[str]:
    """Worker side: wrap each hook with a wall clock (instance attributes shadow methods)."""
    import collections
    import functools
    import time as clock

    seconds, calls = collections.defaultdict(float), collections.Counter()
    wrapped = []
    for (path, attr), name in HOOKS.items():
        owner = worker
        for part in path.split("."):
            owner = getattr(owner, part, None)
        original = getattr(owner, attr, None)
        if original is None:
            continue

        def timed(*args, _original=original, _name=name, **kwargs):
            started = clock.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_name] += clock.perf_counter() - started
                calls[_name] += 1

        setattr(owner, attr, functools.wraps(original)(timed))
        wrapped.append(name)
    worker.step_profile_clocks = (seconds, calls)
    return wrapped


def read_clocks(worker) -> dict:
    """Worker side: {hook: (seconds, calls)} since the last read."""
    seconds, calls = worker.step_profile_clocks
    out = {name: (seconds[name], calls[name]) for name in calls}
    seconds.clear()
    calls.clear()
    return out


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """runs[mode]: one {"seconds": wall, "hooks": {hook: (seconds, calls)}} per timed run.
    Rows per hook: ms per engine step (median over runs) and calls per step, per mode."""
    hooks = sorted({h for these in runs.values() for run in these for h in run["hooks"]})
    rows = [{"hook": "wall time"}] + [{"hook": hook} for hook in hooks]
    for mode, these in runs.items():
        steps = [run["hooks"][STEP_HOOK][1] for run in these]
        rows[0][mode] = statistics.median(run["seconds"] / s * 1e3 for run, s in zip(these, steps))
        rows[0][f"{mode} calls"] = 1.0
        for row in rows[1:]:
            got = [run["hooks"].get(row["hook"], (0.0, 0)) for run in these]
            row[mode] = statistics.median(sec / s * 1e3 for (sec, _), s in zip(got, steps))
            row[f"{mode} calls"] = statistics.median(n / s for (_, n), s in zip(got, steps))
    return rows


def to_markdown(meta: dict, tables: dict[int, list[dict]], modes: list[str]) -> str:
    lines = [f"Model `{meta['model']}`, exit_layer {meta['exit_layer']}, K {meta['k']}, "
             f"{meta['dtype']}, {'eager' if meta['enforce_eager'] else 'compiled'}, greedy code "
             f"prompts, {meta['max_tokens']} new tokens; one engine life, modes timed turn "
             f"about, median of {meta['repeats']} runs; {meta['machine']}.", ""]
    for b, rows in tables.items():
        lines += [f"Batch {b}: milliseconds per engine step (calls per step)", "",
                  "| hook | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        for row in rows:
            cells = [f"{row[m]:.3f} ({row[f'{m} calls']:.2f})" if row.get(f"{m} calls") else "-"
                     for m in modes]
            lines.append(f"| {row['hook']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    add_spec_flags(p)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=96)
    add_dtype_flag(p)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--in-process-engine", action="store_true",
                   help="engine core and worker in this process (faster start; smoke tests)")
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path)
    args = p.parse_args(argv)
    # The clocks travel to the worker as a pickled function.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from vllm import LLM, SamplingParams

    e, k = resolve_spec(args.model, args.exit_layer, args.num_speculative_tokens)
    batches = [int(x) for x in args.batch_sizes.split(",")]
    modes = ["off", "always", "always-stock-verify"]
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024, max_num_seqs=max(batches),
              seed=0, enforce_eager=args.enforce_eager, kv_cache_memory_bytes=1 << 30,
              speculative_config={"method": "layerskip", "exit_layer": e,
                                  "num_speculative_tokens": k, "adaptive_drafting": False},
              **engine_layout(args.in_process_engine))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                            min_tokens=args.max_tokens, ignore_eos=True)
    prompts = load_prompts("code", max(batches))
    tables, raw = {}, {}
    try:
        llm.collective_rpc(install_clocks)
        with tqdm(total=len(batches) * len(modes) * (args.repeats + 1), desc="runs") as bar:
            for b in batches:
                runs = {mode: [] for mode in modes}
                for i in range(args.repeats + 1):  # the first round warms up new shapes
                    for mode in modes[:: -1 if i % 2 else 1]:
                        drafting, verification = MODES[mode]
                        llm.collective_rpc("layerskip_set_drafting", args=(drafting,))
                        llm.collective_rpc("layerskip_set_verification", args=(verification,))
                        time.sleep(1.5)  # the worker's queue poller winds down (overhead.py)
                        llm.collective_rpc(read_clocks)
                        started = time.perf_counter()
                        llm.generate(prompts[:b], params, use_tqdm=False)
                        seconds = time.perf_counter() - started
                        (hooks,) = llm.collective_rpc(read_clocks)
                        if i:
                            runs[mode].append({"seconds": seconds, "hooks": hooks})
                        bar.update()
                tables[b], raw[b] = summarise(runs), runs
    finally:
        llm.llm_engine.engine_core.shutdown()
    meta = {"model": args.model, "exit_layer": e, "k": k, "dtype": args.dtype,
            "enforce_eager": args.enforce_eager, "in_process_engine": args.in_process_engine,
            "max_tokens": args.max_tokens, "repeats": args.repeats,
            "machine": describe(machine_info())}
    md = to_markdown(meta, tables, modes)
    write_results({"meta": meta, "tables": tables, "runs": raw}, md, args.json, args.md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
