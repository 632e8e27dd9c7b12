"""The model shipped in the repository (models/layerskip-code-32m): what its card promises
about the files, and LayerSkip's greedy identity on it with its own calibrated setting."""
from __future__ import annotations

import json

import pytest
from conftest import open_engine, spec_counters

from benchmarks.demo import SHIPPED_DIR, model_ready
from benchmarks.prompts import load_prompts

MIB = 1 << 20


def test_shipped_files_fit_the_repository_limits():
    assert model_ready(SHIPPED_DIR), f"{SHIPPED_DIR} is not a LayerSkip checkpoint"
    shards = sorted(SHIPPED_DIR.glob("*.safetensors"))
    assert shards and all(p.stat().st_size <= 15 * MIB for p in shards)
    assert sum(p.stat().st_size for p in shards) < 64 * MIB
    cfg = json.loads((SHIPPED_DIR / "config.json").read_text())
    meta = cfg["layerskip"]
    assert 1 <= meta["exit_layer"] < cfg["num_hidden_layers"] and meta["num_speculative_tokens"] >= 1
    assert 0 < len(meta["draft_vocab"]) <= cfg["vocab_size"]  # ids seen in training, by frequency
    assert (SHIPPED_DIR / "README.md").read_text().startswith("# layerskip-code-32m")


@pytest.mark.engine
def test_shipped_model_greedy_identity_with_its_own_setting():
    """No exit_layer / K given: the plugin takes them from the checkpoint's metadata."""
    from vllm import SamplingParams

    prompts = load_prompts("code", 3)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    kw = dict(dtype="float32", max_model_len=1024, max_num_batched_tokens=1024,
              kv_cache_memory_bytes=64 << 20)
    with open_engine(SHIPPED_DIR, **kw) as plain:
        expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    spec = {"method": "layerskip", "adaptive_drafting": False}
    with open_engine(SHIPPED_DIR, speculative_config=spec, **kw) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        counters = spec_counters(llm)
    assert got == expected
    assert 0 < counters["num_accepted_tokens"] < counters["num_draft_tokens"]
    # Completions are code-like text, not one repeated token.
    assert all(len(set(ids)) > 8 for ids in expected)
