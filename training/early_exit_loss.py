"""Early-exit loss: the model's own final norm and LM head read out every enabled exit.

    loss(t) = sum_l  e~(t, l) * CE_l,      e~(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i)

where CE_l is the next-token cross entropy of the prediction made after layer index l
(0-based; `exit_layer` = l + 1 layers run). The unnormalised scale e(l) is one of

    sum (paper default)  e(l) = e_scale * sum_{i<=l} i            for l < L-1
    linear               e(l) = e_scale * l
    uniform              e(l) = e_scale
    and for the last layer  e(L-1) = (L-1) + e(L-2),

so deeper exits weigh more and the final layer dominates. e_scale = 0 leaves only the
final layer's loss: the ordinary language-model objective.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .chunked_ce import linear_cross_entropy

EXIT_SCALES = ("sum", "linear", "uniform")


def _depth_weight(layer: int, kind: str) -> float:
    if kind == "sum":
        return layer * (layer + 1) / 2  # sum_{i=0}^{l} i
    if kind == "linear":
        return float(layer)
    if kind == "uniform":
        return 1.0
    raise ValueError(f"unknown early-exit scale {kind!r}")


def exit_scales(num_layers: int, e_scale: float, kind: str = "sum") -> list[float]:
    """Unnormalised e(l) for l in 0..L-1."""
    scales = [e_scale * _depth_weight(l, kind) for l in range(num_layers - 1)]
    scales.append((num_layers - 1) + (scales[-1] if scales else 0.0))
    return scales


def normalized_scales(scales: Sequence[float], enabled: Sequence[bool]) -> list[float]:
    """e~(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i). If every enabled scale is zero (a
    one-layer model) the last layer gets weight 1."""
    masked = [s if on else 0.0 for s, on in zip(scales, enabled)]
    total = sum(masked)
    if total <= 0:
        return [0.0] * (len(scales) - 1) + [1.0]
    return [m / total for m in masked]


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of logits [b, s, V] at position i against token i+1."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(),
                           input_ids[:, 1:].reshape(-1), reduction=reduction)


def exit_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Shared read-out: final norm then LM head. hidden [b, s, d] -> logits [b, s, V]."""
    return model.lm_head(model.model.norm(hidden))


def head_ce(model: nn.Module, normed: torch.Tensor, input_ids: torch.Tensor,
            chunk: int = 0, compiled: bool = False) -> torch.Tensor:
    """Next-token CE of the LM head read out of normed hidden states [b, s, d].
    chunk > 0: `chunk` tokens at a time, never holding [b, s, V] logits (same value up to
    float rounding), each chunk a compiled graph if `compiled`; chunk = 0: the plain
    logits-then-CE path."""
    head = model.lm_head
    if chunk <= 0 or getattr(head, "bias", None) is not None:
        return next_token_ce(head(normed), input_ids)
    x = normed[:, :-1].reshape(-1, normed.shape[-1])  # [b*(s-1), d]
    return linear_cross_entropy(x, head.weight, input_ids[:, 1:].reshape(-1), chunk, compiled)


def early_exit_loss(model: nn.Module, exit_hidden: dict[int, torch.Tensor],
                    final_hidden: torch.Tensor, input_ids: torch.Tensor,
                    weights: Sequence[float], chunk: int = 0, compiled: bool = False
                    ) -> tuple[torch.Tensor, dict[int, float]]:
    """Weighted sum of per-exit CE. `exit_hidden` maps layer index -> raw (un-normed)
    hidden state [b, s, d] for the early exits with non-zero weight; `final_hidden` is
    the model's own normed last hidden state [b, s, d]. Unchunked, logits are built one
    exit at a time, so at most one extra [b, s, V] tensor is alive at once (plus what
    autograd keeps); chunked (chunk > 0), at most [chunk, V] and autograd keeps nothing
    of vocabulary size but the head's weight gradient."""
    last = len(weights) - 1
    final_ce = head_ce(model, final_hidden, input_ids, chunk, compiled)
    total = weights[last] * final_ce
    per_exit = {last: float(final_ce.detach())}
    for layer, hidden in sorted(exit_hidden.items()):
        ce = head_ce(model, model.model.norm(hidden), input_ids, chunk, compiled)
        total = total + weights[layer] * ce
        per_exit[layer] = float(ce.detach())
    return total, per_exit
