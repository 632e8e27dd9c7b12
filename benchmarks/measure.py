"""Timing one system in one process: `python -m benchmarks.measure SPEC.json OUT.json`.

The parent (`benchmarks.runner`) starts this module in its own process group, one engine at
a time. A spec names the system, the engine or `generate` arguments and the grid of cells
(prompt set x temperature x batch size). Each cell is warmed up, then timed ``repeats`` times;
the median is reported. Speculative-decoding counters are deltas of `LLM.get_metrics()`
around the timed repeats.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.affinity import pin_engine_processes
from benchmarks.runner import engine_layout

SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")


def peak_memory_mb() -> float:
    """Peak resident memory of this process plus its live descendants (VmHWM, MiB)."""
    import psutil

    procs = [psutil.Process()]
    try:
        procs += psutil.Process().children(recursive=True)
    except psutil.Error:
        pass
    total = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                hwm = [l for l in f if l.startswith("VmHWM:")]
            total += int(hwm[0].split()[1]) * 1024 if hwm else p.memory_info().rss
        except (OSError, psutil.Error, IndexError, ValueError):
            continue
    return round(total / 2**20, 1)


def spec_counters(llm) -> dict:
    out = dict.fromkeys(SPEC_COUNTERS, 0)
    for m in llm.get_metrics():
        if m.name in out:
            out[m.name] += getattr(m, "value", 0)
    return out


def acceptance_stats(delta: dict) -> dict:
    """acceptance_rate = accepted / drafted tokens; mean_accepted_length = tokens per step
    (1 + accepted per draft), vLLM's own convention. None when nothing was drafted."""
    drafts = delta.get("vllm:spec_decode_num_drafts", 0)
    drafted = delta.get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = delta.get("vllm:spec_decode_num_accepted_tokens", 0)
    return {"acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_length": 1 + accepted / drafts if drafts else None,
            "drafts_per_step": drafted / drafts if drafts else None,
            "num_drafts": drafts, "num_draft_tokens": drafted, "num_accepted_tokens": accepted}


def cell_key(cell: dict) -> str:
    """'code/0.0/1', or 'code/0.0/1/always' for a cell run in a given drafting mode."""
    key = f'{cell["prompt_set"]}/{cell["temperature"]}/{cell["batch_size"]}'
    return f'{key}/{cell["drafting"]}' if cell.get("drafting") else key


def layerskip_stats(llm) -> dict:
    return llm.collective_rpc("layerskip_stats")[0]


def switch_stats(before: dict, after: dict, batch_size: int, repeats: int) -> dict:
    """What a LayerSkip engine did in a cell's timed repeats: its drafting mode, the engine
    steps per repeat that took vLLM's plain path, and the adaptive switch's latest seconds per
    generated token, drafting and plain, in the cell's batch-size bucket (None until measured)."""
    from vllm_layerskip.adaptive import bucket_of

    buckets = after["seconds_per_token_by_batch_bucket"]
    # Integer keys may come back as strings through the engine's RPC serialisation.
    bucket = buckets.get(bucket_of(batch_size)) or buckets.get(str(bucket_of(batch_size))) or {}
    return {"drafting": after["drafting"],
            "plain_steps_per_repeat": (after["plain_steps"] - before["plain_steps"]) / repeats,
            "switch_seconds_per_token": {"drafting": bucket.get("drafting"),
                                         "plain": bucket.get("plain")}}


def _chunks(prompts, b):
    return [prompts[i:i + b] for i in range(0, len(prompts), b)]


def _timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run_vllm(spec: dict) -> dict:
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    kw = {**spec["engine"], **engine_layout(spec.get("in_process", False))}
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup = time.perf_counter() - t0
    pinning = pin_engine_processes()  # helpers off the worker's core: see benchmarks/affinity.py
    if spec.get("drafting"):
        llm.collective_rpc("layerskip_set_drafting", args=(spec["drafting"],))
    cache = llm.llm_engine.vllm_config.cache_config
    kv_blocks = getattr(cache, "num_gpu_blocks", None)
    cells, texts = [], {}
    # Engine-level warm-up: the first requests after start-up pay one-off costs (lazy
    # initialisation, new batch shapes) that a per-cell warm-up alone does not absorb.
    sizes = sorted({c["batch_size"] for c in spec["cells"]})
    first = spec["cells"][0]["prompts"]
    for b in sizes:
        llm.generate([first[i % len(first)] for i in range(b)],
                     SamplingParams(max_tokens=min(16, spec["max_tokens"]), ignore_eos=True,
                                    temperature=0), use_tqdm=False)
    for cell in spec["cells"]:
        prompts, b, n_new = cell["prompts"], cell["batch_size"], spec["max_tokens"]
        # No per-request seed: LayerSkip verifies seeded requests with its seed-stable
        # coupling (lower acceptance than vLLM's rejection sampler, see sampling.py), which
        # users who set no seed never pay. The engine's seed keeps runs repeatable.
        params = [SamplingParams(max_tokens=n_new, min_tokens=n_new, ignore_eos=True,
                                 temperature=cell["temperature"])
                  for _ in range(len(prompts))]
        outs = {}
        mode = cell.get("drafting")  # LayerSkip engines: the drafting mode for this cell
        if mode:
            llm.collective_rpc("layerskip_set_drafting", args=(mode,))

        def go():
            for i, chunk in enumerate(_chunks(list(range(len(prompts))), b)):
                res = llm.generate([prompts[j] for j in chunk], [params[j] for j in chunk],
                                   use_tqdm=False)
                for j, r in zip(chunk, res):
                    outs[j] = r.outputs[0]

        for _ in range(spec["warmup"]):
            go()
        before = spec_counters(llm)
        stats_before = layerskip_stats(llm) if mode else None
        times = _timed(go, 0, spec["repeats"])
        delta = {k: v - before[k] for k, v in spec_counters(llm).items()}
        n_tokens = sum(len(o.token_ids) for o in outs.values())
        cells.append({**{k: cell[k] for k in ("prompt_set", "temperature", "batch_size")},
                      "times_s": times, "tokens": n_tokens,
                      "tokens_per_s": n_tokens / statistics.median(times),
                      **acceptance_stats(delta),
                      **(switch_stats(stats_before, layerskip_stats(llm), b, spec["repeats"])
                         if mode else {})})
        if cell.get("keep_texts"):
            texts[cell_key(cell)] = [outs[j].text for j in range(len(prompts))]
    result = {"cells": cells, "kv_blocks": kv_blocks, "peak_memory_mb": peak_memory_mb(),
              "startup_s": startup, "texts": texts, "pinning": pinning}
    return result


def run_hf(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32,
             "float16": torch.float16}[spec["dtype"]]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).eval()
    extra = spec["generate"]
    n_new = spec["max_tokens"]
    base = getattr(model, model.base_model_prefix)
    full_layers = base.config.num_hidden_layers
    calls = {"verify": 0, "draft": 0}

    def count(_mod, _args):
        calls["verify" if base.config.num_hidden_layers == full_layers else "draft"] += 1

    model.register_forward_pre_hook(count)
    cells = []
    for cell in spec["cells"]:
        if cell["batch_size"] != 1:
            continue
        ids = [tok(p, return_tensors="pt").input_ids for p in cell["prompts"]]
        temp = cell["temperature"]
        sample = {"do_sample": True, "temperature": temp, "top_k": 0, "top_p": 1.0} \
            if temp > 0 else {"do_sample": False}

        def go():
            torch.manual_seed(spec["seed"])
            for x in ids:
                with torch.inference_mode():
                    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                                   min_new_tokens=n_new, pad_token_id=tok.eos_token_id,
                                   **sample, **extra)

        for _ in range(spec["warmup"]):
            go()
        calls.update(verify=0, draft=0)
        times = _timed(go, 0, spec["repeats"])
        n_tokens = n_new * len(ids)
        stats = {"acceptance_rate": None, "mean_accepted_length": None, "drafts_per_step": None}
        if extra.get("assistant_early_exit"):
            # Approximate, from forward-pass counts: each full-depth (verify) pass yields its
            # accepted drafts plus one token; each early-exit pass drafts one token.
            verify = calls["verify"] / spec["repeats"]
            drafted = calls["draft"] / spec["repeats"]
            accepted = max(0.0, n_tokens - verify)
            stats = {"acceptance_rate": min(1.0, accepted / drafted) if drafted else None,
                     "mean_accepted_length": n_tokens / verify if verify else None,
                     "drafts_per_step": drafted / verify if verify else None}
        cells.append({**{k: cell[k] for k in ("prompt_set", "temperature", "batch_size")},
                      "times_s": times, "tokens": n_tokens,
                      "tokens_per_s": n_tokens / statistics.median(times), **stats})
    draft_cost = None
    if extra.get("assistant_early_exit") and ids:
        draft_cost = hf_draft_cost(model, base, ids[0], extra["assistant_early_exit"])
    return {"cells": cells, "kv_blocks": None, "peak_memory_mb": peak_memory_mb(),
            "draft_cost": draft_cost, "texts": {}}


def hf_draft_cost(model, base, ids, exit_layer: int, steps: int = 16) -> float:
    """Time of one decode step through the first E layers + LM head over a full step
    (exactly what transformers' early-exit assistant runs), measured greedily."""
    import torch

    full = base.config.num_hidden_layers

    def step_time(n_layers):
        base.config.num_hidden_layers = n_layers
        try:
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                               do_sample=False)
                t1 = time.perf_counter()
                model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                t2 = time.perf_counter()
            return ((t1 - t0) - (t2 - t1)) / steps
        finally:
            base.config.num_hidden_layers = full

    return step_time(exit_layer) / step_time(full)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    if spec["kind"] == "vllm":
        result = run_vllm(spec)
    else:
        result = run_hf(spec)
    Path(argv[1]).write_text(json.dumps(result))
    # Skip interpreter teardown: vLLM's atexit hooks can hang on a dying engine; the parent
    # kills the process group anyway.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
