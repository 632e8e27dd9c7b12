"""What a draft step costs against a full decode step, with and without the draft head over
a vocabulary subset (`draft_vocab_size`), in one engine per setting.

    python -m benchmarks.draft_cost --model DIR [--exit-layer E] [--draft-vocab-sizes 0,8192]
        [--batch-sizes 1,8,32] [--dtype auto] [--json OUT]
    python -m benchmarks.draft_cost --large-vocab-model DIR ...

`--large-vocab-model` first writes a random Llama with SmolLM2-135M's shape (30 layers,
hidden 576, FFN 1536, 9/3 heads, vocabulary 49,152, tied embeddings, bf16) and a random
token ranking: the costs are those of the real shape, the outputs meaningless.

Per setting, one LayerSkip engine. Drafting off (run-time switch): wall time per decode
step at each batch size. Drafting always: the worker's draft-loop time per draft step
(`layerskip_stats`). The ratio is the `c` of the ideal speedup, a / (K c + 1).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.machine import add_dtype_flag, describe, machine_info
from benchmarks.systems import num_layers, resolve_spec

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=1e5)


def write_large_vocab_model(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE, torch_dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    ranking = torch.randperm(SMOLLM2_SHAPE["vocab_size"], generator=torch.Generator().manual_seed(seed))
    config["layerskip"] = {"exit_layer": 10, "num_speculative_tokens": 3, "draft_vocab": ranking.tolist()}
    (out / "config.json").write_text(json.dumps(config) + "\n")
    return out


def measure(model: Path, e: int, k: int, vocab: int, batch_sizes: list[int], max_tokens: int,
            enforce_eager: bool, dtype: str) -> list[dict]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), dtype=dtype, max_model_len=512, max_num_seqs=max(batch_sizes),
              enforce_eager=enforce_eager, skip_tokenizer_init=True, seed=0,
              kv_cache_memory_bytes=1 << 30,
              speculative_config={"method": "layerskip", "exit_layer": e, "num_speculative_tokens": k,
                                  "draft_vocab_size": vocab, "adaptive_drafting": False})
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    rows = []
    try:
        for b in batch_sizes:
            prompts = [{"prompt_token_ids": [(7 * i + j) % 1000 + 10 for j in range(32)]} for i in range(b)]
            llm.collective_rpc("layerskip_set_drafting", args=("off",))
            llm.generate(prompts, params, use_tqdm=False)  # warm-up
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            full_step = (time.perf_counter() - t0) / max_tokens
            llm.collective_rpc("layerskip_set_drafting", args=("always",))
            llm.generate(prompts, params, use_tqdm=False)  # warm-up
            (before,) = llm.collective_rpc("layerskip_stats")
            llm.generate(prompts, params, use_tqdm=False)
            (after,) = llm.collective_rpc("layerskip_stats")
            steps = after["draft_steps"] - before["draft_steps"]
            draft_step = (after["draft_seconds"] - before["draft_seconds"]) / max(steps, 1)
            rows.append({"draft_vocab_size": vocab, "batch_size": b, "full_step_ms": 1e3 * full_step,
                         "draft_step_ms": 1e3 * draft_step, "draft_cost": draft_step / full_step})
    finally:
        llm.llm_engine.engine_core.shutdown()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.draft_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="a checkpoint with a layerskip.draft_vocab ranking")
    where.add_argument("--large-vocab-model", help="write (or reuse) the random SmolLM2-shaped model here")
    ap.add_argument("--exit-layer", type=int, default=None)
    ap.add_argument("--num-speculative-tokens", type=int, default=3)
    ap.add_argument("--draft-vocab-sizes", default="0,8192")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--enforce-eager", action="store_true")
    add_dtype_flag(ap)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    model = Path(args.model or write_large_vocab_model(Path(args.large_vocab_model)))
    e, k = resolve_spec(model, args.exit_layer, args.num_speculative_tokens)
    sizes = [int(x) for x in args.draft_vocab_sizes.split(",")]
    batches = [int(x) for x in args.batch_sizes.split(",")]
    rows = [r for n in sizes
            for r in measure(model, e, k, n, batches, args.max_tokens, args.enforce_eager, args.dtype)]
    layers = num_layers(model)
    machine = describe(machine_info())
    print(f"{model}: exit_layer {e} of {layers} (E/L = {e / layers:.2f}), K {k}, {args.dtype}; {machine}")
    print("| draft_vocab_size | batch | full step ms | draft step ms | draft / full |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['draft_vocab_size'] or 'full'} | {r['batch_size']} | {r['full_step_ms']:.2f} | "
              f"{r['draft_step_ms']:.2f} | {r['draft_cost']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model), "exit_layer": e, "layers": layers,
                                               "dtype": args.dtype, "machine": machine,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
