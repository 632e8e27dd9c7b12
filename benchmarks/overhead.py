"""What the engine costs around the method, measured side by side.

    python -m benchmarks.overhead --model DIR [--exit-layer E] [--num-speculative-tokens K]
        [--batch-sizes 1,8,32] [--rounds 3] [--repeats 3] [--max-tokens 128] [--silent-upper]
        [--json OUT] [--md OUT]

Three engines run the same greedy code prompts:

- ``vllm``: plain vLLM;
- ``vllm-control``: a second plain vLLM, a check on the method: its ratio to ``vllm``
  must be 1.0 within noise; when it is not, no other ratio in the run can be trusted either;
- ``layerskip``, switched at run time between its modes: drafting ``off`` (what a
  configured but idle LayerSkip costs: the forced-off ratio); drafting ``always`` with split
  verification (layers >= E only for tokens whose layer-E state the draft saved);
  drafting ``always`` with the stock forward verifying over all layers
  (``always-stock-verify``); drafting ``always`` with the verification switch choosing
  between the two per batch-size bucket (``always-adaptive-verify``); and ``adaptive`` (the
  drafting switch decides per batch-size bucket, as a user gets by default). The modes
  alternate run by run within one engine life, so the machine's drift over minutes cancels
  from the ratios between them.

Per batch size it reports the forced-off ratio, the drafting speedups, and the split of a
drafting step: the draft loop's share (the worker's own clock) and the verification pass
against a plain decode step, with and without the layer-E states reused. From the same
numbers, the zero-overhead ideal a / (K c + 1) (benchmarks/ideal.py) and the share of it
reached. The mean accepted length a is the tokens each request got per verification:
b (new tokens - 1) over the verifications (draft tokens / K, less each request's last
round, whose drafts are never verified).

**One engine alive at a time.** Each round starts every engine in turn, in its own process:
start, warm up, time each batch size `--repeats` times (median), shut down. Odd rounds
reverse the order. Ratios are taken within a round, then the median over rounds; --json and
--md are written after every round, so a run stopped early keeps the rounds it finished. Engines
alive side by side were not comparable on the 2-core Xeon: the engine created first ran
8-30% slower than an identical one created after it, with or without its helper threads
pinned off the worker's core (cause not found). Each engine's helpers are still pinned
(benchmarks/affinity.py) so that placement is the same for every engine.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks.affinity import pin_engine_processes
from benchmarks.ideal import ideal_speedup
from benchmarks.prompts import load_prompts
from benchmarks.runner import engine_layout
from benchmarks.systems import add_spec_flags, resolve_spec, write_truncated_copy
from benchmarks.machine import add_dtype_flag, describe, machine_info, write_results

ENGINES = {  # name -> (LayerSkip settings or None, modes timed)
    "vllm": (None, [None]),
    "vllm-control": (None, [None]),
    "layerskip": ({"verify_from_exit_states": True},
                  ["off", "always", "always-stock-verify", "always-adaptive-verify", "adaptive"]),
}
# mode -> (drafting, verification), set through the worker at run time (runner.py)
MODES = {"off": ("off", "split"), "always": ("always", "split"),
         "always-stock-verify": ("always", "stock"),
         "always-adaptive-verify": ("always", "adaptive"), "adaptive": ("adaptive", "split")}
# Verification path -> the mode that drafts on every step with it.
VERIFY_PATHS = {"split": "always", "stock": "always-stock-verify",
                "adaptive": "always-adaptive-verify"}
# Modes timed interleaved, repeat by repeat: all of them, so that drift within an engine
# life (10% over its minutes on the AVX-512 EPYC) cancels from every ratio between them.
INTERLEAVED = tuple(MODES)


def start(model: str, e: int, k: int, layerskip: dict | None, max_batch: int, dtype: str,
          enforce_eager: bool, in_process: bool):
    kw = dict(model=model, dtype=dtype, max_model_len=1024, max_num_seqs=max_batch, seed=0,
              enforce_eager=enforce_eager, kv_cache_memory_bytes=1 << 30,
              **engine_layout(in_process))
    from vllm import LLM

    if layerskip is not None:
        kw["speculative_config"] = {"method": "layerskip", "exit_layer": e,
                                    "num_speculative_tokens": k, "adaptive_drafting": False,
                                    **layerskip}
    return LLM(**kw)


# vLLM's workers busy-poll their message queue for a second after their last request
# (shm_broadcast's busy_loop_s): on 2 cores an engine that has just finished would take a
# core from the next one. Each timed run waits that out first.
QUIET_S = 1.5


def timed_run(llm, prompts, params, mode: str | None) -> dict:
    if mode is not None:
        drafting, verification = MODES[mode]
        llm.collective_rpc("layerskip_set_drafting", args=(drafting,))
        llm.collective_rpc("layerskip_set_verification", args=(verification,))
        (before,) = llm.collective_rpc("layerskip_stats")
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    out = {"seconds": time.perf_counter() - t0}
    if mode is not None:
        (after,) = llm.collective_rpc("layerskip_stats")
        for key in ("draft_seconds", "draft_steps", "draft_tokens", "reused_tokens"):
            out[key] = after[key] - before[key]
    return out


def worker_threads(worker=None) -> dict:
    """Worker side (LLM.collective_rpc): torch's thread count, and the cores its bound
    threads may run on ([]: none bound)."""
    import torch

    from benchmarks.affinity import bound_cores

    return {"torch_threads": torch.get_num_threads(), "bound_cores": bound_cores()}


def serve(conn, engine_args: tuple, max_tokens: int, env: dict | None = None) -> None:
    """Engine process: set `env`, start one engine, then time (batch size, drafting mode)
    requests sent over `conn` until it receives None."""
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # worker_threads travels pickled
    os.environ.update(env or {})
    from vllm import SamplingParams

    llm = start(*engine_args)
    pinned = pin_engine_processes()
    worker = llm.collective_rpc(worker_threads)[0]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens,
                            ignore_eos=True)
    prompts = load_prompts("code", engine_args[4])
    conn.send(("ready", pinned, worker))
    try:
        while (request := conn.recv()) is not None:
            batch, mode = request
            conn.send(timed_run(llm, prompts[:batch], params, mode))
    finally:
        llm.llm_engine.engine_core.shutdown()


class EngineProcess:
    """One engine in a process of its own (`env` set there before the engine starts)."""

    def __init__(self, engine_args: tuple, max_tokens: int, env: dict | None = None):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        # Not a daemon: the engine starts processes of its own.
        self.process = context.Process(target=serve, args=(child, engine_args, max_tokens, env))
        self.process.start()
        try:  # what was pinned (affinity.py), and the worker's threads (worker_threads)
            status, self.pinned, self.worker = self.conn.recv()
        except EOFError:
            status = None
        if status != "ready":
            raise RuntimeError("engine process failed to start")

    def run(self, batch: int, mode: str | None) -> dict:
        time.sleep(QUIET_S)
        self.conn.send((batch, mode))
        return self.conn.recv()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()


def mode_groups(modes: list) -> list[list]:
    """Modes in timing order, those in INTERLEAVED as one group timed turn about."""
    together = [m for m in modes if m in INTERLEAVED]
    groups, placed = [], False
    for mode in modes:
        if mode not in together:
            groups.append([mode])
        elif not placed:
            groups.append(together)
            placed = True
    return groups


def median_run(timed: list[dict]) -> dict:
    """The run with the median wall time (its counters belong to the same run)."""
    return sorted(timed, key=lambda t: t["seconds"])[len(timed) // 2]


def summarise(runs: dict, b: int, k: int, max_tokens: int) -> dict:
    """Medians over rounds of the ratios that matter (each ratio taken within a round)."""
    med = lambda f: statistics.median(f(r) for r in range(len(runs["vllm"])))  # noqa: E731
    plain = lambda r: runs["vllm"][r]["seconds"]  # noqa: E731
    plain_step = lambda r: plain(r) / max_tokens  # noqa: E731
    row = {"batch_size": b, "plain_tokens_per_s": med(lambda r: b * max_tokens / plain(r)),
           "control_ratio": med(lambda r: plain(r) / runs["vllm-control"][r]["seconds"]),
           "forced_off_ratio": med(lambda r: plain(r) / runs["layerskip/off"][r]["seconds"]),
           "adaptive_ratio": med(lambda r: plain(r) / runs["layerskip/adaptive"][r]["seconds"])}
    for name, mode in VERIFY_PATHS.items():
        run = runs[f"layerskip/{mode}"]
        verify_steps = lambda r: run[r]["draft_steps"] / k  # noqa: E731
        verify_cost = lambda r: ((run[r]["seconds"] - run[r]["draft_seconds"])  # noqa: E731
                                 / verify_steps(r) / plain_step(r))
        draft_cost = lambda r: run[r]["draft_seconds"] / run[r]["draft_steps"] / plain_step(r)  # noqa: E731
        speedup = lambda r: plain(r) / run[r]["seconds"]  # noqa: E731
        # Zero-overhead speedup for the engine steps this batch took (the slowest request's,
        # with the ragged tail): plain steps over drafting cycles of K draft steps + a verify.
        step_ideal = lambda r: max_tokens / verify_steps(r) / (k * draft_cost(r) + 1)  # noqa: E731
        row[f"{name}_speedup"] = med(speedup)
        row[f"{name}_verify_cost"] = med(verify_cost)
        row[f"{name}_draft_cost"] = med(draft_cost)
        # Tokens per request and verification. Each request drafted K tokens per round, and
        # one round more than it had verifications (the drafts after its last token).
        row[f"{name}_accepted_length"] = med(
            lambda r: b * (max_tokens - 1) / (run[r]["draft_tokens"] / k - b))
        # Mean share of the batch that drafted in a drafting step: below 1 when requests
        # finish at different steps (each at its own acceptance), leaving a ragged tail of
        # small steps that plain decoding, whose requests all finish together, never runs.
        row[f"{name}_batch_fill"] = med(
            lambda r: run[r]["draft_tokens"] / run[r]["draft_steps"] / b)
        ideal = ideal_speedup(row[f"{name}_accepted_length"], k, row[f"{name}_draft_cost"])
        row[f"{name}_ideal"] = ideal
        row[f"{name}_of_ideal"] = row[f"{name}_speedup"] / ideal
        # What is left between the speedup and that ideal is the engine's own cost.
        row[f"{name}_step_ideal"] = med(step_ideal)
        row[f"{name}_of_step_ideal"] = med(lambda r: speedup(r) / step_ideal(r))
    return row


def to_markdown(meta: dict, rows: list[dict]) -> str:
    silenced = " (layers >= E silenced: every draft accepted)" if meta.get("silent_upper") else ""
    asked = meta.get("rounds_asked", meta["rounds"])
    unfinished = f" (of {asked} asked)" if asked != meta["rounds"] else ""
    lines = [f"Model `{meta['model']}`{silenced}, exit_layer {meta['exit_layer']}, K {meta['k']}, "
             f"{meta['dtype']}, {'eager' if meta['enforce_eager'] else 'compiled'}, greedy code "
             f"prompts, {meta['max_tokens']} new tokens; one engine alive at a time, "
             f"{meta['rounds']} lives each{unfinished} (order reversed every other round), median of "
             f"{meta['repeats']} runs per life, median over lives; {meta['machine']}.", "",
             "| batch | plain tok/s | control | forced off | adaptive | "
             + " | ".join(f"drafting, {name} verify" for name in VERIFY_PATHS) + " |",
             "|---|---|---|---|---|" + "---|" * len(VERIFY_PATHS)]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['plain_tokens_per_s']:.1f} | {r['control_ratio']:.3f}x "
                     f"| {r['forced_off_ratio']:.3f}x | {r['adaptive_ratio']:.3f}x | "
                     + " | ".join(f"{r[f'{name}_speedup']:.3f}x" for name in VERIFY_PATHS) + " |")
    lines += ["", "| batch | verify | verify cost | draft step cost | accepted len | batch fill | "
              "ideal | of ideal | ideal at these steps | of it |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name in VERIFY_PATHS:
            g = lambda key: r[f"{name}_{key}"]  # noqa: E731
            lines.append(
                f"| {r['batch_size']} | {name} | {g('verify_cost'):.2f} | {g('draft_cost'):.2f} | "
                f"{g('accepted_length'):.2f} | {100 * g('batch_fill'):.0f}% | {g('ideal'):.3f}x | "
                f"{100 * g('of_ideal'):.0f}% | {g('step_ideal'):.3f}x | {100 * g('of_step_ideal'):.0f}% |")
    lines += ["", "Control: plain vLLM over a second, identical plain engine (1.0 when the method is "
              "sound). Verify cost: wall time of a drafting step minus its draft loop, over a plain "
              "decode step. Draft step cost: one draft forward (E layers + head) over a plain step. "
              "Batch fill: the share of the batch that drafted, averaged over drafting steps "
              "(requests finish at different steps). Ideal: a / (K c + 1) from the mean accepted "
              "length a; ideal at these steps: the same for the engine steps the batch really took."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    add_spec_flags(p)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--rounds", type=int, default=3,
                   help="engine lives per engine (each starts, measures and stops it)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size and life")
    p.add_argument("--max-tokens", type=int, default=128)
    add_dtype_flag(p)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--in-process-engine", action="store_true",
                   help="engine core and worker in the engine-life process (faster start; "
                        "for smoke tests: no worker process to pin)")
    p.add_argument("--silent-upper", action="store_true",
                   help="run on a copy whose layers >= E add nothing (output projections "
                        "zeroed, same cost): every draft is accepted, so the ideal is exact")
    p.add_argument("--work-dir", type=Path, default=Path(".cache") / "bench" / "overhead")
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path)
    args = p.parse_args(argv)
    e, k = resolve_spec(args.model, args.exit_layer, args.num_speculative_tokens)
    if args.silent_upper:
        args.model = str(write_truncated_copy(args.model, e, args.work_dir / f"silent-upper-e{e}",
                                              silence_upper=True).resolve())
    batches = [int(x) for x in args.batch_sizes.split(",")]
    engine_args = lambda layerskip: (args.model, e, k, layerskip, max(batches),  # noqa: E731
                                     args.dtype, args.enforce_eager, args.in_process_engine)
    # runs[batch][engine/mode]: one entry per round, the median of that engine life's repeats.
    runs: dict[int, dict[str, list]] = {b: {} for b in batches}
    pinning: dict[str, dict] = {}
    names = list(ENGINES)
    with tqdm(total=args.rounds * len(names), desc="engine lives") as bar:
        for r in range(args.rounds):
            for name in names[:: -1 if r % 2 else 1]:
                layerskip, modes = ENGINES[name]
                engine = EngineProcess(engine_args(layerskip), args.max_tokens)
                try:
                    pinning[name] = engine.pinned
                    for b in batches:
                        for group in mode_groups(modes):
                            for mode in group:  # warm-up: new batch shapes, lazy set-up
                                engine.run(b, mode)
                            timed = {mode: [] for mode in group}
                            for i in range(args.repeats):
                                for mode in group[:: -1 if i % 2 else 1]:
                                    timed[mode].append(engine.run(b, mode))
                            for mode, these in timed.items():
                                key = name if mode is None else f"{name}/{mode}"
                                runs[b].setdefault(key, []).append(median_run(these))
                finally:
                    engine.close()
                bar.update()
            # After every round, so that a run stopped or cut off keeps the rounds it finished.
            report(args, e, k, runs, r + 1, pinning)
    return 0


def report(args, e: int, k: int, runs: dict, rounds_done: int, pinning: dict) -> None:
    """Write the JSON and markdown of the `rounds_done` rounds so far (printed at the end)."""
    final = rounds_done == args.rounds
    rows = [summarise(runs[b], b, k, args.max_tokens) for b in sorted(runs)]
    meta = {"model": args.model, "silent_upper": args.silent_upper, "exit_layer": e, "k": k,
            "dtype": args.dtype,
            "enforce_eager": args.enforce_eager, "in_process_engine": args.in_process_engine,
            "max_tokens": args.max_tokens, "rounds": rounds_done, "rounds_asked": args.rounds,
            "repeats": args.repeats, "engine_lives": "one engine alive at a time",
            "pinning": pinning,
            "machine": describe(machine_info())}
    md = to_markdown(meta, rows)
    if final:
        for row in rows:
            print(json.dumps(row), flush=True)
    write_results({"meta": meta, "rows": rows, "runs": runs}, md, args.json, args.md, echo=final)


if __name__ == "__main__":
    raise SystemExit(main())
