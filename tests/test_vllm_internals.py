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

    class StockRunner:
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
