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
