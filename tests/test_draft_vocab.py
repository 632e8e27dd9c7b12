"""The draft head over a frequency-ranked vocabulary subset (no engine): the ranking, the
head's logits, and the settings that ask for it."""

from __future__ import annotations

import json
import types

import pytest
import torch
from conftest import layerskip

from training.token_ranking import coverage, rank_tokens
from vllm_layerskip.draft_head import DraftHead
from vllm_layerskip.settings import LayerSkipConfigError, resolve


def test_rank_tokens_orders_by_count_then_id_and_drops_unseen():
    ids = torch.tensor([[5, 3, 5, 9], [3, 5, 7, 7]])
    assert rank_tokens(ids, vocab_size=10) == [5, 3, 7, 9]
    assert rank_tokens(ids, vocab_size=10, max_ids=2) == [5, 3]
    assert coverage(ids, [5, 3, 7, 9], [1, 2]) == {1: 3 / 8, 2: 5 / 8}


class FakeTarget(torch.nn.Module):
    """What DraftHead reads of a vLLM Llama: lm_head.weight, logits_processor, compute_logits."""

    def __init__(self, vocab=40, width=8, scale=1.0):
        super().__init__()
        self.lm_head = torch.nn.Linear(width, vocab + 8, bias=False)  # padded rows, as vLLM pads
        self.logits_processor = types.SimpleNamespace(org_vocab_size=vocab, scale=scale, soft_cap=None)

    def compute_logits(self, hidden):
        return (hidden @ self.lm_head.weight.T)[:, : self.logits_processor.org_vocab_size] * self.logits_processor.scale


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_subset_head_equals_the_full_head_on_the_subset(scale):
    torch.manual_seed(0)
    target = FakeTarget(scale=scale)
    ids = [3, 17, 0, 39, 8]
    hidden = torch.randn(6, 8)
    full = target.compute_logits(hidden)
    sub = DraftHead(target, ids)(hidden)
    assert sub.shape == full.shape
    torch.testing.assert_close(sub[:, ids], full[:, ids])
    rest = [t for t in range(40) if t not in ids]
    assert torch.isinf(sub[:, rest]).all() and (sub[:, rest] < 0).all()
    assert torch.equal(DraftHead(target, None)(hidden), full)  # no subset: the target's head
    # The subset's rows are a buffer: the head's parameters are the target's, nothing new.
    assert [p for p in DraftHead(target, ids).parameters()] == [target.lm_head.weight]


def settings_for(user, ranking=None, tp=1):
    meta = {"draft_vocab": ranking} if ranking is not None else None
    return resolve(user, architectures=["LlamaForCausalLM"], num_hidden_layers=4, metadata=meta,
                   allowed_fields=(), tensor_parallel_size=tp)


def test_draft_vocab_size_needs_a_long_enough_ranking():
    chosen, _ = settings_for(layerskip(draft_vocab_size=3), ranking=[4, 1, 2, 9])
    assert chosen.draft_vocab_size == 3
    assert settings_for(layerskip())[0].draft_vocab_size == 0
    with pytest.raises(LayerSkipConfigError, match=r"draft_vocab_size=3 needs a ranking .* has 0\)"):
        settings_for(layerskip(draft_vocab_size=3))
    with pytest.raises(LayerSkipConfigError, match=r"has 2\).*training.token_ranking"):
        settings_for(layerskip(draft_vocab_size=3), ranking=[1, 2])
    with pytest.raises(LayerSkipConfigError, match="draft_vocab_size must be >= 0"):
        settings_for(layerskip(draft_vocab_size=-1), ranking=[1])
    with pytest.raises(LayerSkipConfigError, match="tensor_parallel_size=1"):
        settings_for(layerskip(draft_vocab_size=1), ranking=[1], tp=2)


def test_token_ranking_cli_writes_the_ranking(llama_dir, tmp_path):
    import shutil

    from tiny_models import stdlib_files
    from training.token_ranking import main

    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    main(["--model", str(model), "--data", *stdlib_files(5), "--max-ids", "100"])
    ranking = json.loads((model / "config.json").read_text())["layerskip"]["draft_vocab"]
    assert len(ranking) == 100 and len(set(ranking)) == 100
    assert all(0 <= t < 512 for t in ranking)
