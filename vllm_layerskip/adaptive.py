"""Drafting only where it pays, measured rather than guessed.

Self-speculation trades extra work (K draft steps through E layers, K+1 tokens through the
verifier) for fewer engine steps. At batch 1 the verifier is bound by reading the weights,
so K+1 tokens cost about one; at large batches the step becomes compute-bound and the same
trade can lose. Which side of that line a batch size falls on depends on the model, the
machine and the acceptance of the current requests, so the backend measures it: per
batch-size bucket it keeps the seconds per generated token of recent decode steps with and
without drafts, probes each mode for a few steps, then drafts only when drafting is faster,
and probes again now and then because acceptance drifts with the requests.

The figure per mode is the median of a short window, not a running mean: one slow step (a
new request's prefill landing in it, a page fault, another process) would otherwise tip the
decision towards whichever mode did not take it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import median


def bucket_of(batch_size: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, ... share a bucket (the next power of two)."""
    return 1 << max(batch_size - 1, 0).bit_length()


@dataclass
class _Bucket:
    window: int
    recent: dict[bool, deque] = field(default_factory=dict)  # drafting -> seconds per token
    steps: int = 0

    def samples(self, drafting: bool) -> deque:
        return self.recent.setdefault(drafting, deque(maxlen=self.window))


class DraftSwitch:
    def __init__(self, probe_steps: int = 6, reprobe_every: int = 200, window: int = 15):
        if not 1 <= probe_steps <= window:
            raise ValueError(f"probe_steps must be between 1 and window ({window}), got {probe_steps}")
        self.probe_steps = probe_steps
        self.reprobe_every = reprobe_every
        self.window = window
        self.buckets: dict[int, _Bucket] = {}

    def _bucket(self, batch_size: int) -> _Bucket:
        return self.buckets.setdefault(bucket_of(batch_size), _Bucket(self.window))

    def record(self, batch_size: int, drafted: bool, seconds: float, tokens: int) -> None:
        """One decode step: its wall time and the tokens it produced."""
        if tokens > 0 and seconds > 0:
            self._bucket(batch_size).samples(drafted).append(seconds / tokens)

    def should_draft(self, batch_size: int) -> bool:
        b = self._bucket(batch_size)
        b.steps += 1
        if b.steps % self.reprobe_every == 0 and self._measured(b):
            # Forget the losing mode's figure and measure it again: acceptance drifts.
            b.samples(not self._faster(b)).clear()
        for mode in (True, False):  # measure both modes before choosing
            if len(b.samples(mode)) < self.probe_steps:
                return mode
        return self._faster(b)

    def _measured(self, b: _Bucket) -> bool:
        return all(len(b.samples(mode)) >= self.probe_steps for mode in (True, False))

    @staticmethod
    def _faster(b: _Bucket) -> bool:
        return median(b.samples(True)) <= median(b.samples(False))

    def summary(self) -> dict[int, dict]:
        """Per bucket: median seconds per generated token with and without drafts."""
        return {
            bucket: {mode_name: (median(b.recent[mode]) if b.recent.get(mode) else None)
                     for mode_name, mode in (("drafting", True), ("plain", False))}
            for bucket, b in sorted(self.buckets.items())
        }
