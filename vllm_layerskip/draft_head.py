"""The draft's LM head over a frequency-ranked vocabulary subset (the FR-Spec idea).

On a model with a large vocabulary the LM head is most of a shallow draft step's cost:
SmolLM2-135M's 49,152 x 576 head costs about as much as 12 of its 30 layers at batch 1. The
draft rarely proposes a rare token, so it computes logits only for the N most frequent
token ids of the training data (`draft_vocab` in the checkpoint's layerskip metadata,
written by `training/` or `python -m training.token_ranking`), and puts -inf everywhere
else. Verification still uses the full head: a token outside the subset has q = 0, the
rejection sampler then accepts with min(1, p/q) over the subset only and draws any token
from the residual, so the output distribution is unchanged; greedy output too.

The rows of the subset are copied once (a buffer of N x d; the head's own weight is not
touched), so a draft step reads N/V of the head's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DraftHead(nn.Module):
    def __init__(self, target: nn.Module, vocab_ids: list[int] | None):
        super().__init__()
        self.target = target
        self.vocab_size = None
        if vocab_ids:
            weight = target.lm_head.weight  # [V, d]
            ids = torch.tensor(vocab_ids, dtype=torch.int64, device=weight.device)
            self.register_buffer("ids", ids, persistent=False)  # [N]
            self.register_buffer("rows", weight.detach()[ids].clone(), persistent=False)  # [N, d]
            self.vocab_size = target.logits_processor.org_vocab_size  # what compute_logits returns

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, d] -> logits [B, V]; outside the subset -inf."""
        if self.vocab_size is None:
            return self.target.compute_logits(hidden)
        processor = self.target.logits_processor
        subset = F.linear(hidden.to(self.rows.dtype), self.rows)  # [B, N]
        if processor.soft_cap is not None:
            subset = torch.tanh(subset / processor.soft_cap) * processor.soft_cap
        if processor.scale != 1.0:
            subset = subset * processor.scale
        logits = subset.new_full((hidden.shape[0], self.vocab_size), float("-inf"))
        logits[:, self.ids] = subset
        return logits
