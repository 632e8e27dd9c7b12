"""Recipe math against hand-computed values: D(l), S(t), exit scales, curricula."""
import math
from dataclasses import replace


import pytest
import torch

from training.calibrate import expected_speedup, head_layers, recommend
from training.curriculum import enabled_exits, gradual, rotational
from training.early_exit_loss import exit_scales, normalized_scales
from training.errors import ConfigError
from training.layer_dropout import depth_scale, drop_probabilities, sample_keep_mask, time_scale
from training.recipe import PRESETS, Recipe, step_plan
from training.schedule import lr_factor


def test_depth_scale_exponential_hand_values():
    # L = 4: D(l) = 2^(l/3) - 1
    assert depth_scale(0, 4) == 0.0
    assert depth_scale(1, 4) == pytest.approx(2 ** (1 / 3) - 1)  # 0.259921
    assert depth_scale(2, 4) == pytest.approx(0.587401, abs=1e-6)
    assert depth_scale(3, 4) == pytest.approx(1.0)
    assert depth_scale(1, 4, "linear") == pytest.approx(1 / 3)
    assert [depth_scale(l, 4, "uniform") for l in range(4)] == [1.0] * 4


def test_time_scale_hand_values():
    assert time_scale(0, 5, "exp") == 0.0
    assert time_scale(2, 5, "exp") == pytest.approx(math.sqrt(2) - 1)  # e^(0.5 ln2) - 1
    assert time_scale(4, 5, "exp") == pytest.approx(1.0)
    assert time_scale(2, 5) == 1.0  # constant for fine-tuning


def test_drop_probabilities_product():
    probs = drop_probabilities(4, 2, 5, 0.2, "exp", "exp")
    assert probs[0] == 0.0
    assert probs[3] == pytest.approx(0.2 * (math.sqrt(2) - 1))
    assert probs[2] == pytest.approx(0.2 * (math.sqrt(2) - 1) * (2 ** (2 / 3) - 1))


def test_keep_mask_rate():
    mask = sample_keep_mask([0.0, 0.5, 0.9], 20000, torch.Generator().manual_seed(0))
    assert mask.shape == (3, 20000)
    assert mask[0].all()
    assert mask[1].float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert mask[2].float().mean().item() == pytest.approx(0.1, abs=0.02)


def test_exit_scales_paper_default():
    # L = 5, e_scale = 0.5: e(l) = 0.5 * l(l+1)/2 for l < 4; e(4) = 4 + 0.5 * (0+1+2+3)
    assert exit_scales(5, 0.5) == pytest.approx([0.0, 0.5, 1.5, 3.0, 7.0])
    assert exit_scales(3, 1.0, "linear") == pytest.approx([0.0, 1.0, 3.0])
    assert exit_scales(3, 0.2, "uniform") == pytest.approx([0.2, 0.2, 2.2])
    assert exit_scales(4, 0.0) == [0.0, 0.0, 0.0, 3.0]


def test_normalized_scales():
    w = normalized_scales([0.0, 0.5, 1.5, 3.0, 7.0], [True, False, True, False, True])
    assert w == pytest.approx([0.0, 0.0, 1.5 / 8.5, 0.0, 7.0 / 8.5])
    assert sum(w) == pytest.approx(1.0)
    assert normalized_scales([0.0, 0.0, 3.0], [True] * 3) == [0.0, 0.0, 1.0]


def test_rotational_curriculum():
    # L = 6, R = 2: even layers on at even steps, odd at odd; the last is always on.
    assert rotational(0, 6, 2) == [True, False, True, False, True, True]
    assert rotational(1, 6, 2) == [False, True, False, True, False, True]
    assert rotational(3, 6, 4) == [False, False, False, True, False, True]
    # every layer is on exactly once in any R consecutive steps
    for l in range(5):
        assert sum(rotational(t, 6, 4)[l] for t in range(7, 11)) == 1


def test_gradual_curriculum():
    # L = 4, T = 16: one more exit every T/(2L) = 2 steps, all on from step 6 (< T/2).
    on = [sum(gradual(t, 4, 16)) for t in range(10)]
    assert on == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    assert gradual(2, 4, 16) == [False, False, True, True]
    assert enabled_exits("none", 3, 4, 16) == [True] * 4


def test_step_plan_combines():
    r = Recipe(0.2, "exp", "constant", 1.0, "sum", "rotational", 2)
    plan = step_plan(r, 1, 10, 4)  # exits 1 and 3 on; e = [0, 1, 3, 6]
    assert plan.exit_weights == pytest.approx([0, 1 / 7, 0, 6 / 7])
    assert plan.drop_probs[-1] == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs, flag", [
    ({"layer_dropout_max": 1.0}, "--layer-dropout-max"),
    ({"layer_dropout_max": -0.1}, "--layer-dropout-max"),
    ({"early_exit_scale": -1.0}, "--early-exit-scale"),
    ({"rotation_period": 0}, "--rotation-period"),
    ({"curriculum": "zigzag"}, "--curriculum"),
])
def test_recipe_validation(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        Recipe(**kwargs).validate()


def test_presets_match_paper():
    assert PRESETS["continual-pretraining"].rotation_period == 8
    assert PRESETS["pretraining"].layer_dropout_time_scale == "exp"
    cf, tf = PRESETS["code-finetuning"], PRESETS["task-finetuning"]
    assert (cf.layer_dropout_max, cf.early_exit_scale, cf.rotation_period) == (0.1, 1.0, 16)
    assert (tf.layer_dropout_max, tf.early_exit_scale, tf.curriculum) == (0.2, 1.0, "gradual")
    for p in PRESETS.values():
        p.validate()


def test_expected_speedup_and_recommend():
    # a = 0.5, K = 2: (1 - 0.125)/0.5 = 1.75 tokens; cost 2 * 1/4 + 1 = 1.5
    assert expected_speedup(0.5, 1, 4, 2) == pytest.approx(1.75 / 1.5)
    assert expected_speedup(1.0, 2, 4, 3) == pytest.approx(4 / 2.5)
    assert expected_speedup(0.0, 1, 4, 1) == pytest.approx(1 / 1.25)
    rec = recommend([0.2, 0.9, 0.95, 1.0])
    assert rec["exit_layer"] == 2 and 1 <= rec["num_speculative_tokens"] <= 8
    best = rec["calibration"]["best_expected_speedup"]
    assert best == pytest.approx(max(expected_speedup(a, e, 4, k) for e, a in ((1, .2), (2, .9), (3, .95))
                                     for k in range(1, 9)), abs=1e-4)


def test_head_priced_in_layers():
    # SmolLM2-135M: 49,152 x 576 head; a layer holds 576*64*(2*9 + 2*3) + 3*576*1536 weights
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    h = head_layers(cfg)
    assert h == pytest.approx(49152 * 576 / (576 * 64 * 24 + 3 * 576 * 1536))
    assert 7.5 < h < 8.5
    # a draft through 10 of 30 layers costs (10 + H) / (30 + H) of a step, not 10/30
    assert expected_speedup(1.0, 10, 30, 1, h) == pytest.approx(2 / ((10 + h) / (30 + h) + 1))
    assert expected_speedup(1.0, 10, 30, 1, h) < expected_speedup(1.0, 10, 30, 1)
    # every draft step now pays the head too: fewer draft tokens pay for themselves
    agreement = [0.6] * 2 + [0.9] * 8 + [1.0] * 20
    cheap, dear = recommend(agreement), recommend(agreement, head=h)
    assert (cheap["exit_layer"], cheap["num_speculative_tokens"]) == (3, 8)
    assert (dear["exit_layer"], dear["num_speculative_tokens"]) == (3, 5)
    assert dear["calibration"]["best_expected_speedup"] < cheap["calibration"]["best_expected_speedup"]
    assert dear["calibration"]["head_layers"] == round(h, 3)
    assert "(E+H)/(L+H)" in dear["calibration"]["cost_model"]


def test_lr_schedule():
    assert lr_factor(0, 4, 20) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.0) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_metadata_update_keeps_the_config_files_mode(tmp_path):
    """The atomic rewrite of config.json goes through a private temp file; the result keeps
    the mode the file had (a shipped model stays readable by everyone)."""
    import json
    import os

    from training.metadata import write_layerskip_metadata

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"layerskip": {"exit_layer": 1}}))
    os.chmod(path, 0o644)
    assert write_layerskip_metadata(tmp_path, {"num_speculative_tokens": 2}) == {
        "exit_layer": 1, "num_speculative_tokens": 2}
    assert path.stat().st_mode & 0o777 == 0o644


def test_exit_window_limits_the_trained_exits():
    # L = 8, no curriculum: only exits 3..5 (layer indices 2..4) and the last layer train.
    r = Recipe(0.0, "exp", "constant", 1.0, "uniform", "none", 1, min_exit_layer=3,
               max_exit_layer=5)
    w = step_plan(r, 0, 10, 8).exit_weights
    assert [i for i, x in enumerate(w) if x > 0] == [2, 3, 4, 7]
    assert sum(w) == pytest.approx(1.0)
    # the default window is every exit, so the paper's plan is unchanged
    full = step_plan(replace(r, min_exit_layer=1, max_exit_layer=0), 0, 10, 8).exit_weights
    assert all(x > 0 for x in full)
    # with a rotational curriculum the window only removes exits, never adds one
    rot = Recipe(0.0, "exp", "constant", 1.0, "uniform", "rotational", 4, min_exit_layer=3)
    for t in range(8):
        on = [x > 0 for x in step_plan(rot, t, 10, 8).exit_weights]
        assert on == [l % 4 == t % 4 and l >= 2 or l == 7 for l in range(8)]


@pytest.mark.parametrize("kwargs, flag", [
    ({"min_exit_layer": 0}, "--min-exit-layer"),
    ({"min_exit_layer": 5, "max_exit_layer": 4}, "--max-exit-layer"),
])
def test_exit_window_validation(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        Recipe(**kwargs).validate()


def test_exit_window_must_fit_the_model():
    Recipe(min_exit_layer=7).check_depth(8)
    with pytest.raises(ConfigError, match="--min-exit-layer must be below the model's 8 layers"):
        Recipe(min_exit_layer=8).check_depth(8)
