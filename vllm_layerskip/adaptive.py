"""Drafting only where it pays, measured rather than guessed.

Self-speculation trades extra work (K draft steps through E layers, K+1 tokens through the
verifier) for fewer engine steps. At batch 1 the verifier is bound by reading the weights,
so K+1 tokens cost about one; at large batches the step becomes compute-bound and the same
trade can lose. Which side of that line a batch size falls on depends on the model, the
machine and the acceptance of the current requests, so the backend measures it: per
batch-size bucket it keeps the seconds per generated token of steps with and without
drafts, probes each mode for a few steps, then drafts only when drafting is faster, and
probes again now and then because acceptance drifts with the requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def bucket_of(batch_size: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, ... share a bucket (the next power of two)."""
    return 1 << max(batch_size - 1, 0).bit_length()


@dataclass
class _Bucket:
    seconds_per_token: dict[bool, float] = field(default_factory=dict)  # drafting -> EMA
    samples: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    steps: int = 0


class DraftSwitch:
    def __init__(self, probe_steps: int = 6, reprobe_every: int = 200, smoothing: float = 0.2):
        self.probe_steps = probe_steps
        self.reprobe_every = reprobe_every
        self.smoothing = smoothing
        self.buckets: dict[int, _Bucket] = {}

    def record(self, batch_size: int, drafted: bool, seconds: float, tokens: int) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        b = self.buckets.setdefault(bucket_of(batch_size), _Bucket())
        value = seconds / tokens
        old = b.seconds_per_token.get(drafted)
        b.seconds_per_token[drafted] = value if old is None else old + self.smoothing * (value - old)
        b.samples[drafted] += 1

    def should_draft(self, batch_size: int) -> bool:
        b = self.buckets.setdefault(bucket_of(batch_size), _Bucket())
        b.steps += 1
        if b.steps % self.reprobe_every == 0 and len(b.seconds_per_token) == 2:
            # Forget the losing mode's figure and measure it again: acceptance drifts.
            loser = b.seconds_per_token[True] > b.seconds_per_token[False]
            del b.seconds_per_token[loser]
            b.samples[loser] = 0
        for mode in (True, False):  # measure both modes before choosing
            if b.samples[mode] < self.probe_steps:
                return mode
        return b.seconds_per_token[True] <= b.seconds_per_token[False]

    def summary(self) -> dict[int, dict]:
        return {
            bucket: {"drafting": b.seconds_per_token.get(True), "plain": b.seconds_per_token.get(False)}
            for bucket, b in sorted(self.buckets.items())
        }
