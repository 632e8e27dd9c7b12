from __future__ import annotations

import contextlib
import gc
import os
import sys
from pathlib import Path

import pytest

# vLLM's V1 runner is the one LayerSkip extends; tests never reach the network.
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import write_model, write_tokenizer  # noqa: E402

EXIT_LAYER = 2
DRAFT_LEN = 3


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="session")
def llama_dir(tiny_root) -> Path:
    """4-layer Llama whose exit at layer 2 agrees with the full model about half the time."""
    return write_model(tiny_root / "llama", tiny_root / "tokenizer", exit_layer=EXIT_LAYER, upper_scale=0.3)


@pytest.fixture(scope="session")
def qwen2_dir(tiny_root) -> Path:
    return write_model(tiny_root / "qwen2", tiny_root / "tokenizer", arch="qwen2", seed=1,
                       exit_layer=EXIT_LAYER, upper_scale=0.3)


@pytest.fixture(scope="session")
def silent_dir(tiny_root) -> Path:
    """Layers >= EXIT_LAYER add nothing: early exit equals the full model."""
    return write_model(tiny_root / "silent", tiny_root / "tokenizer", seed=2,
                       exit_layer=EXIT_LAYER, upper_scale=0.0)


def engine_kwargs(model: Path, **overrides) -> dict:
    kwargs = dict(
        model=str(model),
        dtype="float32",
        max_model_len=512,
        block_size=32,
        max_num_batched_tokens=256,  # prompts longer than this are prefilled in chunks
        enable_prefix_caching=True,
        kv_cache_memory_bytes=32 << 20,
        enforce_eager=True,
        disable_log_stats=False,
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


def layerskip(exit_layer: int = EXIT_LAYER, draft_len: int = DRAFT_LEN, **extra) -> dict:
    """Drafting pinned on (adaptive_drafting off) so every step exercises draft and verify;
    the adaptive switch has tests of its own."""
    return {"method": "layerskip", "exit_layer": exit_layer, "num_speculative_tokens": draft_len,
            "adaptive_drafting": False, **extra}


@contextlib.contextmanager
def open_engine(model: Path, *, in_process: bool | None = None, **overrides):
    """An `LLM` engine, shut down on exit.

    In process by default: the engine core and its one worker run in the test's own process
    (vLLM's `VLLM_ENABLE_V1_MULTIPROCESSING=0` with the `uni` executor), the set-up vLLM's
    own tests use. Each spawned process re-imports vLLM (~17 s on a 2-core EPYC), so an
    engine starts in ~2-5 s instead of ~35 s. Tests that need the worker in a process of its
    own (its memory, tensor parallelism through the `mp` executor) pass `in_process=False`
    or choose an executor, and get the layout users get from `LLM(...)`.
    """
    from vllm import LLM, envs

    if in_process is None:
        in_process = overrides.get("distributed_executor_backend") in (None, "uni")
    if in_process:
        overrides.setdefault("distributed_executor_backend", "uni")
    # vLLM caches its environment variables once an engine has started (in this process,
    # for an in-process engine): uncache them so that each engine reads the current ones.
    envs.disable_envs_cache()
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    try:
        llm = LLM(**engine_kwargs(model, **overrides))
    finally:
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        envs.disable_envs_cache()


def spec_counters(llm) -> dict[str, float]:
    """vLLM's standard spec-decode counters from LLM.get_metrics()."""
    out = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode_num_") and hasattr(metric, "value"):
            out[metric.name.removeprefix("vllm:spec_decode_")] = metric.value
        if metric.name == "vllm:num_preemptions" and hasattr(metric, "value"):
            out["num_preemptions"] = metric.value
    return out
