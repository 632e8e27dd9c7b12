"""Every vLLM internal the plugin relies on (listed in vllm_layerskip/_vllm.py) exists in
the installed vLLM with the parameters we call it with: a version bump fails here first."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

from vllm_layerskip._vllm import FIELDS, INTERNALS


def resolve(path: str):
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


@pytest.mark.parametrize("path", sorted(INTERNALS))
def test_internal_exists_with_the_expected_parameters(path):
    target = inspect.unwrap(resolve(path))  # our own wrappers keep the original's signature
    params = tuple(inspect.signature(target).parameters)
    expected = INTERNALS[path]
    assert params[: len(expected)] == expected, f"{path}: {params}"


@pytest.mark.parametrize("path", sorted(FIELDS))
def test_dataclass_has_the_fields_we_use(path):
    names = {f.name for f in dataclasses.fields(resolve(path))}
    assert set(FIELDS[path]) <= names, sorted(set(FIELDS[path]) - names)


def test_drafts_ride_with_the_output_but_never_on_the_shared_empty_one():
    """Worker side attaches the step's drafts; engine side applies them in update_from_output."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    from vllm_layerskip import _vllm
    from vllm_layerskip.runner import LayerSkipRunnerMixin
    from vllm_layerskip.sampling import StepState

    class StockRunner:
        step = StepState()

        def __init__(self, output):
            self.output = output

        def sample_tokens(self, grammar_output):
            return self.output

        def take_draft_token_ids(self):
            return "drafts of this step"

    runner_cls = type("Runner", (LayerSkipRunnerMixin, StockRunner), {})
    fresh = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    assert getattr(runner_cls(fresh).sample_tokens(None), _vllm.DRAFTS_ATTR) == "drafts of this step"
    runner_cls(EMPTY_MODEL_RUNNER_OUTPUT).sample_tokens(None)
    assert not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, _vllm.DRAFTS_ATTR)

    class Scheduler:
        applied = []

        def update_draft_token_ids(self, drafts):
            self.applied.append(drafts)

    stock_update = lambda self, scheduler_output, output: "engine outputs"  # noqa: E731
    assert _vllm._update_from_output(stock_update, Scheduler(), None, fresh) == "engine outputs"
    _vllm._update_from_output(stock_update, Scheduler(), None, EMPTY_MODEL_RUNNER_OUTPUT)
    assert Scheduler.applied == ["drafts of this step"]


class _SchedulerOutput:
    def __init__(self, scheduled: dict, drafts: dict | None = None):
        self.num_scheduled_tokens = scheduled
        self.scheduled_spec_decode_tokens = drafts or {}


def _runner(drafting: str, draft_switch=None):
    """The LayerSkip mixin over a stock runner that records which config each hook saw."""
    from vllm_layerskip.runner import LayerSkipRunnerMixin
    from vllm_layerskip.sampling import StepState

    class StockRunner:
        def __init__(self):
            self.speculative_config = "the speculative config"
            self.seen = []

        def execute_model(self, scheduler_output, intermediate_tensors=None):
            self.seen.append(("execute", self.speculative_config))

        def sample_tokens(self, grammar_output):
            self.seen.append(("sample", self.speculative_config))

        def take_draft_token_ids(self):
            return None

    runner = type("Runner", (LayerSkipRunnerMixin, StockRunner), {})()
    runner.step, runner.drafting, runner.num_spec_tokens = StepState(), drafting, 2
    runner.draft_switch, runner.plain_steps, runner.verify_switch = draft_switch, 0, None
    return runner


def _run_step(runner, scheduler_output) -> list:
    runner.seen.clear()
    runner.execute_model(scheduler_output)
    runner.sample_tokens(None)
    assert runner.speculative_config == "the speculative config"  # restored after the step
    return [config for _, config in runner.seen]


def test_a_step_that_neither_verifies_nor_drafts_runs_without_the_speculative_config():
    decode = _SchedulerOutput({"a": 1, "b": 1})
    off = _runner("off")
    assert _run_step(off, decode) == [None, None]
    assert off.plain_steps == 1
    # The first step after drafting was switched off still verifies the last drafts.
    verifying = _SchedulerOutput({"a": 3, "b": 3}, {"a": [5, 6], "b": [7, 8]})
    assert _run_step(off, verifying) == ["the speculative config"] * 2
    assert off.plain_steps == 1
    # A step that drafts (for the next one) needs the config even with nothing to verify.
    always = _runner("always")
    assert _run_step(always, decode) == ["the speculative config"] * 2
    assert always.plain_steps == 0


def test_the_adaptive_switch_decides_when_the_step_begins():
    class Switch:
        calls = []

        def step(self, batch_size, decode_only):
            self.calls.append((batch_size, decode_only))
            return batch_size == 1

    runner = _runner("adaptive", Switch())
    assert _run_step(runner, _SchedulerOutput({"a": 1})) == ["the speculative config"] * 2
    assert _run_step(runner, _SchedulerOutput({"a": 1, "b": 1})) == [None, None]
    assert _run_step(runner, _SchedulerOutput({"a": 1, "b": 40})) == [None, None]
    assert Switch.calls == [(1, True), (2, True), (2, False)]  # 40 tokens: a prefill chunk
