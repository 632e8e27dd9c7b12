"""Bad LayerSkip configurations fail at start-up with one message naming the field and its
valid range; good ones come out as vLLM configs carrying the chosen settings. No engine
starts here: vLLM builds its configs (where we check) before it spawns one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import layerskip
from vllm.engine.arg_utils import EngineArgs

from vllm_layerskip import LayerSkipConfigError


def engine_config(model, spec, **kwargs):
    return EngineArgs(model=str(model), max_model_len=256, speculative_config=spec, **kwargs).create_engine_config()


@pytest.fixture(scope="module")
def with_metadata(tiny_root, llama_dir):
    """The tiny Llama with the training module's recommendation in config.json."""
    import shutil

    out = tiny_root / "llama_with_metadata"
    if not out.exists():
        shutil.copytree(llama_dir, out)
        config = json.loads((out / "config.json").read_text())
        config["layerskip"] = {"exit_layer": 1, "num_speculative_tokens": 5, "recipe": {},
                               "draft_confidence_threshold": 0.25}
        (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tiny_root):
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tiny_root / "gpt2"
    if not out.exists():
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512)).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"method": "layerskip", "num_speculative_tokens": 3}, "exit_layer is required"),
        ({"method": "layerskip", "exit_layer": 2}, "num_speculative_tokens is required"),
        (layerskip(exit_layer=0), r"exit_layer must be in \[1, 3\].*got 0"),
        (layerskip(exit_layer=-1), r"exit_layer must be in \[1, 3\].*got -1"),
        (layerskip(exit_layer=4), r"exit_layer must be in \[1, 3\].*4 decoder layers.*got 4"),
        (layerskip(draft_len=0), "num_speculative_tokens must be >= 1, got 0"),
        (layerskip(draft_len=-2), "num_speculative_tokens must be >= 1, got -2"),
        (layerskip(exit_layer="2"), "exit_layer must be an integer"),
        (layerskip(exit_layer=2.5), "exit_layer must be an integer"),
        (layerskip(foo=1), "unknown field.*foo.*allowed: exit_layer"),
        (layerskip(adaptive_drafting="yes"), "adaptive_drafting must be true or false"),
        (layerskip(draft_confidence_threshold=1.0), r"draft_confidence_threshold must be a number in \[0, 1\)"),
        (layerskip(draft_confidence_threshold=-0.1), r"draft_confidence_threshold .* got -0.1"),
        (layerskip(draft_confidence_threshold="high"), "draft_confidence_threshold must be a number"),
        (layerskip(verify_from_exit_states=1), 'verify_from_exit_states must be true, false or "adaptive"'),
        (layerskip(verify_from_exit_states="auto"), 'verify_from_exit_states must be true, false or "adaptive"'),
        (layerskip(draft_vocab_size=8), r"draft_vocab_size=8 needs a ranking"),
        (layerskip(model="other"), "unknown field.*model"),
    ],
)
def test_bad_field_is_named_with_its_range(llama_dir, spec, message):
    with pytest.raises(LayerSkipConfigError, match=message):
        engine_config(llama_dir, spec)


def test_unsupported_architecture_names_the_supported_ones(gpt2_dir):
    with pytest.raises(LayerSkipConfigError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM, Qwen2ForCausalLM"):
        engine_config(gpt2_dir, layerskip(exit_layer=1))


def test_pipeline_parallel_beyond_the_first_stage_is_refused(llama_dir):
    with pytest.raises(LayerSkipConfigError, match="pipeline_parallel_size=1.*exit_layer=3 lies beyond"):
        engine_config(llama_dir, layerskip(exit_layer=3), pipeline_parallel_size=2,
                      distributed_executor_backend="mp")


def test_metadata_supplies_defaults_and_explicit_values_win(with_metadata):
    config = engine_config(with_metadata, {"method": "layerskip"})
    assert config.additional_config["layerskip"] == {
        "exit_layer": 1, "num_speculative_tokens": 5, "adaptive_drafting": True,
        "draft_confidence_threshold": 0.25, "draft_vocab_size": 0, "verify_from_exit_states": True}
    assert config.speculative_config.num_speculative_tokens == 5
    config = engine_config(with_metadata, {"method": "layerskip", "exit_layer": 3, "adaptive_drafting": False,
                                           "draft_confidence_threshold": 0.4})
    assert config.additional_config["layerskip"] == {
        "exit_layer": 3, "num_speculative_tokens": 5, "adaptive_drafting": False,
        "draft_confidence_threshold": 0.4, "draft_vocab_size": 0, "verify_from_exit_states": True}


def test_stock_options_pass_through(llama_dir):
    config = engine_config(llama_dir, layerskip(draft_sample_method="greedy"))
    spec = config.speculative_config
    assert spec.draft_sample_method == "greedy"
    assert config.parallel_config.worker_cls == "vllm_layerskip.runner.LayerSkipWorker"
    # Probabilistic drafting is the default, so sampled requests keep their acceptance.
    assert engine_config(llama_dir, layerskip()).speculative_config.draft_sample_method == "probabilistic"


def test_other_methods_are_left_alone(llama_dir):
    config = engine_config(llama_dir, {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2})
    assert config.speculative_config.method == "ngram"
    assert "layerskip" not in (config.additional_config or {})


def test_llm_api_raises_before_starting_an_engine(llama_dir):
    from vllm import LLM

    with pytest.raises(LayerSkipConfigError, match="exit_layer must be in"):
        LLM(model=str(llama_dir), speculative_config=layerskip(exit_layer=9))


def test_vllm_serve_exits_with_the_message(llama_dir):
    cmd = [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", str(llama_dir),
           "--host", "127.0.0.1", "--port", "0", "--speculative-config", json.dumps(layerskip(draft_len=0))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, start_new_session=True)
    assert proc.returncode != 0
    assert "num_speculative_tokens must be >= 1, got 0" in proc.stderr + proc.stdout


@pytest.mark.parametrize("value,verification", [(True, "split"), (False, "stock"),
                                                ("adaptive", "adaptive")])
def test_verify_from_exit_states_names_the_verification(value, verification):
    from vllm_layerskip.settings import resolve

    settings, _ = resolve({"method": "layerskip", "exit_layer": 1, "num_speculative_tokens": 2,
                           "verify_from_exit_states": value},
                          architectures=["LlamaForCausalLM"], num_hidden_layers=4, metadata=None,
                          allowed_fields=())
    assert settings.verification == verification
    assert settings.verify_from_exit_states == value
