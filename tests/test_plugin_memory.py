"""Resident memory of the worker across passes of sampled requests: no leak while drafting.

Why the oneDNN cache is capped here. vLLM-CPU runs each linear layer through a oneDNN
matmul, and oneDNN caches one primitive per new input shape, i.e. per token count of a
step (up to ONEDNN_PRIMITIVE_CACHE_CAPACITY entries, 1024 by default; 0.1-0.3 MiB each on
the tiny model). Plain decoding sees few token counts; speculative steps (1 + drafts per
request, summed over the batch) and prompts of new lengths see many, so memory rises pass
after pass until the cache is full: found as "LayerSkip leaks 10-16 MiB a pass", and plain
vLLM does the same with prompts of varied lengths. With the cache capped, what is left to
grow is a real leak, and each pass brings new contents and token counts."""

from __future__ import annotations

import random

import psutil
import pytest
from conftest import layerskip, open_engine
from vllm import SamplingParams

pytestmark = pytest.mark.engine

PASSES = 6
CACHE_CAP = "64"


def worker_rss_mib() -> float:
    """Resident memory of this process's vLLM worker (the engine's own process tree)."""
    workers = [p for p in psutil.Process().children(recursive=True) if "Worker" in p.name()]
    assert len(workers) == 1, [p.name() for p in psutil.Process().children(recursive=True)]
    return workers[0].memory_info().rss / 2**20


def growth_after_second_pass(llm) -> float:
    """MiB the worker grew from the end of pass 2 to the end of the last pass (the first
    passes fill allocator caches; a leak keeps growing). Every pass sends new prompts of new
    lengths, sampled at T=0.8."""
    params = SamplingParams(temperature=0.8, max_tokens=32, ignore_eos=True)
    rss = []
    for n in range(PASSES):
        rnd = random.Random(n)
        lengths = [rnd.randrange(8, 120) for _ in range(64)]
        prompts = [{"prompt_token_ids": [rnd.randrange(10, 400) for _ in range(n)]} for n in lengths]
        llm.generate(prompts, params, use_tqdm=False)
        rss.append(worker_rss_mib())
    return rss[-1] - rss[1]


@pytest.mark.parametrize("spec", [None, layerskip(draft_len=3)], ids=["plain", "layerskip"])
def test_worker_memory_stays_flat(llama_dir, spec, monkeypatch):
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", CACHE_CAP)  # the engine inherits it
    # The worker in a process of its own, as users run it: its memory is measured alone.
    with open_engine(llama_dir, in_process=False, max_num_seqs=64, kv_cache_memory_bytes=256 << 20,
                     speculative_config=spec) as llm:
        assert growth_after_second_pass(llm) < 8
