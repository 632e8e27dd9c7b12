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
from typing_extensions import override

from ._vllm import (
    PADDING_SLOT_ID,
    CommonAttentionMetadata,
    DraftModelProposer,
    layerskip_draft_vocab,
    layerskip_settings,
    set_forward_context,
    target_is_compiled,
)
from .draft_head import DraftHead
from .exit_states import ExitStates
from .sampling import NoiseSampler, StepState, keyed_generators, sample_draft


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (the target's and the draft's)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def input_guards_only(guards) -> list[bool]:
    """Dynamo guard filter for the draft's and the verification's compiled halves: keep the
    guards on the call's own inputs (dtype, shape, the token count's range) and on ambient
    state (grad mode and the like); drop those on module attributes, weights and globals.
    The model's modules and weights do not change while serving, and by default each call
    re-checked ~1,000 of them (many as Python lambdas): py-spy put ~1.2 ms per call of a
    10-layer upper half in Dynamo's frame wrapper (shipped model, batch 1), about a tenth of
    a decode step."""
    return [not guard.is_global and not (guard.orig_guard.source is not None
                                         and guard.orig_guard.source.is_unspecialized_nn_module())
            for guard in guards]


# Inductor's runtime checks of each input's size, stride and alignment are off, as vLLM
# turns them off for the target's graph on CPU: Dynamo's input guards already check what
# the graph was traced for, and the checks ran ~90 times per call of a 10-layer half.
# Measured (shipped model, float32, 2-core AMD EPYC, one call timed 300 times, variants
# turn about): 2-3% of a half's call time, 0.1-0.3 ms.
HALF_COMPILE_OPTIONS = {
    "guard_filter_fn": input_guards_only,
    "size_asserts": False,
    "alignment_asserts": False,
    "scalar_asserts": False,
    "nan_asserts": False,
}


class EarlyExitModel(nn.Module):
    """A view of a decoder model that stops after `exit_layer` layers (shares all weights)."""

    def __init__(self, target: nn.Module, exit_layer: int, draft_vocab: list[int] | None = None):
        super().__init__()
        self.target = target
        self.exit_layer = exit_layer
        self.head = DraftHead(target, draft_vocab)  # the full LM head unless a subset is given

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
        return self.head(hidden_states)


class LayerSkipProposer(DraftModelProposer):
    def __init__(self, vllm_config, device, runner, step: StepState, noise_sampler: NoiseSampler):
        super().__init__(vllm_config, device, runner=runner)
        chosen = layerskip_settings(vllm_config)
        assert chosen is not None, "LayerSkipProposer built without layerskip settings"
        self.exit_layer = chosen.exit_layer
        self.exit_states = ExitStates()
        # The runner's: which request and seed each draft row belongs to, and the target
        # sampler's noise step.
        self.step = step
        self.noise_sampler = noise_sampler
        self.confidence_threshold = chosen.draft_confidence_threshold
        # Save the layer-E states of the drafted tokens, so that verification runs only
        # layers >= E for them (runner.py); off: the stock forward verifies. With adaptive
        # verification the runner sets it step by step.
        self.reuse_exit_states = chosen.verification != "stock"

    @override
    def load_model(self, target_model: nn.Module) -> None:
        self.model = EarlyExitModel(target_model, self.exit_layer,
                                    layerskip_draft_vocab(self.vllm_config))
        # The "draft attention layers" are the target's own layers < exit_layer: the base
        # class builds metadata builders for them and no new KV cache is registered.
        self._draft_attn_layer_names = set(self.model.attention_layer_names())
        # Where the target runs as a compiled graph, so do the draft's layers: called eagerly,
        # a layer costs about twice its compiled self on CPU (op dispatch, unfused norms and
        # activation), and a draft step through E of L layers would cost more than E/L of a
        # full step. One graph with a symbolic token count serves every batch size.
        # The verification's upper half is compiled the same way.
        self.compiled_draft = target_is_compiled(self.vllm_config)
        compile_ = ((lambda f: torch.compile(f, dynamic=True, options=HALF_COMPILE_OPTIONS))
                    if self.compiled_draft else (lambda f: f))
        self.lower_layers = compile_(self.model.lower_layers)
        self.upper_layers = compile_(self.model.upper_layers)
        self.graphs_at_warmup = compiled_graph_count()

    @property
    def draft_layer_names(self) -> set[str]:
        """Attention layers the draft runs (the target's layers < exit_layer)."""
        return self._draft_attn_layer_names

    @override
    def dummy_run(self, num_tokens: int, *args, **kwargs) -> None:
        # Start-up traces the compiled draft here rather than in the middle of a request:
        # for one token (the compiler specializes size 1) and for many, with inputs like a
        # draft step's (int64, made in inference mode: Dynamo guards on both, and a guard
        # miss would recompile for seconds while requests wait). Later calls hit the cache.
        sizes = sorted({1, max(2, num_tokens)}) if self.compiled_draft else [num_tokens]
        with torch.inference_mode():
            for n in sizes:
                tokens = torch.zeros(n, dtype=torch.int64, device=self.device)
                positions = torch.zeros_like(tokens)
                with set_forward_context(None, self.vllm_config, num_tokens=n):
                    hidden, residual = self.lower_layers(tokens, positions)
                    self.model.exit(hidden, residual)
                    # A verification pass holds at least two tokens (a reused state and the
                    # last draft token): the one-token upper graph would never run. Traced
                    # even when the stock forward verifies, so that the worker can switch to
                    # split verification at run time without compiling mid-serving.
                    if n > 1:
                        self.upper_layers(positions, hidden, residual)
        self.graphs_at_warmup = compiled_graph_count()

    def skip_round(self, batch: int) -> torch.Tensor:
        """No drafts this step: [B, 0], and no saved states to match."""
        self.exit_states.clear()
        return torch.empty(batch, 0, dtype=torch.int64, device=self.device)

    def _draft_tokens(self, hidden, residual, sampling_metadata, positions):
        """Draft tokens at `positions` ([B]) with the request's temperature, top-k and top-p
        (a seeded request's noise keyed by its seed and the position, sampling.py).
        Returns tokens [B], their distribution q [B, V] (None when drafting greedily) and
        the probability of each drafted token under q [B] (None unless it is needed)."""
        logits = self.model.compute_logits(self.model.exit(hidden, residual))  # [B, V]
        if sampling_metadata.all_greedy or not self._enable_probabilistic_draft_probs:
            tokens = logits.argmax(-1)
            if not self.confidence_threshold:
                return tokens, None, None
            return tokens, None, logits.softmax(-1, dtype=torch.float32).amax(-1)
        seeded = self.step.seeded
        generators = (keyed_generators(seeded.seeds, positions.tolist(), positions.device)
                      if seeded else {})
        tokens, probs = sample_draft(logits, sampling_metadata, generators, self.noise_sampler)
        return tokens, probs, probs.gather(1, tokens.view(-1, 1)).squeeze(1)

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

    @override
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
    ) -> torch.Tensor | list[list[int]]:
        self._last_draft_probs = None
        verify = common_attn_metadata
        batch = verify.batch_size()
        if token_indices_to_sample is None:
            token_indices_to_sample = verify.query_start_loc[1:] - 1
        # Next token per request sits right after the last token the target accepted.
        positions = target_positions[token_indices_to_sample].to(torch.int64) + 1  # [B]
        tokens = next_token_ids.to(torch.int64)  # [B]
        start = positions.clone()
        if num_speculative_tokens == 0:
            return self.skip_round(batch)

        started = time.perf_counter()
        inputs, hiddens, residuals, drafts, probs = [], [], [], [], []
        drafting = torch.ones(batch, dtype=torch.bool, device=tokens.device)  # [B]
        lengths = torch.zeros(batch, dtype=torch.int64, device=tokens.device)  # [B]
        for _ in range(num_speculative_tokens):
            metadata, slots = self._step_metadata(verify, positions)
            _, per_layer = self.build_per_group_and_layer_attn_metadata(metadata)
            with set_forward_context(
                per_layer,
                self.vllm_config,
                num_tokens=batch,
                slot_mapping={name: slots for name in self.draft_layer_names},
            ):
                hidden, residual = self.lower_layers(tokens, positions)
            inputs.append(tokens)
            hiddens.append(hidden)
            residuals.append(residual)
            positions = positions + 1  # where the token drafted from this step goes
            tokens, step_probs, confidence = self._draft_tokens(
                hidden, residual, sampling_metadata, positions)
            tokens = tokens.to(torch.int64)
            drafts.append(tokens)
            if step_probs is not None:
                probs.append(step_probs)
            if self.confidence_threshold:
                # A request keeps this token and stops after it once the draft is unsure;
                # the loop ends when no request is left drafting.
                lengths += drafting
                drafting &= confidence >= self.confidence_threshold
                if not bool(drafting.any()):
                    break
        stats = self.exit_states.stats
        stats.draft_tokens += batch * len(drafts)
        stats.draft_steps += len(drafts)
        stats.draft_seconds += time.perf_counter() - started

        # Keep the layer-E states for the verification pass of the next step.
        if self.reuse_exit_states:
            self.exit_states.save(
                req_ids=self.step.req_ids[:batch],
                start_positions=start,
                tokens=torch.stack(inputs, dim=1),  # [B, K]
                hidden=torch.stack(hiddens, dim=1),  # [B, K, d]
                residual=torch.stack(residuals, dim=1),  # [B, K, d]
            )
        if probs:
            self._last_draft_probs = torch.stack(probs, dim=1).contiguous()  # [B, K, V]
        drafted = torch.stack(drafts, dim=1)  # [B, K]
        if not self.confidence_threshold:
            return drafted
        # Ragged drafts go to the scheduler as lists (as n-gram drafts do).
        return [row[:n] for row, n in zip(drafted.tolist(), lengths.tolist())]
