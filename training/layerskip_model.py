"""The training-time module: a transformers causal LM plus layer dropout and the
early-exit loss. It owns no parameters of its own, so the checkpoint it trains is the
unchanged transformers model (wrap this module in DDP/FSDP, save `.model`)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .early_exit_loss import early_exit_loss
from .layer_dropout import LayerDropout

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# Tokens per chunk of the LM-head cross entropy: [1024, V] float32 logits at a time.
DEFAULT_LOSS_CHUNK = 1024


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


class LayerSkipLM(nn.Module):
    def __init__(self, model: nn.Module, always_call_layers: bool = False,
                 loss_chunk: int = DEFAULT_LOSS_CHUNK, compile_layers: bool = False,
                 compile_loss: bool = False):
        super().__init__()
        self.model = model
        self.loss_chunk = loss_chunk  # tokens per LM-head chunk of the loss; 0 = unchunked
        self.compile_loss = compile_loss  # each loss chunk a compiled graph (chunked_ce.py)
        if compile_layers:
            # Each decoder layer runs compiled, traced with a symbolic batch (layer dropout
            # runs a layer on a varying subset of rows, which would otherwise recompile);
            # the layers share one graph, their weights being its inputs.
            # The state dict is untouched (only the bound `forward` is replaced).
            for layer in decoder_layers(model):
                layer.forward = torch.compile(layer.forward, dynamic=True)
        self.dropout = LayerDropout(decoder_layers(model), always_call=always_call_layers)
        self.last_exit_losses: dict[int, float] = {}

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    def forward(self, input_ids: torch.Tensor, keep: torch.Tensor | None,
                exit_weights: Sequence[float]) -> torch.Tensor:
        """input_ids [b, s]; keep [L, b] bool or None (no dropout); exit_weights e~(t, l).
        Returns the scalar LayerSkip loss."""
        layers = decoder_layers(self.model)
        last = len(layers) - 1
        captured: dict[int, torch.Tensor] = {}

        def capture(index):
            def hook(_module, _inputs, output):
                captured[index] = output[0] if isinstance(output, tuple) else output  # [b, s, d]
            return hook

        # Only exits with non-zero weight are read out: the curriculum saves LM-head work.
        handles = [layers[l].register_forward_hook(capture(l))
                   for l in range(last) if exit_weights[l] > 0]
        try:
            if keep is not None:
                with self.dropout.active(keep):
                    out = self.model.model(input_ids=input_ids, use_cache=False)
            else:
                out = self.model.model(input_ids=input_ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        loss, self.last_exit_losses = early_exit_loss(
            self.model, captured, out.last_hidden_state, input_ids, exit_weights,
            self.loss_chunk, self.compile_loss)
        return loss
