"""Per-sample, per-layer dropout of whole decoder layers (LayerSkip, Elhoushi et al. 2024).

Sample b skips layer l at step t with probability

    p(l, t) = S(t) * D(l) * p_max

D(l) grows with depth so that early layers, whose outputs every later exit depends on,
are rarely dropped; S(t) optionally ramps the rate up during pretraining from scratch.
A dropped layer is the identity for that sample: the rows that keep the layer are
gathered, the layer runs on only those rows, and the result is scattered back, so
dropout saves the layer's compute instead of masking it.
"""
from __future__ import annotations

import math
import types
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

DEPTH_SCALES = ("exp", "linear", "uniform")
TIME_SCALES = ("constant", "exp")


def _ramp(x: float, kind: str) -> float:
    """Shared ramp over x in [0, 1]: exponential 2^x - 1 (= e^(x ln 2) - 1), linear x,
    or uniform 1. Both non-constant ramps go from 0 to 1."""
    if kind == "exp":
        return math.exp(x * math.log(2.0)) - 1.0
    if kind == "linear":
        return x
    if kind in ("uniform", "constant"):
        return 1.0
    raise ValueError(f"unknown scale {kind!r}")


def depth_scale(layer: int, num_layers: int, kind: str = "exp") -> float:
    """D(l) for layer index l in 0..L-1, e.g. exp: e^(l ln2 / (L-1)) - 1 (0 first, 1 last)."""
    x = layer / (num_layers - 1) if num_layers > 1 else 1.0
    return _ramp(x, kind)


def time_scale(step: int, total_steps: int, kind: str = "constant") -> float:
    """S(t) for step t in 0..T-1: constant 1 (fine-tuning), or exp e^(t ln2 / (T-1)) - 1."""
    x = step / (total_steps - 1) if total_steps > 1 else 1.0
    return _ramp(x, kind)


def drop_probabilities(num_layers: int, step: int, total_steps: int, p_max: float,
                       depth_kind: str = "exp", time_kind: str = "constant") -> list[float]:
    """p(l, t) = S(t) * D(l) * p_max for every layer l."""
    s = time_scale(step, total_steps, time_kind)
    return [s * depth_scale(l, num_layers, depth_kind) * p_max for l in range(num_layers)]


def sample_keep_mask(probs: Sequence[float], batch_size: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean [L, b] mask: True where sample b runs layer l."""
    p = torch.tensor(list(probs), dtype=torch.float64).unsqueeze(1)  # [L, 1]
    u = torch.rand(len(probs), batch_size, generator=generator, dtype=torch.float64)  # [L, b]
    return u >= p


def _select_rows(value: Any, rows: torch.Tensor, batch_size: int) -> Any:
    """Slice the batch dimension of layer kwargs (masks, rotary cos/sin, position ids).
    Tensors whose first dimension is 1 broadcast over the batch and are left alone."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch_size and batch_size > 1:
            return value.index_select(0, rows)
        return value
    if isinstance(value, tuple):
        return tuple(_select_rows(v, rows, batch_size) for v in value)
    if isinstance(value, list):
        return [_select_rows(v, rows, batch_size) for v in value]
    return value


class LayerDropout:
    """Patches the forward of each transformers decoder layer so that, while a keep mask
    is set and the model is training, only the kept rows run through the layer.

    The layers themselves (attention, MLP, norms) stay the transformers modules; only
    their `forward` is routed through `_forward_subset`. The state dict is unchanged.
    """

    def __init__(self, layers: Sequence[nn.Module], always_call: bool = False):
        self.layers = list(layers)
        # FSDP gathers a layer's parameters when the layer is called; every rank must call
        # every layer, so with always_call a fully dropped layer still runs (on one row).
        self.always_call = always_call
        self.keep: torch.Tensor | None = None  # [L, b] bool, set per micro-batch
        for index, layer in enumerate(self.layers):
            original = layer.forward
            layer.forward = types.MethodType(self._make_forward(index, original), layer)

    def _make_forward(self, index: int, original):
        def forward(layer, hidden_states, *args, **kwargs):
            keep = self.keep
            if keep is None or not layer.training:
                return original(hidden_states, *args, **kwargs)
            return self._forward_subset(original, keep[index], hidden_states, args, kwargs)
        return forward

    def _forward_subset(self, original, keep_rows: torch.Tensor, hidden_states: torch.Tensor,
                        args: tuple, kwargs: dict) -> torch.Tensor:
        batch = hidden_states.shape[0]  # hidden_states: [b, s, d]
        keep_rows = keep_rows.to(hidden_states.device)
        n_keep = int(keep_rows.sum())
        if n_keep == batch:
            return original(hidden_states, *args, **kwargs)
        if n_keep == 0 and not self.always_call:
            return hidden_states
        fully_dropped = n_keep == 0
        # Under FSDP a fully dropped layer still runs on one row whose result is added
        # with weight 0, so every rank gathers the layer and gets (zero) gradients.
        rows = keep_rows.nonzero().squeeze(1) if not fully_dropped else keep_rows.new_zeros(1).long()  # [k]
        sub_args = _select_rows(args, rows, batch)
        sub_kwargs = {k: _select_rows(v, rows, batch) for k, v in kwargs.items()}
        out = original(hidden_states.index_select(0, rows), *sub_args, **sub_kwargs)  # [k, s, d]
        if isinstance(out, tuple):  # older transformers return (hidden_states, ...)
            out = out[0]
        if fully_dropped:
            return hidden_states + 0.0 * out.sum()
        # Dropped rows keep their input: the residual stream passes through unchanged.
        return hidden_states.index_copy(0, rows, out.to(hidden_states.dtype))

    @contextmanager
    def active(self, keep: torch.Tensor) -> Iterator[None]:
        """Apply the [L, b] keep mask to the forward passes run inside the block."""
        self.keep = keep
        try:
            yield
        finally:
            self.keep = None
