"""The LayerSkip worker: the platform's stock worker with a runner that verifies drafts
from their saved exit states.

Verification of a batch, when the previous step drafted for some of its requests:

    tokens with a saved layer-E state  ──────────────────────────────┐
                                                                     ├─> layers[E:] -> norm
    other tokens (last draft, prefills) ─> embed -> layers[:E] ──────┘

The lower half runs on a sub-batch (each request's tail) with its own attention metadata;
its KV writes land in the same cache slots a full forward would use. Where the target is
compiled, both halves are too (the drafter's `lower_layers` / `upper_layers`). When nothing
can be reused (prefill-only steps, no drafts), the stock forward runs unchanged.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from typing_extensions import override

from ._vllm import (
    DRAFTS_ATTR,
    EMPTY_MODEL_RUNNER_OUTPUT,
    ModelRunnerOutput,
    get_forward_context,
    layerskip_settings,
    platform_worker_class,
    replace_metadata,
)
from .adaptive import DRAFTING_MODES, DraftingMode, DraftSwitch, VerifySwitch
from .exit_states import ReusePlan
from .proposer import LayerSkipProposer, compiled_graph_count
from .rejection import LayerSkipRejectionSampler, with_seeded_rows
from .sampling import SeededRows, StepState, reseed
from .settings import ADAPTIVE

# How drafts are verified: layers >= E from the saved exit states, the stock forward, or
# whichever measures faster (VerifySwitch).
VERIFICATION_MODES = ("split", "stock", ADAPTIVE)


class LayerSkipRunnerMixin:
    """Mixed into the platform's V1 model runner class by LayerSkipWorker."""

    def enable_layerskip(self) -> None:
        # The stock runner built a DraftModelProposer for method "draft_model"; ours is a
        # subclass of it, so every isinstance check in the runner still holds.
        self.step = StepState()
        settings = layerskip_settings(self.vllm_config)
        self.draft_switch = DraftSwitch()
        self.drafting: DraftingMode = "adaptive" if settings.adaptive_drafting else "always"
        self.drafter = LayerSkipProposer(self.vllm_config, self.device, self,
                                         step=self.step,
                                         noise_sampler=self.sampler.topk_topp_sampler)
        self.rejection_sampler = LayerSkipRejectionSampler(
            self.sampler, self.speculative_config, self.device)
        self.engine_draft_fetches = 0  # take_draft_token_ids calls from the engine core
        self.plain_steps = 0  # steps run on vLLM's non-speculative path
        self.verify_switch: VerifySwitch | None = None
        self.set_verification(settings.verification)

    @override
    def _update_states(self, scheduler_output):
        """The stock bookkeeping, then drop what we hold for requests that are gone."""
        result = super()._update_states(scheduler_output)
        self.drafter.exit_states.forget(scheduler_output.finished_req_ids)
        if self.input_batch.num_reqs == 0:
            self.step.req_ids, self.step.seeded = [], None
        return result

    def live_request_states(self) -> int:
        """Requests some LayerSkip state of this worker still refers to."""
        step = self.step
        return (self.drafter.exit_states.live_requests() + len(step.req_ids)
                + (len(step.seeded.seeds) if step.seeded else 0))

    def _seeded_rows(self) -> SeededRows | None:
        generators = self.input_batch.generators  # row -> generator, seeded requests only
        if not generators:
            return None
        num_reqs = self.input_batch.num_reqs
        next_positions = (self.input_batch.num_computed_tokens_cpu[:num_reqs]
                          + self.num_scheduled_tokens.np[:num_reqs]).tolist()
        seeds = {row: self.requests[self.input_batch.req_ids[row]].sampling_params.seed
                 for row in generators}
        return SeededRows(seeds, next_positions)

    def _step_drafts(self, scheduled: dict[str, int]) -> bool:
        """Whether this step drafts for the next one (the switch decides in adaptive mode)."""
        if not scheduled:
            return False
        if self.drafting != "adaptive":
            return self.drafting == "always"
        return self.draft_switch.step(len(scheduled), self._decode_only(scheduled))

    def _choose_verification(self, scheduled: dict[str, int], drafts: bool) -> None:
        """With adaptive verification, whether this step's drafts save their layer-E states
        for split verification in the next step, or leave it to the stock forward."""
        if self.verify_switch is None:
            return
        if not drafts:
            self.verify_switch.restart()
            return
        self.drafter.reuse_exit_states = self.verify_switch.step(
            len(scheduled), self._decode_only(scheduled))

    def _decode_only(self, scheduled: dict[str, int]) -> bool:
        return max(scheduled.values()) <= self.num_spec_tokens + 1

    @contextmanager
    def _speculation_hidden(self, hidden: bool):
        """While `hidden`, the runner sees no speculative config, so it takes vLLM's
        non-speculative path: no spec-decode metadata, no rejection sampler, no drafter
        call, no draft-token copies."""
        if not hidden:
            yield
            return
        config, self.speculative_config = self.speculative_config, None
        try:
            yield
        finally:
            self.speculative_config = config

    @override
    def execute_model(self, scheduler_output, intermediate_tensors=None):
        """A step that neither verifies drafts nor drafts runs as plain vLLM's step does
        (drafting off, or the switch chose plain decoding for this batch size): what a
        configured but idle LayerSkip costs is then only these few lines."""
        step = self.step
        scheduled = scheduler_output.num_scheduled_tokens  # req_id -> tokens this step
        step.drafts = self._step_drafts(scheduled)
        self._choose_verification(scheduled, step.drafts)
        step.plain = not step.drafts and not scheduler_output.scheduled_spec_decode_tokens
        self.plain_steps += step.plain and bool(scheduler_output.num_scheduled_tokens)
        with self._speculation_hidden(step.plain):
            return super().execute_model(scheduler_output, intermediate_tensors)

    @override
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata,
                                hidden_states, sample_hidden_states, aux_hidden_states,
                                spec_decode_metadata, common_attn_metadata, slot_mappings):
        """Called in every step that is not plain; drafts only if the step decided to (a
        step that verifies the last drafts but drafts none returns an empty round)."""
        if not self.step.drafts:
            return self.drafter.skip_round(self.input_batch.num_reqs)
        return super().propose_draft_token_ids(
            scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
            sample_hidden_states, aux_hidden_states, spec_decode_metadata,
            common_attn_metadata, slot_mappings)

    @override
    def _sample(self, logits, spec_decode_metadata):
        """A step in which no request has drafts samples as plain vLLM does (vLLM sends
        every step of a speculative engine through the rejection sampler). Seeded requests
        draw the token at position n from `position_key(seed, n)`, not from a stream whose
        use depends on the batch (see sampling.py)."""
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            spec_decode_metadata = None
        seeded = self._seeded_rows()
        self.step.req_ids = list(self.input_batch.req_ids[: self.input_batch.num_reqs])
        self.step.seeded = seeded
        if seeded is not None:
            reseed(self.input_batch.generators, seeded.seeds, seeded.next_positions)
            if spec_decode_metadata is not None:
                spec_decode_metadata = with_seeded_rows(spec_decode_metadata, seeded)
        output = super()._sample(logits, spec_decode_metadata)
        if switches := self._timing_switches():
            generated = int((output.sampled_token_ids >= 0).sum())
            for switch in switches:
                switch.tokens_generated(generated)
        return output

    def _timing_switches(self) -> list[DraftSwitch]:
        """The switches that time this engine's steps: drafting's in adaptive mode, and
        verification's when it is adaptive."""
        switches = [self.draft_switch] if self.drafting == "adaptive" else []
        return switches + ([self.verify_switch] if self.verify_switch is not None else [])

    @override
    def sample_tokens(self, grammar_output):
        """The stock step, with its draft tokens attached to the output it returns, so the
        engine core needs no second message to fetch them (_vllm.py, DRAFTS_ATTR)."""
        with self._speculation_hidden(self.step.plain):
            output = super().sample_tokens(grammar_output)
        # Not the async-scheduling output, and never vLLM's shared empty instance.
        if isinstance(output, ModelRunnerOutput) and output is not EMPTY_MODEL_RUNNER_OUTPUT:
            setattr(output, DRAFTS_ATTR, super().take_draft_token_ids())
        return output

    @override
    def take_draft_token_ids(self):
        self.engine_draft_fetches += 1  # a LayerSkip engine core should never ask
        return super().take_draft_token_ids()

    def set_drafting(self, mode: DraftingMode) -> None:
        if mode not in DRAFTING_MODES:
            raise ValueError(f"drafting mode must be one of {', '.join(DRAFTING_MODES)}, got {mode!r}")
        if mode != self.drafting:
            self.draft_switch.restart()  # its open step, if any, spans the change: not timed
        self.drafting = mode

    def set_verification(self, mode: str) -> None:
        """"split", "stock", or "adaptive" (a fresh VerifySwitch measures both)."""
        if mode not in VERIFICATION_MODES:
            raise ValueError(f"verification mode must be one of {', '.join(VERIFICATION_MODES)}, "
                             f"got {mode!r}")
        self.verify_switch = VerifySwitch() if mode == ADAPTIVE else None
        if mode != ADAPTIVE:
            self.drafter.reuse_exit_states = mode == "split"

    def verification(self) -> str:
        if self.verify_switch is not None:
            return ADAPTIVE
        return "split" if self.drafter.reuse_exit_states else "stock"

    @override
    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, batch = super()._build_attention_metadata(*args, **kwargs)
        self.step.target_batch = batch
        return attn_metadata, batch

    @override
    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None,
                       inputs_embeds=None, **model_kwargs):
        batch = self.step.take_target_batch()
        exit_states, plan = self.drafter.exit_states, None
        if batch is not None and input_ids is not None and inputs_embeds is None and not model_kwargs:
            num_tokens = int(batch.query_start_loc_cpu[batch.num_reqs])
            if not exit_states.holds_states():  # nothing drafted last step: nothing to plan
                exit_states.count_full_pass(num_tokens, self.drafter.exit_layer)
            elif num_tokens == input_ids.shape[0]:
                plan = exit_states.plan(
                    list(self.input_batch.req_ids[: batch.num_reqs]),
                    batch.query_start_loc_cpu[: batch.num_reqs + 1].tolist(),
                    input_ids,
                    positions,
                    self.drafter.exit_layer,
                )
        if plan is None:
            exit_states.clear()  # states live for one step, used or not
        if plan is None or not isinstance(get_forward_context().attn_metadata, dict):
            return super()._model_forward(
                input_ids=input_ids,
                positions=positions,
                intermediate_tensors=intermediate_tensors,
                inputs_embeds=inputs_embeds,
                **model_kwargs,
            )
        return self._forward_from_exit_states(plan, batch, input_ids, positions)

    def _forward_from_exit_states(self, plan: ReusePlan, batch, input_ids, positions):
        drafter = self.drafter
        lower_names = drafter.draft_layer_names
        context = get_forward_context()
        index = plan.lower_index
        # Inputs as the compiled halves were traced with (int64 ids, tensors made in
        # inference mode; the runner's buffers are int32 and not): a guard miss would
        # recompile in the middle of serving.
        positions = positions.clone()
        lower_ids, lower_positions = input_ids[index].to(torch.int64), positions[index]

        # Attention metadata of the sub-batch: each request keeps its sequence length
        # and block table, its query shrinks to the tail that runs layers < E.
        query_lens = torch.tensor(plan.lower_query_lens, dtype=torch.int32)
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        torch.cumsum(query_lens, 0, out=query_start_loc[1:])
        slots = context.slot_mapping[next(iter(lower_names))][index]
        sub_batch = replace_metadata(
            batch,
            query_start_loc=query_start_loc.to(input_ids.device),
            query_start_loc_cpu=query_start_loc,
            num_actual_tokens=index.numel(),
            max_query_len=int(query_lens.max()),
            slot_mapping=slots,
            positions=lower_positions,
        )
        _, lower_metadata = drafter.build_per_group_and_layer_attn_metadata(sub_batch)

        full_metadata, full_slots = context.attn_metadata, context.slot_mapping
        context.attn_metadata = {**full_metadata, **lower_metadata}
        context.slot_mapping = {**full_slots, **{name: slots for name in lower_names}}
        try:
            lower_hidden, lower_residual = drafter.lower_layers(lower_ids, lower_positions)
        finally:
            context.attn_metadata, context.slot_mapping = full_metadata, full_slots

        num_tokens, width = input_ids.shape[0], lower_hidden.shape[-1]
        hidden = lower_hidden.new_empty(num_tokens, width)  # [T, d]
        residual = lower_hidden.new_empty(num_tokens, width)  # [T, d]
        hidden[index], residual[index] = lower_hidden, lower_residual
        hidden[plan.reuse_index] = plan.reuse_hidden.to(hidden.dtype)
        residual[plan.reuse_index] = plan.reuse_residual.to(residual.dtype)
        return drafter.upper_layers(positions, hidden, residual)


@functools.cache
def _runner_class(base: type) -> type:
    return type(f"LayerSkip{base.__name__}", (LayerSkipRunnerMixin, base), {})


class LayerSkipWorker(platform_worker_class()):
    @override
    def init_device(self) -> None:
        super().init_device()
        runner = self.model_runner
        runner.__class__ = _runner_class(type(runner))
        runner.enable_layerskip()

    def layerskip_stats(self) -> dict:
        """Exit-state reuse counters and the adaptive switch's timings (LLM.collective_rpc)."""
        drafter = self.model_runner.drafter
        stats = drafter.exit_states.stats.as_dict()
        stats["compiled_draft"] = drafter.compiled_draft
        stats["live_request_states"] = self.model_runner.live_request_states()
        stats["engine_draft_fetches"] = self.model_runner.engine_draft_fetches
        stats["plain_steps"] = self.model_runner.plain_steps
        # Compilations after start-up: each one stalls every request for seconds.
        stats["graphs_compiled_while_serving"] = compiled_graph_count() - drafter.graphs_at_warmup
        stats["drafting"] = self.model_runner.drafting
        stats["verification"] = self.model_runner.verification()
        stats["seconds_per_token_by_batch_bucket"] = self.model_runner.draft_switch.summary()
        verify_switch = self.model_runner.verify_switch
        stats["verify_seconds_per_token_by_batch_bucket"] = (
            verify_switch.summary() if verify_switch is not None else {})
        return stats

    def layerskip_set_drafting(self, mode: str) -> str:
        """Switch drafting at run time, no restart (LLM.collective_rpc or the dev route
        /collective_rpc): "adaptive" (the switch decides per batch-size bucket), "always",
        or "off" (every step takes vLLM's non-speculative sampling path). Returns the mode."""
        self.model_runner.set_drafting(mode)
        return mode

    def layerskip_set_verification(self, mode: str) -> str:
        """Switch verification at run time, no restart: "split" (layers >= E only for
        drafted tokens whose layer-E state was saved; `verify_from_exit_states: true`),
        "stock" (the stock forward over every layer) or "adaptive" (measure both per
        batch-size bucket). Takes effect from the next draft. Returns the mode. Lets a
        benchmark compare them in one engine life."""
        self.model_runner.set_verification(mode)
        return mode

    def layerskip_weight_sharing(self) -> dict:
        """How many draft parameters are the target's own parameter objects (all of them)."""
        target = {id(p) for p in self.model_runner.model.parameters()}
        draft = list(self.model_runner.drafter.model.parameters())
        return {
            "target_parameters": len(target),
            "draft_parameters": len(draft),
            "draft_parameters_not_in_target": sum(id(p) not in target for p in draft),
        }
