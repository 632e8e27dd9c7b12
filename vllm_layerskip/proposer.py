"""The draft: the target's own first `exit_layer` layers, its final norm and its LM head.

No weights are loaded or copied and no KV cache is allocated: `EarlyExitModel` holds
references to the target's modules, and its attention layers are the target's, so a draft
step writes the KV of layers < exit_layer straight into the target's paged cache blocks.
Those entries are exactly what the target would write for the same tokens, so
verification later reads them instead of recomputing them.

A draft round for a request whose last sampled token is `t` at position p:

    step 1: t       @ p      -> layers[:E] -> norm -> lm_head -> d1
    step 2: d1      @ p+1    -> layers[:E] -> ...             -> d2
    ...
    step K: d_{K-1} @ p+K-1  -> layers[:E] -> ...             -> dK

Tokens the target has already processed are never re-run (no re-prefill: their KV of
layers < E is already in the shared cache). The layer-E states of t, d1..d_{K-1} are kept
in `exit_states` so the verification pass only runs layers >= E for them.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ._vllm import (
    PADDING_SLOT_ID,
    CommonAttentionMetadata,
    DraftModelProposer,
    layerskip_settings,
    set_forward_context,
    target_is_compiled,
)
from .adaptive import DraftSwitch
from .exit_states import ExitStates


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (the target's and the draft's)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class EarlyExitModel(nn.Module):
    """A view of a decoder model that stops after `exit_layer` layers (shares all weights)."""

    def __init__(self, target: nn.Module, exit_layer: int):
        super().__init__()
        self.target = target
        self.exit_layer = exit_layer

    @property
    def decoder(self) -> nn.Module:
        return self.target.model

    def attention_layer_names(self) -> list[str]:
        return [layer.self_attn.attn.layer_name for layer in self.decoder.layers[: self.exit_layer]]

    def lower_layers(self, input_ids, positions, hidden=None, residual=None):
        """Embed (unless `hidden` is given) and run layers [0, exit_layer)."""
        if hidden is None:
            hidden = self.decoder.embed_input_ids(input_ids)
        for layer in self.decoder.layers[: self.exit_layer]:
            hidden, residual = layer(positions, hidden, residual)
        return hidden, residual  # both [n, d]; the residual stream is hidden + residual

    def upper_layers(self, positions, hidden, residual):
        """Run layers [exit_layer, L) and the final norm."""
        for layer in self.decoder.layers[self.exit_layer :]:
            hidden, residual = layer(positions, hidden, residual)
        return self.decoder.norm(hidden, residual)[0]

    def exit(self, hidden, residual):
        return self.decoder.norm(hidden, residual)[0]

    def forward(self, input_ids, positions, inputs_embeds=None, **_):
        hidden, residual = self.lower_layers(input_ids, positions, hidden=inputs_embeds)
        return self.exit(hidden, residual)

    def compute_logits(self, hidden_states):
        return self.target.compute_logits(hidden_states)


class LayerSkipProposer(DraftModelProposer):
    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config, device, runner=runner)
        chosen = layerskip_settings(vllm_config)
        assert chosen is not None, "LayerSkipProposer built without layerskip settings"
        self.exit_layer = chosen.exit_layer
        self.exit_states = ExitStates()
        self.runner = runner  # its input_batch names the requests of each draft row
        self.switch = DraftSwitch() if chosen.adaptive_drafting else None
        # Reusing exit states replaces the target's forward by an eager split forward. That
        # saves the FLOPs of layers < E for K tokens, but where the target runs as a compiled
        # graph (and on a CPU, where a layer costs about the same for 1 or K+1 tokens) the
        # compiled full forward is faster, so then verification recomputes them.
        self.reuse_exit_states = not target_is_compiled(vllm_config)
        self._last_step: tuple[float, int, bool] | None = None  # (start, batch, drafted)
        self._generated_tokens = 0  # tokens the last verification step produced

    def load_model(self, target_model: nn.Module) -> None:
        self.model = EarlyExitModel(target_model, self.exit_layer)
        # The "draft attention layers" are the target's own layers < exit_layer: the base
        # class builds metadata builders for them and no new KV cache is registered.
        self._draft_attn_layer_names = set(self.model.attention_layer_names())
        # Where the target runs as a compiled graph, so do the draft's layers: called eagerly,
        # a layer costs about twice its compiled self on CPU (op dispatch, unfused norms and
        # activation), and a draft step through E of L layers would cost more than E/L of a
        # full step. One graph with a symbolic token count serves every batch size.
        self.compiled_draft = target_is_compiled(self.vllm_config)
        self.lower_layers = (torch.compile(self.model.lower_layers, dynamic=True)
                             if self.compiled_draft else self.model.lower_layers)
        self.graphs_at_warmup = compiled_graph_count()

    def dummy_run(self, num_tokens: int, *args, **kwargs) -> None:
        # Start-up traces the compiled draft here rather than in the middle of a request:
        # for one token (the compiler specializes size 1) and for many, with inputs like a
        # draft step's (int64, made in inference mode: Dynamo guards on both, and a guard
        # miss would recompile for seconds while requests wait). Later calls hit the cache.
        sizes = sorted({1, max(2, num_tokens)}) if self.compiled_draft else [num_tokens]
        with torch.inference_mode():
            for n in sizes:
                tokens = torch.zeros(n, dtype=torch.int64, device=self.device)
                with set_forward_context(None, self.vllm_config, num_tokens=n):
                    self.model.exit(*self.lower_layers(tokens, torch.zeros_like(tokens)))
        self.graphs_at_warmup = compiled_graph_count()

    def prepare_next_token_ids_padded(self, sampled_token_ids, requests, input_batch, discard_mask):
        next_token_ids, valid_counts = super().prepare_next_token_ids_padded(
            sampled_token_ids, requests, input_batch, discard_mask
        )
        self._generated_tokens = int(valid_counts.sum())
        return next_token_ids, valid_counts

    def _decide_drafting(self, batch: int, decode_only: bool) -> bool:
        """Time the step that just ended and ask the switch whether to draft this one.
        Steps that also prefilled are not timed: their cost says nothing about drafting."""
        if self.switch is None:
            return True
        now = time.perf_counter()
        if self._last_step is not None and decode_only:
            started, last_batch, drafted = self._last_step
            self.switch.record(last_batch, drafted, now - started, self._generated_tokens)
        drafting = self.switch.should_draft(batch)
        self._last_step = (now, batch, drafting)
        return drafting

    def _sample_draft_tokens(self, hidden_states, sampling_metadata):
        """As vLLM's, but seeded requests draw their draft noise from their own generator,
        so a request with a seed repeats exactly (vLLM's drafts ignore seeds)."""
        generators = sampling_metadata.generators
        if not generators or sampling_metadata.all_greedy or not self._enable_probabilistic_draft_probs:
            return super()._sample_draft_tokens(hidden_states, sampling_metadata)
        logits = self.model.compute_logits(hidden_states)  # [B, V]
        temperature = sampling_metadata.temperature[: logits.shape[0]]
        greedy = temperature < 1e-5
        probs = logits.div(torch.where(greedy, 1.0, temperature).unsqueeze(1)).softmax(-1, dtype=torch.float32)
        # Sampling by argmax(p / E) with E ~ Exp(1) draws exactly from p.
        noise = torch.empty_like(probs).exponential_()
        for row, generator in generators.items():
            if row < noise.shape[0]:
                noise[row].exponential_(generator=generator)
        tokens = torch.where(greedy, probs.argmax(-1), probs.div(noise).argmax(-1))
        return tokens, probs

    def _step_metadata(
        self, verify: CommonAttentionMetadata, positions: torch.Tensor
    ) -> tuple[CommonAttentionMetadata, torch.Tensor]:
        """Attention metadata for one draft token per request at `positions` ([B])."""
        batch = positions.shape[0]
        in_range = positions < self.max_model_len
        positions = positions.clamp(max=self.max_model_len - 1)
        block_table = verify.block_table_tensor[:batch]
        block_ids = block_table.gather(1, (positions // self.block_size).unsqueeze(1)).squeeze(1)
        slots = block_ids.to(torch.int64) * self.block_size + positions % self.block_size
        slots = torch.where(in_range, slots, PADDING_SLOT_ID)
        seq_lens = (positions + 1).to(verify.seq_lens.dtype)
        arange = self.arange[: batch + 1]
        metadata = CommonAttentionMetadata(
            query_start_loc=arange,
            query_start_loc_cpu=arange.cpu(),
            seq_lens=seq_lens,
            seq_lens_cpu_upper_bound=seq_lens.cpu(),
            num_reqs=batch,
            num_actual_tokens=batch,
            max_query_len=1,
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=block_table,
            slot_mapping=slots,
            causal=True,
            positions=positions,
        )
        return metadata, slots

    def propose(
        self,
        num_speculative_tokens,
        target_token_ids,
        target_positions,
        target_hidden_states,
        next_token_ids,
        token_indices_to_sample,
        common_attn_metadata,
        sampling_metadata,
        mm_embed_inputs=None,
        num_rejected_tokens_gpu=None,
        slot_mappings=None,
    ) -> torch.Tensor:
        self._last_draft_probs = None
        verify = common_attn_metadata
        batch = verify.batch_size()
        if token_indices_to_sample is None:
            token_indices_to_sample = verify.query_start_loc[1:] - 1
        # Next token per request sits right after the last token the target accepted.
        positions = target_positions[token_indices_to_sample].to(torch.int64) + 1  # [B]
        tokens = next_token_ids.to(torch.int64)  # [B]
        start = positions.clone()
        decode_only = verify.max_query_len <= num_speculative_tokens + 1
        if not self._decide_drafting(batch, decode_only):
            num_speculative_tokens = 0
        if num_speculative_tokens == 0:
            self.exit_states.clear()
            return torch.empty(batch, 0, dtype=torch.int64, device=tokens.device)

        self.exit_states.stats.draft_tokens += batch * num_speculative_tokens
        inputs, hiddens, residuals, drafts, probs = [], [], [], [], []
        for _ in range(num_speculative_tokens):
            metadata, slots = self._step_metadata(verify, positions)
            _, per_layer = self.build_per_group_and_layer_attn_metadata(metadata)
            with set_forward_context(
                per_layer,
                self.vllm_config,
                num_tokens=batch,
                slot_mapping={name: slots for name in self._draft_attn_layer_names},
            ):
                hidden, residual = self.lower_layers(tokens, positions)
            inputs.append(tokens)
            hiddens.append(hidden)
            residuals.append(residual)
            tokens, step_probs = self._sample_draft_tokens(
                self.model.exit(hidden, residual), sampling_metadata
            )
            tokens = tokens.to(torch.int64)
            drafts.append(tokens)
            if step_probs is not None:
                probs.append(step_probs)
            positions = positions + 1

        # Keep the layer-E states for the verification pass of the next step.
        if self.reuse_exit_states:
            self.exit_states.save(
                req_ids=list(self.runner.input_batch.req_ids[:batch]),
                start_positions=start,
                tokens=torch.stack(inputs, dim=1),  # [B, K]
                hidden=torch.stack(hiddens, dim=1),  # [B, K, d]
                residual=torch.stack(residuals, dim=1),  # [B, K, d]
            )
        if probs:
            self._last_draft_probs = torch.stack(probs, dim=1).contiguous()  # [B, K, V]
        return torch.stack(drafts, dim=1)  # [B, K]
