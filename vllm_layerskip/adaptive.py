"""Drafting only where it pays, measured rather than guessed.

Self-speculation trades extra work (K draft steps through E layers, K+1 tokens through the
verifier) for fewer engine steps. At batch 1 the verifier is bound by reading the weights,
so K+1 tokens cost about one; at large batches the step becomes compute-bound and the same
trade can lose. Which side of that line a batch size falls on depends on the model, the
machine and the acceptance of the current requests, so the backend measures it: per
batch-size bucket it keeps the seconds per generated token of recent decode steps with and
without drafts, probes each mode for a few steps, then drafts only when drafting is faster,
and probes again now and then because acceptance drifts with the requests: 200 steps after
a probe, then twice as long each time the answer stays the same (up to 1,600 steps), so
that a mode which keeps losing costs less and less. A probe that found the losing mode far
slower waits longer from the start: its steps in the losing mode, priced at how much slower
that mode was, must be at most `probe_budget` (1%) of the steps until the next probe.
(Drafting at 0.57x of plain per token: a probe's 8 drafting steps, 6 timed and 2
switch-over steps, then cost 8 x 0.75 = 6 steps, 3% of 200.) A bucket not yet measured
starts from what the others imply where they do (drafting that loses at batch 2 loses at
batch 8), so that a batch draining from 8 to 1 requests does not probe every bucket on its
way.

Each mode's figure is the median step time over the mean tokens per step, from a short
window of recent decode steps. The median because noise (a new request's prefill landing in
a step, a page fault, another process) hits a step's time, and one slow step must not tip
the decision towards whichever mode did not take it. The mean because acceptance decides
the tokens and its spread is lopsided: a drafting step yields 1 or K+1 tokens far more often
than the mean, and the median of per-step ratios would credit drafting with its
full-acceptance steps (on SmolLM2 at batch 1 it put drafting at 0.88x of plain when
drafting ran at 0.72x).

A step's figure counts only when the step before it ran the same mode. A drafting step
verifies the drafts of the step before it and drafts for the step after it, so the tokens
it yields were paid for partly by the previous step: after a plain step, a drafting step
yields one token for a plain forward plus the draft loop, and the plain step after a
drafting step verifies those drafts and takes their tokens. Counting those switch-over
steps priced drafting at (1 + K c) plain steps per token however good the drafts were, and
with the modes probed one step each in turn every probe step was one: the switch never
drafted. Left out, the two switch-over steps of a round trip cost together what one step of
each mode costs, so nothing is lost by not counting them.

The two modes are probed in short blocks in turn (`probe_block` counted steps each, starting
with the mode that is running), and a re-probe forgets both figures, so that the two are
always measured over the same stretch of time: on a shared machine a slow minute that fell
on one mode's probe alone would decide the comparison.

`VerifySwitch` makes the same measured choice, on drafting steps only, between the two ways
of verifying: split (layers >= E only for the drafted tokens whose layer-E state the draft
saved) and the stock forward over every layer. Which is faster depends on the machine's
kernels: at batch 1 a forward is bound by reading the weights, so skipping layers < E for
K of K+1 tokens saves little and the second pass costs its own fixed time; at large batches
the saved compute wins. Measured on three 2-core CPUs, each mode was 5-18% faster than the
other somewhere.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from statistics import median
from typing import Literal, get_args

from typing_extensions import override


# "adaptive": the switch decides per batch-size bucket; "always": draft every step;
# "off": never draft (LayerSkip stays configured, every step samples as plain vLLM).
DraftingMode = Literal["adaptive", "always", "off"]
DRAFTING_MODES = get_args(DraftingMode)


def bucket_of(batch_size: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, ... share a bucket (the next power of two)."""
    return 1 << max(batch_size - 1, 0).bit_length()


@dataclass
class _Bucket:
    window: int
    recent: dict[bool, deque] = field(default_factory=dict)  # drafting -> (seconds, tokens)
    steps: int = 0
    choice: bool | None = None  # what the last completed probe found faster
    interval: int = 0  # steps from the end of that probe to the next one
    next_probe: int = 0  # step at which both modes are measured again
    probing: bool | None = None  # the mode of the probe block now running
    block_end: int = 0  # its sample count at which that block ends

    def samples(self, drafting: bool) -> deque:
        return self.recent.setdefault(drafting, deque(maxlen=self.window))


def seconds_per_token(steps) -> float:
    """Median step time over mean tokens per step, of (seconds, tokens) step records."""
    seconds, tokens = zip(*steps)
    return median(seconds) * len(tokens) / sum(tokens)


class DraftSwitch:
    """Per batch-size bucket: draft (True) or decode plainly (False)."""

    ARMS = ("drafting", "plain")  # names of the True and False modes in summary()
    # Whose win carries to bigger batches: plain's (drafting that lost at a batch size
    # loses at bigger ones). See _implied.
    WINS_UPWARD = False

    def __init__(self, probe_steps: int = 6, reprobe_every: int = 200, window: int = 15,
                 max_reprobe_every: int = 1600, probe_budget: float = 0.01, probe_block: int = 3):
        if not 1 <= probe_steps <= window:
            raise ValueError(f"probe_steps must be between 1 and window ({window}), got {probe_steps}")
        if probe_block < 1:
            raise ValueError(f"probe_block must be at least 1, got {probe_block}")
        self.probe_block = probe_block
        if max_reprobe_every < reprobe_every:
            raise ValueError(f"max_reprobe_every must be >= reprobe_every ({reprobe_every}), "
                             f"got {max_reprobe_every}")
        self.probe_steps = probe_steps
        self.reprobe_every = reprobe_every
        self.max_reprobe_every = max_reprobe_every
        if not 0 < probe_budget <= 1:
            raise ValueError(f"probe_budget must be in (0, 1], got {probe_budget}")
        self.probe_budget = probe_budget
        self.window = window
        self.buckets: dict[int, _Bucket] = {}
        # (start, batch, mode it is timed under or None, decode_only) of the open step
        self._open: tuple[float, int, bool | None, bool] | None = None
        self._tokens = 0  # tokens the open step has produced so far
        self._last: bool | None = None  # the mode chosen for the step before the open one

    def step(self, batch_size: int, decode_only: bool, now: float | None = None) -> bool:
        """A new engine step for `batch_size` requests begins; `decode_only`: it prefills
        nothing. Close the previous step (its wall time and tokens go into its bucket if it
        was decode-only and has a mode to be timed under) and choose this one's mode."""
        now = time.perf_counter() if now is None else now
        if self._open is not None:
            started, batch, timed_as, was_decode_only = self._open
            if was_decode_only and timed_as is not None:
                self.record(batch, timed_as, now - started, self._tokens)
        chosen = self.choose(batch_size)
        self._open = (now, batch_size, self._timed_as(chosen), decode_only)
        self._tokens, self._last = 0, chosen
        return chosen

    def _timed_as(self, chosen: bool) -> bool | None:
        """A step is timed under its mode only if the step before it ran the same mode (a
        switch-over step is paid for partly by its neighbour)."""
        return chosen if chosen == self._last else None

    def restart(self) -> None:
        """Forget the open step (drafting was switched by hand while it ran)."""
        self._open, self._tokens, self._last = None, 0, None

    def tokens_generated(self, count: int) -> None:
        """The open step's verification produced `count` tokens."""
        self._tokens += count

    def _bucket(self, batch_size: int) -> _Bucket:
        return self.buckets.setdefault(bucket_of(batch_size), _Bucket(self.window))

    def record(self, batch_size: int, drafted: bool, seconds: float, tokens: int) -> None:
        """One decode step: its wall time and the tokens it produced."""
        if tokens > 0 and seconds > 0:
            self._bucket(batch_size).samples(drafted).append((seconds, tokens))

    def choose(self, batch_size: int) -> bool:
        """The mode the next step of this batch size runs (True: drafting)."""
        b = self._bucket(batch_size)
        b.steps += 1
        if b.steps == b.next_probe:
            b.recent.clear()  # acceptance drifts: measure both modes again, side by side
            b.probing = None
        counts = {mode: len(b.samples(mode)) for mode in (True, False)}
        if min(counts.values()) < self.probe_steps:
            if b.steps < b.next_probe:  # a choice taken from another bucket, not yet probed
                return b.choice
            if b.choice is None and (implied := self._implied(batch_size)) is not None:
                b.choice, b.interval = implied, self.reprobe_every
                b.next_probe = b.steps + self.reprobe_every
                return implied
            return self._probe_mode(b, counts)
        costs = {mode: seconds_per_token(b.samples(mode)) for mode in (True, False)}
        faster = costs[True] <= costs[False]
        if b.steps >= b.next_probe:  # a probe has just ended: when to ask again
            # The same answer as last time: wait twice as long (each probe runs the losing
            # mode for a few steps); a new answer: ask again soon. Never so soon that the
            # probes cost more than the budget.
            interval = (2 * b.interval if faster == b.choice else self.reprobe_every)
            b.interval = min(max(interval, self._repaid_after(costs)), self.max_reprobe_every)
            b.choice, b.next_probe = faster, b.steps + b.interval
        return faster

    def _probe_mode(self, b: _Bucket, counts: dict[bool, int]) -> bool:
        """The mode a probing step runs: the current block's until it has `probe_block` more
        figures, then the other mode's, unless that one is measured already. The first
        block runs the mode the engine is in, which saves a switch-over step."""
        mode = b.probing
        if mode is None or counts[mode] >= min(b.block_end, self.probe_steps):
            mode = (self._last if self._last is not None else True) if mode is None else not mode
            if counts[mode] >= self.probe_steps:
                mode = not mode
            b.probing, b.block_end = mode, counts[mode] + self.probe_block
        return mode

    def _repaid_after(self, costs: dict[bool, float]) -> int:
        """Steps between probes at which the losing mode's probe steps, priced at how much
        slower per token it ran, are `probe_budget` of the time."""
        slower = max(costs.values()) / min(costs.values()) - 1
        return math.ceil(self._probe_steps_in_each_mode() * slower / self.probe_budget)

    def _probe_steps_in_each_mode(self) -> int:
        """A probe runs each mode for its timed steps plus a switch-over step per block."""
        return self.probe_steps + math.ceil(self.probe_steps / self.probe_block)

    def _implied(self, batch_size: int) -> bool | None:
        """What the other buckets' probes imply for a bucket not yet measured. A bigger batch
        makes each step costlier while drafting's saving, steps not taken, stays the same:
        drafting that lost at a batch size loses at bigger ones, and drafting that paid pays
        at smaller ones (WINS_UPWARD names the mode whose win carries to bigger batches).
        Saves a draining batch from probing every bucket it passes through; the bucket is
        still probed `reprobe_every` steps later. Where the buckets imply both (acceptance
        differs between their requests), it is probed now."""
        bucket = bucket_of(batch_size)
        implied = {b.choice for other, b in self.buckets.items()
                   if b.choice is not None and other != bucket
                   and (other < bucket) == (b.choice == self.WINS_UPWARD)}
        return implied.pop() if len(implied) == 1 else None

    def summary(self) -> dict[int, dict]:
        """Per bucket: seconds per generated token in each mode (None until measured)."""
        return {
            bucket: {name: (seconds_per_token(b.recent[mode]) if b.recent.get(mode) else None)
                     for name, mode in zip(self.ARMS, (True, False))}
            for bucket, b in sorted(self.buckets.items())
        }


class VerifySwitch(DraftSwitch):
    """Per batch-size bucket, on drafting steps: split verification (True) or the stock
    forward (False). The choice made while a step drafts decides how the next step verifies
    those drafts (the draft saves its layer-E states only for split verification), so a
    step is timed under the mode chosen one drafting step earlier. Switching between the two
    costs nothing, so a probe alternates them step by step. The runner calls step() on
    drafting steps only, and restart() on the others."""

    ARMS = ("split", "stock")
    # Split saves compute that grows with the batch at a fixed cost per step: split that
    # paid at a batch size pays at bigger ones.
    WINS_UPWARD = True

    @override
    def _probe_steps_in_each_mode(self) -> int:
        return self.probe_steps  # no switch-over steps: switching costs nothing here

    @override
    def _probe_mode(self, b: _Bucket, counts: dict[bool, int]) -> bool:
        """The other mode than the last step's, unless that one is measured already."""
        mode = True if self._last is None else not self._last
        return mode if counts[mode] < self.probe_steps else not mode

    @override
    def _timed_as(self, chosen: bool) -> bool | None:
        """This drafting step verifies what the previous one drafted, in the mode chosen
        then (None after a step that did not draft: restart() was called)."""
        return self._last
