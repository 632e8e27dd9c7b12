"""training.completions: greedy completions of held-out prompts and their repetition figure."""
from __future__ import annotations

import json

import pytest
from tiny_models import stdlib_files, write_model, write_tokenizer

from training.completions import distinct_ngram_share, main


def test_distinct_ngram_share():
    assert distinct_ngram_share([1, 2, 3, 4, 5, 6]) == 1.0       # 3 distinct 4-grams of 3
    assert distinct_ngram_share([7] * 10) == pytest.approx(1 / 7)  # 7 copies of one 4-gram
    assert distinct_ngram_share([1, 2, 3, 4, 1, 2, 3, 4, 1]) == pytest.approx(4 / 6)
    assert distinct_ngram_share([1, 2]) == 1.0                     # too short to repeat


def test_completes_every_prompt_for_every_model(tmp_path, capsys):
    write_tokenizer(tmp_path / "tok")
    models = [write_model(tmp_path / f"m{i}", tmp_path / "tok", seed=i, exit_layer=2, upper_scale=0.3)
              for i in range(2)]
    out = tmp_path / "completions.json"
    main(["--model", *map(str, models), "--data", *stdlib_files(6), "--json", str(out),
          "--num-prompts", "3", "--prompt-tokens", "16", "--max-new-tokens", "12"])
    reports = json.loads(out.read_text())
    assert [r["model"] for r in reports] == list(map(str, models))
    for r in reports:
        assert len(r["completions"]) == 3
        assert all(c["completion"] and 0 < c["distinct_4gram_share"] <= 1 for c in r["completions"])
        mean = sum(c["distinct_4gram_share"] for c in r["completions"]) / 3
        assert r["distinct_4gram_share"] == pytest.approx(mean, abs=1e-4)
    # same prompts for both models
    assert [c["prompt"] for c in reports[0]["completions"]] == [c["prompt"] for c in reports[1]["completions"]]
    assert "distinct 4-gram share" in capsys.readouterr().out


def test_bad_flags_name_the_field(tmp_path):
    from training.errors import ConfigError

    with pytest.raises(ConfigError, match="--max-new-tokens must be >= 1"):
        main(["--model", str(tmp_path), "--data", str(tmp_path), "--json", str(tmp_path / "o.json"),
              "--max-new-tokens", "0"])
