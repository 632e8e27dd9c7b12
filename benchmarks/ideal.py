"""Zero-overhead speculative-decoding model, written for the benchmarks.

A draft-verify cycle runs K draft steps, each costing ``c`` full decode steps, and one verify
step costing about one full decode step (on a CPU a matmul over K+1 rows costs about the same
as over one). It yields ``mean_accepted_length`` tokens (accepted drafts + the bonus token).
Plain decoding yields one token per full step, so the best a system can do is

    ideal_speedup = mean_accepted_length / (K * c + 1),

with K the measured number of drafted tokens per verify step (the configured K for vLLM's
fixed-length drafters; an average for transformers' adaptive draft length).

(`training.calibrate.expected_speedup` predicts the same kind of figure from per-token
acceptance and E/L before any engine runs; here the inputs are measured: the engine's own
accepted-token counters and the measured cost ratio of a draft step to a full step.)
"""
from __future__ import annotations


def ideal_speedup(mean_accepted_length: float | None, k: float, draft_cost: float | None):
    if mean_accepted_length is None or draft_cost is None or k <= 0:
        return None
    return mean_accepted_length / (k * draft_cost + 1.0)


def overhead_fraction(draft_cost: float, exit_layer: int, num_layers: int) -> float:
    """Share of a full decode step that does not scale with the number of layers.

    Fits t(n) = a + b*n through t(E)/t(L) = draft_cost: a / t(L) = (c*L - E) / (L - E).
    ``a`` holds the embedding, LM head, sampling and the engine's per-step bookkeeping;
    ``1 - a/t(L)`` is the share spent in the decoder layers' weights.
    """
    return (draft_cost * num_layers - exit_layer) / (num_layers - exit_layer)
