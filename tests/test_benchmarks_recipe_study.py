"""benchmarks.recipe_study: the variant table (pure parts; the study itself trains SmolLM2)."""
from __future__ import annotations

import pytest

from benchmarks import recipe_study as rs


def _layers(agree: float, last_loss: float) -> list[dict]:
    rows = [{"layer": l, "loss": 5.0, "accuracy": 0.2, "agreement": agree * l / 30}
            for l in range(1, 30)]
    return rows + [{"layer": 30, "loss": last_loss, "accuracy": 0.55, "agreement": 1.0}]


def test_summary_compares_each_variant_with_the_untouched_import():
    results = {"untouched": {"layers": _layers(0.5, 2.0), "distinct_4gram_share": 0.6},
               "window": {"layers": _layers(1.0, 2.02), "distinct_4gram_share": 0.58,
                          "train_minutes": 12.5}}
    rows = rs.summarise(results["untouched"], results)
    win = rows[1]
    assert win["variant"] == "window"
    assert win["last_loss_change"] == pytest.approx(0.01)
    assert win["agreement_ratio"][24] == pytest.approx(2.0)
    assert rows[0]["agreement_ratio"][24] == pytest.approx(1.0)
    md = rs.table(rows)
    assert "| window | 2.020 (+1.0%) | 55.0% |" in md and "(2.00x)" in md and "12.5" in md
    assert md.count("\n") == 3   # header, rule, two rows


def test_mix_takes_code_files_of_about_the_samples_size(tmp_path):
    files = []
    for i in range(5):
        f = tmp_path / f"{i}.py"
        f.write_text("x" * 100)
        files.append(str(f))
    like = tmp_path / "d.jsonl"
    like.write_text("y" * 250)
    assert rs.same_size(files, like) == files[:3]


def test_unknown_variant_is_refused(capsys):
    with pytest.raises(SystemExit):
        rs.parse_args(["--variants", "paper,bogus"])
    assert "unknown bogus" in capsys.readouterr().err
