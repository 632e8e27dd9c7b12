"""Sampling under speculation: drafts drawn with the request's own filters, and seeded
requests that depend on their seed and nothing else.

Drafts. vLLM samples drafts with the request's temperature only. A request with top-k or
top-p then drafts tokens its target distribution excludes, and they are always rejected.
`sample_draft` applies the temperature, top-k and top-p the target applies; the rejection
sampler receives the filtered draft distribution q, so min(1, p/q) acceptance stays exact.

Seeds. A request with `seed` must produce the same text whatever else the engine does. vLLM
gives it a random stream (`torch.Generator`), and plain decoding draws the same amount from
that stream per token. Under speculation the amount drawn per step depends on how many
tokens were drafted and accepted, which depends on the batch, the token budget, preemption
and the adaptive switch: the stream, and so the text, drifts. Instead every random number a
seeded request uses for the token at position `n` comes from a generator seeded with
`position_key(seed, n)`, and drafts and target share it (the Gumbel-max coupling):

    draft   d_n = argmax_v (log q_n(v) + g_n(v))      g_n: Gumbel noise from key(seed, n)
    target  t_n = argmax_v (log p_n(v) + g_n(v))

t_n is an exact sample of p_n (Gumbel-max) and is what a plain step at position n produces
with that key. The draft is accepted iff d_n == t_n; at the first mismatch the output is
t_n. So the output is t_n at every position, whether and however the position was drafted:
the same text under any load. The price is acceptance: P(d_n == t_n) is at least
(1 - TV) / (1 + TV) for the total variation distance TV between q and p, against 1 - TV for
vLLM's rejection sampler, so requests without a seed keep vLLM's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field

import torch

from ._vllm import apply_top_k_top_p

_MASK64 = (1 << 64) - 1
GREEDY_TEMPERATURE_EPS = 1e-5  # vLLM's: rows below it are greedy

# The platform sampler's noise step: (logits [n, V], {row: generator}, top_k, top_p) ->
# (tokens [n], ...). Rows with a generator draw their noise from it, the others freshly.
NoiseSampler = Callable[..., tuple[torch.Tensor, object]]


@dataclass(frozen=True)
class SeededRows:
    """Rows of a batch whose requests carry a seed."""

    seeds: dict[int, int]  # row -> the request's seed
    next_positions: Sequence[int]  # per row: position of the token after its last scheduled one


@dataclass
class StepState:
    """What the hooks of one engine step share. The runner owns it; each field is set by
    the hook that learns it and read by the hooks that run later in the same step."""

    # Set when the step begins: whether it drafts, and whether it runs as plain vLLM's would
    # (it neither verifies drafts nor drafts; runner.py).
    drafts: bool = False
    plain: bool = False
    # Set when attention metadata is built; read by the verification forward.
    target_batch: Any = None  # the batch's CommonAttentionMetadata
    # Set before sampling; read by the drafter: which request and seed each row belongs to.
    req_ids: list[str] = field(default_factory=list)
    seeded: SeededRows | None = None

    def take_target_batch(self) -> Any:
        batch, self.target_batch = self.target_batch, None
        return batch


def position_key(seed: int, position: int) -> int:
    """A 63-bit generator seed that is a pure function of (seed, position): SplitMix64's
    finaliser over both, so nearby positions and seeds get unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def keyed_generators(seeds: Mapping[int, int], positions: Sequence[int],
                     device: torch.device) -> dict[int, torch.Generator]:
    """{row: a fresh generator seeded for the token at positions[row]}, seeded rows only."""
    out = {}
    for row, seed in seeds.items():
        generator = torch.Generator(device=device)
        generator.manual_seed(position_key(seed, int(positions[row])))
        out[row] = generator
    return out


def reseed(generators: Mapping[int, torch.Generator], seeds: Mapping[int, int],
           positions: Sequence[int]) -> None:
    """Point each seeded request's own generator at the token at positions[row]."""
    for row, seed in seeds.items():
        generators[row].manual_seed(position_key(seed, int(positions[row])))


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor,
                  top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """What the target's sampler does to logits [n, V] before drawing: temperature (greedy
    rows keep 1), then top-k and top-p. Returns float32 logits, -inf where filtered out."""
    greedy = temperature < GREEDY_TEMPERATURE_EPS
    logits = logits.float().div(torch.where(greedy, 1.0, temperature).unsqueeze(1))
    return apply_top_k_top_p(logits, top_k, top_p)


def sample_draft(logits: torch.Tensor, sampling_metadata, generators: dict[int, torch.Generator],
                 sample_with_noise: NoiseSampler) -> tuple[torch.Tensor, torch.Tensor]:
    """One draft token per row of logits [n, V], from the request's filtered distribution q.
    Returns (tokens [n], q [n, V]); greedy rows take the argmax."""
    rows = logits.shape[0]
    temperature = sampling_metadata.temperature[:rows]
    top_k, top_p = (None if t is None else t[:rows]
                    for t in (sampling_metadata.top_k, sampling_metadata.top_p))
    filtered = filter_logits(logits, temperature, top_k, top_p)
    probs = filtered.softmax(-1)  # [n, V]
    tokens = sample_with_noise(filtered.clone(), generators, None, None)[0].view(-1)
    greedy = temperature < GREEDY_TEMPERATURE_EPS
    return torch.where(greedy, probs.argmax(-1), tokens), probs


def couple(drafts: Sequence[int], targets: Sequence[int], bonus: int) -> list[int]:
    """One request's output under the coupling: the target's own token at every drafted
    position up to and including the first where the draft differs, else all + bonus."""
    out = []
    for draft, target in zip(drafts, targets):
        out.append(target)  # equals the draft while they agree
        if draft != target:
            return out
    return [*out, bonus]
