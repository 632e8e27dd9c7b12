"""Early-exit curricula C(t, l): which exits contribute to the loss at step t.

Computing the exit loss at every layer on every step is expensive (one LM-head
projection per exit); a curriculum enables a subset. The last layer is always on.
"""
from __future__ import annotations

CURRICULA = ("rotational", "gradual", "none")


def rotational(step: int, num_layers: int, period: int) -> list[bool]:
    """Every R-th layer, the pattern shifting by one layer per step: layer l is on when
    l = t (mod R). Over any R consecutive steps each layer is on exactly once."""
    return [l % period == step % period or l == num_layers - 1 for l in range(num_layers)]


def gradual(step: int, num_layers: int, total_steps: int) -> list[bool]:
    """Exits switch on from the last layer down, one more every T/(2L) steps, so that all
    L are on after T/2 steps: layer l is on when l >= L-1 - floor(t / (T/(2L)))."""
    extra = (2 * num_layers * step) // max(total_steps, 1)  # floor(t * 2L / T)
    return [l >= num_layers - 1 - extra for l in range(num_layers)]


def enabled_exits(kind: str, step: int, num_layers: int, total_steps: int,
                  period: int = 1) -> list[bool]:
    """C(t, l) for l in 0..L-1 under curriculum `kind`."""
    if kind == "rotational":
        return rotational(step, num_layers, period)
    if kind == "gradual":
        return gradual(step, num_layers, total_steps)
    if kind == "none":
        return [True] * num_layers
    raise ValueError(f"unknown curriculum {kind!r}")
