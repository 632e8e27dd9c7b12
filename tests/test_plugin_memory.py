"""Resident memory of the worker across identical passes of sampled requests, plain vLLM
against LayerSkip drafting. A known defect is pinned here (strict xfail): the day it is
fixed, this test passes, the xfail turns into a failure, and the marker must go."""

from __future__ import annotations

import psutil
import pytest
from conftest import layerskip, open_engine
from vllm import SamplingParams

pytestmark = pytest.mark.engine

PASSES = 6


def worker_rss_mib() -> float:
    """Resident memory of this process's vLLM worker (the engine's own process tree)."""
    workers = [p for p in psutil.Process().children(recursive=True) if "Worker" in p.name()]
    assert len(workers) == 1, [p.name() for p in psutil.Process().children(recursive=True)]
    return workers[0].memory_info().rss / 2**20


def growth_after_first_pass(llm) -> float:
    """MiB the worker grew from the end of pass 2 to the end of the last pass (the first
    passes fill allocator caches; a leak keeps growing)."""
    prompts = [{"prompt_token_ids": [(7 * i + j) % 400 + 10 for j in range(16 + i % 20)]}
               for i in range(64)]
    params = SamplingParams(temperature=0.8, max_tokens=32, ignore_eos=True)
    rss = []
    for _ in range(PASSES):
        llm.generate(prompts, params, use_tqdm=False)
        rss.append(worker_rss_mib())
    return rss[-1] - rss[1]


def test_plain_vllm_keeps_its_memory_flat(llama_dir):
    with open_engine(llama_dir, max_num_seqs=64, kv_cache_memory_bytes=256 << 20) as plain:
        assert growth_after_first_pass(plain) < 8


@pytest.mark.xfail(strict=True, reason="known defect (README, soak section): native memory "
                   "grows by 10-16 MiB a pass while drafting for sampled requests")
def test_layerskip_drafting_for_sampled_requests_keeps_its_memory_flat(llama_dir):
    with open_engine(llama_dir, max_num_seqs=64, kv_cache_memory_bytes=256 << 20,
                     speculative_config=layerskip(draft_len=3)) as spec:
        assert growth_after_first_pass(spec) < 8
