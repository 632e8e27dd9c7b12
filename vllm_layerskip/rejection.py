"""Verification of drafts: vLLM's rejection sampler, with the rows of seeded requests
decided by the position-keyed coupling of `sampling.py`.

The runner attaches the seeded rows of the step to the spec-decode metadata
(`SeededSpecDecodeMetadata`). vLLM's sampler then runs unchanged for the whole batch
(requests without a seed keep min(1, p/q) acceptance, logits processors, penalties), and
afterwards each seeded row is set to the coupled result: the target's own token, drawn with
the key of its position, at every drafted position up to the first disagreement, and the
bonus token (also drawn with its position's key) if every draft agreed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from typing_extensions import override

from ._vllm import (
    PLACEHOLDER_TOKEN_ID,
    RejectionSampler,
    SpecDecodeMetadata,
    apply_sampling_constraints,
)
from .sampling import SeededRows, couple, keyed_generators, reseed


@dataclass
class SeededSpecDecodeMetadata(SpecDecodeMetadata):
    seeded: SeededRows | None = None


def with_seeded_rows(metadata: SpecDecodeMetadata, seeded: SeededRows) -> SeededSpecDecodeMetadata:
    fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata) if f.init}
    return SeededSpecDecodeMetadata(**fields, seeded=seeded)


class LayerSkipRejectionSampler(RejectionSampler):
    @override
    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        # The runner has keyed each seeded request's generator to the position of its bonus
        # token, so vLLM's sampler draws that token as a plain step there would.
        seeded = getattr(metadata, "seeded", None)
        output = super().forward(metadata, draft_probs, logits, sampling_metadata)
        counts = metadata.num_draft_tokens
        rows = [row for row in seeded.seeds if counts[row] > 0] if seeded else []
        if rows:
            self._couple_rows(output, rows, seeded, metadata, logits, sampling_metadata)
        return output

    def _couple_rows(self, output, rows, seeded, metadata, logits, sampling_metadata) -> None:
        counts = metadata.num_draft_tokens
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)

        # The target distributions at the drafted positions, processed as super() did.
        target = logits[metadata.target_logits_indices].to(torch.float32)
        target = self.apply_logits_processors(target, sampling_metadata, metadata)
        target = apply_sampling_constraints(target, metadata.cu_num_draft_tokens, sampling_metadata)

        # The target's own token at each drafted position of the seeded rows, keyed by it.
        index, seeds, positions = [], {}, []
        for row in rows:
            first = seeded.next_positions[row] - counts[row]  # position of the first draft
            for k in range(counts[row]):
                seeds[len(index)] = seeded.seeds[row]
                index.append(starts[row] + k)
                positions.append(first + k)
        generators = keyed_generators(seeds, positions, target.device)
        targets = self.sampler.topk_topp_sampler(target[index], generators, None, None)[0].tolist()
        drafts = metadata.draft_token_ids[index].tolist()

        # The bonus token again (super() kept it only where every draft was accepted).
        reseed(sampling_metadata.generators, seeded.seeds, seeded.next_positions)
        bonus = self._sample_bonus(logits, metadata, sampling_metadata)
        bonus_ids = bonus.sampled_token_ids.view(-1).tolist()

        tokens = output.sampled_token_ids
        done = 0
        for row in rows:
            n = counts[row]
            coupled = couple(drafts[done:done + n], targets[done:done + n], bonus_ids[row])
            done += n
            tokens[row] = PLACEHOLDER_TOKEN_ID
            tokens[row, : len(coupled)] = torch.tensor(coupled, dtype=tokens.dtype)

        if sampling_metadata.max_num_logprobs is not None:
            # The sampled token's logprob and rank follow the tokens just replaced.
            raw_target = logits[metadata.target_logits_indices].to(torch.float32)
            output.logprobs_tensors = self._get_logprobs_tensors(
                sampling_metadata.max_num_logprobs, metadata, logits,
                target if self.is_processed_logprobs_mode else raw_target,
                bonus.logprobs_tensors.logprobs, tokens,
            )

    def _sample_bonus(self, logits, metadata, sampling_metadata):
        """vLLM's bonus-token call of the sampler, repeated (same arguments)."""
        return self.sampler(
            logits=logits[metadata.bonus_logits_indices],
            sampling_metadata=dataclasses.replace(sampling_metadata, max_num_logprobs=-1),
            predict_bonus_token=True,
            logprobs_mode_override="processed_logits" if self.is_processed_logprobs_mode else "raw_logits",
        )
