"""training.self_distill: the model's own samples as training data."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import stdlib_files, write_model, write_tokenizer

from training.data import collect_files, read_documents
from training.errors import ConfigError
from training.self_distill import main, prompt_windows, sample_continuations


class _Tok:
    def __call__(self, text):
        return type("Enc", (), {"input_ids": [ord(c) for c in text]})()


def test_prompt_windows_are_document_slices_of_one_length():
    texts = ["abcdefghij", "xy", "0123456789ABCDEF"]
    windows = prompt_windows(texts, _Tok(), count=7, length=4, seed=3)
    assert len(windows) == 7 and all(len(w) == 4 for w in windows)
    joined = ["".join(map(chr, w)) for w in windows]
    assert all(w in texts[0] or w in texts[2] for w in joined)   # "xy" is too short to use
    assert {w in texts[0] for w in joined} == {True, False}      # both long documents cycle in
    assert windows == prompt_windows(texts, _Tok(), count=7, length=4, seed=3)  # seeded


def test_no_document_long_enough_names_the_flag():
    from training.errors import DataError
    with pytest.raises(DataError, match="--prompt-tokens 50"):
        prompt_windows(["short"], _Tok(), count=1, length=50, seed=0)


class _Fixed(torch.nn.Module):
    """generate() that appends a fixed row, EOS (id 0) in the middle of the second."""
    def generate(self, ids, **kw):
        tail = torch.tensor([[5, 6, 7], [8, 0, 9]])[: len(ids)]
        assert kw["do_sample"] and kw["top_k"] == 0 and kw["top_p"] == 1.0
        return torch.cat([ids, tail], dim=1)


def test_continuations_stop_at_eos():
    rows = list(sample_continuations(_Fixed(), [[1, 2], [3, 4]], 3, 1.0, batch_size=2,
                                     eos_id=0, progress=False))
    assert rows == [([1, 2], [5, 6, 7]), ([3, 4], [8])]


def test_writes_jsonl_that_training_reads(tmp_path):
    write_tokenizer(tmp_path / "tok")
    model = write_model(tmp_path / "m", tmp_path / "tok", seed=0, exit_layer=2, upper_scale=0.3)
    out = tmp_path / "d" / "distill.jsonl"
    main(["--model", str(model), "--data", *stdlib_files(4), "--output", str(out),
          "--num-sequences", "5", "--prompt-tokens", "8", "--new-tokens", "6",
          "--batch-size", "2", "--dtype", "float32", "--no-progress"])
    lines = out.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(l)["text"] for l in lines)
    assert len(list(read_documents(collect_files([str(out)])))) == 5
    assert not list(out.parent.glob(".tmp-*"))


@pytest.mark.parametrize("flags, field", [
    (["--temperature", "0"], "--temperature"),
    (["--num-sequences", "0"], "--num-sequences"),
    (["--output", "x.txt"], "--output"),
])
def test_bad_flags_name_the_field(tmp_path, flags, field):
    base = ["--model", str(tmp_path), "--data", "x", "--output", str(tmp_path / "o.jsonl")]
    with pytest.raises(ConfigError, match=field):
        main(base + flags)
