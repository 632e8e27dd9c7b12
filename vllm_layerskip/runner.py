"""The LayerSkip worker: the platform's stock worker with a runner that verifies drafts
from their saved exit states.

Verification of a batch, when the previous step drafted for some of its requests:

    tokens with a saved layer-E state  ──────────────────────────────┐
                                                                     ├─> layers[E:] -> norm
    other tokens (last draft, prefills) ─> embed -> layers[:E] ──────┘

The lower half runs on a sub-batch (each request's tail) with its own attention metadata;
its KV writes land in the same cache slots a full forward would use. When nothing can be
reused, the stock forward runs unchanged; so it always does where that forward is a compiled
graph (the drafter then saves no states: see `LayerSkipProposer.reuse_exit_states`).
"""

from __future__ import annotations

import functools

import torch

from ._vllm import get_forward_context, platform_worker_class, replace_metadata
from .exit_states import ReusePlan
from .proposer import LayerSkipProposer, compiled_graph_count


class LayerSkipRunnerMixin:
    """Mixed into the platform's V1 model runner class by LayerSkipWorker."""

    def enable_layerskip(self) -> None:
        # The stock runner built a DraftModelProposer for method "draft_model"; ours is a
        # subclass of it, so every isinstance check in the runner still holds.
        self.drafter = LayerSkipProposer(self.vllm_config, self.device, self)
        self._layerskip_batch = None

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, batch = super()._build_attention_metadata(*args, **kwargs)
        self._layerskip_batch = batch  # the target batch's CommonAttentionMetadata
        return attn_metadata, batch

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None,
                       inputs_embeds=None, **model_kwargs):
        batch, self._layerskip_batch = self._layerskip_batch, None
        plan = None
        # A compiled target verifies with its stock forward: no states to plan with.
        reuse = self.drafter.reuse_exit_states
        if reuse and batch is not None and input_ids is not None and inputs_embeds is None:
            query_start_loc = batch.query_start_loc_cpu[: batch.num_reqs + 1].tolist()
            if query_start_loc[-1] == input_ids.shape[0] and not model_kwargs:
                plan = self.drafter.exit_states.plan(
                    list(self.input_batch.req_ids[: batch.num_reqs]),
                    query_start_loc,
                    input_ids,
                    positions,
                    self.drafter.exit_layer,
                )
            else:
                self.drafter.exit_states.clear()
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
        model = self.drafter.model
        lower_names = self.drafter._draft_attn_layer_names
        context = get_forward_context()
        index = plan.lower_index
        lower_positions = positions[index]

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
        _, lower_metadata = self.drafter.build_per_group_and_layer_attn_metadata(sub_batch)

        full_metadata, full_slots = context.attn_metadata, context.slot_mapping
        context.attn_metadata = {**full_metadata, **lower_metadata}
        context.slot_mapping = {**full_slots, **{name: slots for name in lower_names}}
        try:
            lower_hidden, lower_residual = model.lower_layers(input_ids[index], lower_positions)
        finally:
            context.attn_metadata, context.slot_mapping = full_metadata, full_slots

        num_tokens, width = input_ids.shape[0], lower_hidden.shape[-1]
        hidden = lower_hidden.new_empty(num_tokens, width)  # [T, d]
        residual = lower_hidden.new_empty(num_tokens, width)  # [T, d]
        hidden[index], residual[index] = lower_hidden, lower_residual
        hidden[plan.reuse_index] = plan.reuse_hidden.to(hidden.dtype)
        residual[plan.reuse_index] = plan.reuse_residual.to(residual.dtype)
        return model.upper_layers(positions, hidden, residual)


@functools.cache
def _runner_class(base: type) -> type:
    return type(f"LayerSkip{base.__name__}", (LayerSkipRunnerMixin, base), {})


class LayerSkipWorker(platform_worker_class()):
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
        # Compilations after start-up: each one stalls every request for seconds.
        stats["graphs_compiled_while_serving"] = compiled_graph_count() - drafter.graphs_at_warmup
        if drafter.switch is not None:
            stats["seconds_per_token_by_batch_bucket"] = drafter.switch.summary()
        return stats

    def layerskip_weight_sharing(self) -> dict:
        """How many draft parameters are the target's own parameter objects (all of them)."""
        target = {id(p) for p in self.model_runner.model.parameters()}
        draft = list(self.model_runner.drafter.model.parameters())
        return {
            "target_parameters": len(target),
            "draft_parameters": len(draft),
            "draft_parameters_not_in_target": sum(id(p) not in target for p in draft),
        }
